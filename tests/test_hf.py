"""Hugging Face MoE families and token-routed custom MoEs (tests/hf_cases.py, in its own interpreter)."""

import pytest

from .conftest import run_cases_file

pytest.importorskip("transformers")


def test_hf_cases_in_their_own_interpreter():
    run_cases_file("hf_cases.py", timeout=1200)
