import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from alignment_solver import AlignmentProblem, available_backends

EXACT = [b for b in ("flow", "cpsat", "pulp_cbc", "pulp_highs") if b in available_backends()]
GENERAL = [b for b in EXACT if b != "flow"]


def backends_for(problem: AlignmentProblem) -> list[str]:
    return EXACT if problem.is_flow else GENERAL


@st.composite
def small_problems(draw, max_clients: int = 4, max_experts: int = 3, general: bool = True):
    """Tiny problems (C * E <= 12) over every feature: masks, switch penalties, groups, weights, budgets."""
    C = draw(st.integers(1, max_clients))
    E = draw(st.integers(1, max_experts))
    grid = st.integers(-20, 100).map(lambda v: v / 10)
    fitness = np.array(draw(st.lists(grid, min_size=C * E, max_size=C * E))).reshape(C, E)
    cap = np.array(draw(st.lists(st.integers(0, E), min_size=C, max_size=C)))
    low = np.array([draw(st.integers(0, int(k))) for k in cap])
    L = np.array(draw(st.lists(st.integers(0, C), min_size=E, max_size=E)))
    U = L + np.array(draw(st.lists(st.integers(0, C), min_size=E, max_size=E)))
    fields = dict(fitness=fitness, capacity=cap, min_experts=low, expert_min_load=L, expert_max_load=U)
    if draw(st.booleans()):
        fields["allowed"] = np.array(draw(st.lists(st.booleans(), min_size=C * E, max_size=C * E))).reshape(C, E)
    if draw(st.booleans()):
        fields["previous"] = np.array(draw(st.lists(st.booleans(), min_size=C * E, max_size=C * E))).reshape(C, E)
        fields["switch_penalty"] = draw(grid.filter(lambda v: v >= 0))
    if general and draw(st.booleans()):
        fields["load_weight"] = np.array(draw(st.lists(st.integers(1, 3), min_size=C * E, max_size=C * E))).reshape(C, E)
        fields["expert_min_load"] = L * 2
        fields["expert_max_load"] = U * 2
    if E >= 2 and draw(st.booleans()):
        group = np.array(draw(st.lists(st.integers(0, 1), min_size=E, max_size=E)))
        fields["expert_group"] = group
        n = int(group.max()) + 1
        gk = np.array(draw(st.lists(st.integers(0, E), min_size=C * n, max_size=C * n))).reshape(C, n)
        fields["group_capacity"] = gk
        fields["group_min_experts"] = np.array([[draw(st.integers(0, min(int(k), 1))) for k in row] for row in gk])
    if general and draw(st.booleans()):
        fields["usage"] = np.array(draw(st.lists(st.integers(0, 4), min_size=E, max_size=E)), dtype=float)
        fields["budget"] = np.array(draw(st.lists(st.integers(0, 8), min_size=C, max_size=C)), dtype=float)
    return AlignmentProblem(**fields)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def run_cases_file(name: str, timeout: float) -> None:
    """Run ``tests/<name>`` with pytest in its own interpreter (gRPC, Ray or torch threads must not
    load into this one, which forks solver workers) and require that it passed."""
    cases = Path(__file__).with_name(name)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                          capture_output=True, text=True, timeout=timeout, cwd=cases.parent.parent)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
