"""Band prices over exact client knapsacks: each client's sets against enumeration, the bound
against scipy's MILP optimum (valid, hard and soft band) and against the LP (tighter where
budgets bind), and the warm start's plan against an independent constraint checker."""

import itertools
import math

import numpy as np
import pytest

from alignment_solver import AlignmentProblem, solve
from alignment_solver.backends.flow import FlowBackend
from alignment_solver.instances import random_problem
from alignment_solver.search import knapsack, prices

from .oracles import scipy_milp, value, violations


def _enumerated(v, u, B, low, cap):
    """Each client's best set by listing every subset."""
    C, E = v.shape
    best = np.full(C, -np.inf)
    for c in range(C):
        for n in range(int(low[c]), int(cap[c]) + 1):
            for s in itertools.combinations(range(E), n):
                s = list(s)
                if u[c, s].sum() <= B[c] and np.all(np.isfinite(v[c, s])):
                    best[c] = max(best[c], v[c, s].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_sets_match_enumeration(seed):
    rng = np.random.default_rng(seed)
    C, E = 40, int(rng.integers(2, 7))
    v = rng.normal(0.0, 1.0, (C, E))
    v[rng.random((C, E)) < 0.15] = -np.inf
    u = rng.integers(0, 5, (C, E)) if seed % 2 else np.broadcast_to(rng.integers(1, 5, E), (C, E)).copy()
    cap = rng.integers(1, 4, C)
    low = rng.integers(0, 2, C).clip(max=cap)
    B = rng.integers(0, 10, C)
    best, x = knapsack.best_sets(v, u, B, low, cap)
    want = _enumerated(v, u, B, low, cap)
    np.testing.assert_allclose(best, want)
    ok = np.isfinite(want)
    count, spend = x.sum(axis=1), (u * x).sum(axis=1)
    assert np.all((count[ok] >= low[ok]) & (count[ok] <= cap[ok]) & (spend[ok] <= B[ok]))
    np.testing.assert_allclose(np.where(x, v, 0.0).sum(axis=1)[ok], want[ok])
    assert not x[~ok].any()


def _budgeted(rng) -> AlignmentProblem:
    C, E = int(rng.integers(10, 40)), int(rng.integers(2, 7))
    cap = rng.integers(1, 4, C)
    fair = cap.sum() / E
    return AlignmentProblem(fitness=np.round(rng.normal(1.0, 1.0, (C, E)), 3), capacity=cap,
                            min_experts=rng.integers(0, 2, C).clip(max=cap),
                            expert_min_load=math.floor(0.7 * fair), expert_max_load=math.ceil(1.3 * fair),
                            usage=rng.choice([0.5, 1.0, 4 / 3, 2.5], size=E), budget=rng.uniform(1.0, 5.0, C),
                            allowed=rng.random((C, E)) < 0.9)


@pytest.mark.parametrize("soft", [False, True])
def test_the_bound_is_never_below_the_milp_optimum(soft):
    rng = np.random.default_rng(5 + soft)
    penalty = 1.5 if soft else None
    checked = 0
    while checked < 25:
        problem = _budgeted(rng)
        prices = knapsack.band_prices(problem, deadline=math.inf, soft_penalty=penalty, max_iterations=60)
        if prices is None:                       # a client with no set that fits: nothing to bound
            continue
        optimum = scipy_milp(problem, soft_penalty=penalty)
        if optimum is not None:
            assert prices.bound >= optimum - 1e-7 * max(1.0, abs(optimum))
        checked += 1


def test_non_integer_usage_without_a_small_denominator_is_left_to_the_budget_prices():
    problem = random_problem(30, 4, seed=0, budget=True)
    odd = AlignmentProblem(fitness=problem.fitness, capacity=problem.capacity, usage=problem.usage * math.pi,
                           budget=problem.budget * math.pi)
    assert knapsack.integer_budget(problem) is not None
    assert knapsack.integer_budget(odd) is None and knapsack.band_prices(odd, deadline=math.inf) is None


def test_where_budgets_bind_the_bound_is_well_below_the_lp_and_the_plan_near_it():
    """1,000 x 32 budgeted, seed 1 (not a benchmark instance): CBC proves the optimum 1,371.71;
    the LP bound is 1,409.59 (2.7 % above it)."""
    from .test_conformance import _lp_bound

    problem = random_problem(1000, 32, seed=1, budget=True)
    ws = prices.lagrangian(problem, FlowBackend().solve, deadline=math.inf, seed=0)
    lp = _lp_bound(problem)
    assert ws.stats["method"] == "band prices"
    assert violations(problem, ws.x) == []
    assert value(problem, ws.x) == pytest.approx(ws.value)
    assert 1371.70 <= ws.bound < lp - 0.02 * lp
    assert (ws.bound - ws.value) / ws.bound < 0.01


def test_solve_reports_the_band_price_bound_and_keeps_every_row():
    problem = random_problem(400, 16, seed=4, budget=True)
    for soft in (False, True):
        r = solve(problem, backend="cpsat", time_limit=1.5, soft=soft, options={"warm_start": "lagrangian"})
        assert r.has_solution and r.violations(band=not soft) == []
        assert r.stats["warm_start"]["method"] == "band prices"
        assert r.bound >= r.objective


@pytest.mark.parametrize("seed", range(6))
def test_candidate_columns_give_the_full_programmes_optimum(seed):
    """Many experts, few usage values: the programme runs on each value's ``cap`` best experts
    only, and must find the same best totals (and valid sets) as on every column."""
    rng = np.random.default_rng(100 + seed)
    C, E = 300, int(rng.integers(12, 40))
    v = rng.normal(0.0, 1.0, (C, E))
    v[rng.random((C, E)) < 0.2] = -np.inf
    sizes = rng.integers(0, 4, E)
    u = np.broadcast_to(sizes, (C, E)) if seed % 2 else np.where(rng.random((C, E)) < 0.1, sizes + 1, sizes)
    cap = rng.integers(1, 4, C)
    low = rng.integers(0, 2, C).clip(max=cap)
    B = rng.integers(0, 9, C)
    sets = knapsack.Knapsacks(u, B, low, cap)
    assert sets.columns < E
    best, x = sets.best(v)
    want, _ = knapsack._programme(v, u, B, low, cap)
    np.testing.assert_allclose(best, want)
    ok = np.isfinite(want)
    count, spend = x.sum(axis=1), (u * x).sum(axis=1)
    assert np.all((count[ok] >= low[ok]) & (count[ok] <= cap[ok]) & (spend[ok] <= B[ok]))
    np.testing.assert_allclose(np.where(x, v, 0.0).sum(axis=1)[ok], want[ok])
    shift = rng.normal(0.0, 0.3, E)
    np.testing.assert_allclose(sets.best(v, shift)[0], knapsack._programme(v - shift, u, B, low, cap)[0])


def test_prices_searched_on_a_sample_keep_the_bound_valid_and_the_answer_deterministic(monkeypatch):
    """Above SAMPLE_CLIENTS clients the search starts on a sample; bounds come from every client."""
    monkeypatch.setattr(knapsack, "SAMPLE_CLIENTS", 60)
    rng = np.random.default_rng(11)
    checked = 0
    while checked < 8:
        problem = _budgeted(rng)
        if problem.n_clients <= 60:
            problem = random_problem(int(rng.integers(80, 140)), int(rng.integers(3, 7)), seed=checked, budget=True)
        first = knapsack.band_prices(problem, deadline=math.inf, max_iterations=40, seed=3)
        if first is None:
            continue
        again = knapsack.band_prices(problem, deadline=math.inf, max_iterations=40, seed=3)
        assert first.stats["sample"]["clients"] == 60
        assert again.bound == first.bound
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(first.references, again.references))
        optimum = scipy_milp(problem)
        if optimum is not None:
            assert first.bound >= optimum - 1e-7 * max(1.0, abs(optimum))
        checked += 1
