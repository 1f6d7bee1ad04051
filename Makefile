# `make run` and `make test` each create .venv when it is missing and install the package into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[pulp,train,flower,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/alignment-solver simulate

test: $(STAMP)
	$(BIN)/ruff check alignment_solver formulations benchmarks tests examples
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check alignment_solver formulations benchmarks tests examples

bench: $(STAMP)
	$(BIN)/python benchmarks/solver_scaling.py
	$(BIN)/python benchmarks/orlib_gap.py

clean:
	rm -rf $(VENV) build *.egg-info
