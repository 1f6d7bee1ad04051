"""OR-Library GAP instances gap1-gap12 (c05xx-c10xx, max and min) solved to their known optima."""

import time
from pathlib import Path

import pytest

from alignment_solver import SolveStatus, solve
from alignment_solver.instances import read_orlib_gap

from .conftest import GENERAL

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "orlib-gap"   # shipped in the repository


def _bounds():
    if not DATA.exists():
        return {}
    return {name: (float(lo), float(hi)) for name, lo, hi in
            (line.split() for line in (DATA / "bounds.tsv").read_text().splitlines() if line.strip())}


BOUNDS = _bounds()
LIMIT = 60   # each proof takes under 3 s on an idle 2-core machine; the headroom is for a loaded one
CASES = sorted(p.stem for p in DATA.glob("c*_*.txt")) if DATA.exists() else []


def test_the_gap_sets_are_present():
    assert len(CASES) == 60, f"expected the 60 gap1-gap12 instances in {DATA}"


@pytest.mark.parametrize("sense", ["max", "min"])
@pytest.mark.parametrize("name", CASES)
def test_gap_instance_reaches_known_optimum(name, sense):
    low, high = BOUNDS[f"{name}_{sense.capitalize()}"]
    assert low == high
    problem = read_orlib_gap(DATA / f"{name}.txt", sense)
    for backend in GENERAL:
        started = time.perf_counter()
        result = solve(problem, backend=backend, time_limit=LIMIT)
        elapsed = time.perf_counter() - started
        value = result.objective if sense == "max" else -result.objective
        assert result.status is SolveStatus.OPTIMAL, (backend, result.summary())
        assert value == pytest.approx(low, abs=1e-6), backend
        assert result.violations() == []
        assert elapsed <= LIMIT + 0.5, f"{backend} took {elapsed:.1f}s"


def test_reader_rejects_a_truncated_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\n1 2 3\n")
    with pytest.raises(ValueError, match="expected 16 numbers"):
        read_orlib_gap(bad)
    with pytest.raises(ValueError, match="sense"):
        read_orlib_gap(DATA / "c0515_1.txt", "maximise")
