"""Band repair by one min-cost flow on the experts: it keeps every client row, never returns a
worse plan than it got, and on instances where single moves can mend the band it does, within
the MILP optimum; against an independent constraint checker and scipy's milp."""

import math

import numpy as np
import pytest

from alignment_solver import AlignmentProblem
from alignment_solver.instances import random_problem
from alignment_solver.search import knapsack, rebalance
from alignment_solver.search.values import plan_value

from .oracles import scipy_milp, value, violations


def _client_rows_kept(problem, x):
    return [v for v in violations(problem, x, soft=True) if "load" not in v]


@pytest.mark.parametrize("soft", [False, True])
def test_keeps_client_rows_never_worsens_and_mends_the_band(soft):
    rng = np.random.default_rng(21 + soft)
    penalty = 2.0 if soft else None
    mended = 0
    for _ in range(40):
        C, E = int(rng.integers(30, 90)), int(rng.integers(3, 9))
        cap = rng.integers(1, 4, C)
        fair = cap.sum() / E
        problem = AlignmentProblem(fitness=np.round(rng.normal(1.0, 1.0, (C, E)), 3), capacity=cap,
                                   min_experts=rng.integers(0, 2, C).clip(max=cap),
                                   expert_min_load=math.floor(0.8 * fair), expert_max_load=math.ceil(1.2 * fair),
                                   usage=rng.choice([1.0, 2.0, 3.0], size=E), budget=rng.integers(2, 8, C).astype(float),
                                   allowed=rng.random((C, E)) < 0.9)
        ints = knapsack.integer_budget(problem)
        G = np.where(problem.allowed_matrix, problem.objective_matrix, -np.inf)
        best, start = knapsack.best_sets(G, *ints, problem.min_experts_array, problem.capacity_array)
        if not np.all(np.isfinite(best)):
            continue
        x = rebalance.rebalance(problem, start, soft_penalty=penalty)
        assert _client_rows_kept(problem, x) == []
        before = plan_value(problem, start, penalty)
        after = plan_value(problem, x, penalty)
        assert after >= before
        if np.isfinite(after):
            if not soft:
                assert violations(problem, x) == []
            mended += violations(problem, start) != [] and after > before
            optimum = scipy_milp(problem, soft_penalty=penalty)
            assert optimum is not None and after <= optimum + 1e-7 * max(1.0, abs(optimum))
            assert after == pytest.approx(value(problem, x, soft_penalty=penalty))
    assert mended >= 10


def test_mends_a_large_round_from_band_prices_close_to_their_bound():
    """20,000 x 32 with one expert size (budgets cap some clients below their capacity): the
    clients' best sets under band prices miss the band, and moves within the size mend it;
    the plan keeps every row and is within 0.5 % of the bound.  (Where sizes differ and a whole
    size class is short, single moves cannot mend it: the slot flow is the fallback there.)"""
    base = random_problem(20_000, 32, seed=5, budget=True)
    affordable = np.random.default_rng(5).integers(1, base.capacity + 1)
    fair = affordable.sum() / 32
    problem = AlignmentProblem(fitness=base.fitness, capacity=base.capacity, min_experts=1,
                               expert_min_load=math.floor(0.9 * fair), expert_max_load=math.ceil(1.1 * fair),
                               usage=np.full(32, 2.0), budget=2.0 * affordable)
    prices = knapsack.band_prices(problem, deadline=math.inf, max_iterations=30)
    _, reference = min(prices.references, key=lambda r: r[0])
    assert violations(problem, reference) != []
    x = rebalance.rebalance(problem, reference)
    assert violations(problem, x) == []
    assert (prices.bound - value(problem, x)) / prices.bound < 0.005


def test_is_deterministic():
    problem = random_problem(3000, 16, seed=2, budget=True)
    prices = knapsack.band_prices(problem, deadline=math.inf, max_iterations=10)
    _, reference = min(prices.references, key=lambda r: r[0])
    assert np.array_equal(rebalance.rebalance(problem, reference), rebalance.rebalance(problem, reference))
