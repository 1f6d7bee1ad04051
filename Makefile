# `make run` and `make test` each create .venv when it is missing and install what they need:
# `make run` the package with the `train` extra (about 600 MB), `make test` every extra
# (pulp, train, flower, nvflare, torch, hf, dev: about 2 GB, Ray and PyTorch included), then builds the
# docs site strictly (a broken link or API reference fails) and runs the tests.  PyPI's default
# torch is a CUDA build of several GB; `make test` first installs $(TORCH), which on these
# machines is a CPU build on local disk, so the `torch` extra's range (torch>=2.1) is already met;
# the `hf` extra's transformers range is pinned to $(TRANSFORMERS) the same way.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-train
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers==5.23.0

.PHONY: run test lint docs bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[train]'
	touch $(RUN_STAMP)

$(STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[pulp,train,flower,nvflare,torch,hf,dev]' '$(TRANSFORMERS)'
	touch $(STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/alignment-solver simulate --seeds 5

test: $(STAMP)
	$(BIN)/ruff check alignment_solver formulations benchmarks tests examples
	$(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check alignment_solver formulations benchmarks tests examples

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/solver_scaling.py
	$(BIN)/python benchmarks/orlib_gap.py

clean:
	rm -rf $(VENV) build site *.egg-info
