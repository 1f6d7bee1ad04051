"""Expert-subset neighbourhood search: its sub-problem is the full problem on the freed pairs (the
objectives differ by a constant), and the search keeps every hard row, never returns a worse plan,
never passes the MILP optimum and is deterministic per seed; against an independent constraint
checker and scipy's milp."""

import math
from pathlib import Path

import numpy as np
import pytest

from alignment_solver import AlignmentProblem, solve
from alignment_solver.backends.cpsat import CpSatBackend
from alignment_solver.instances import read_orlib_gap
from alignment_solver.request import SolveRequest
from alignment_solver.search import expert_lns, local, prices
from alignment_solver.search.pipeline import sub_solver

from .oracles import scipy_milp, value, violations

CPSAT = sub_solver(CpSatBackend()._run)     # CP-SAT on sub-problems, as the pipeline passes it

ORLIB = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "orlib-gap"


def _weighted(rng, budget):
    C, E = int(rng.integers(12, 30)), int(rng.integers(3, 7))
    cap = rng.integers(1, 3, C)
    w = np.round(rng.uniform(0.5, 3.0, (C, E)), 2)
    fair = float((cap * w.mean(axis=1)).sum()) / E
    fields = dict(usage=rng.choice([1.0, 1.5, 2.0], size=(C, E)), budget=rng.choice([2.0, 3.5], size=C)) if budget else {}
    return AlignmentProblem(fitness=np.round(rng.normal(1.0, 1.0, (C, E)), 3), capacity=cap,
                            min_experts=rng.integers(0, 2, C).clip(max=cap), load_weight=w,
                            expert_min_load=0.5 * fair, expert_max_load=1.4 * fair,
                            allowed=rng.random((C, E)) < 0.9, **fields)


def _start(problem, penalty, iterations=200):
    ws = prices.row_lagrangian(problem, deadline=math.inf, soft_penalty=penalty, max_iterations=iterations)
    score = prices.priced(problem, ws.stats["load_prices"], ws.prices)
    return ws.x, score


def _cases(rng, n, penalty):
    """(problem, start plan, priced fitness) for those of ``n`` random instances with a start plan."""
    for _ in range(n):
        problem = _weighted(rng, budget=bool(rng.integers(2)))
        x, score = _start(problem, penalty)
        if x is not None:
            yield problem, x, score


@pytest.mark.parametrize("soft", [False, True])
def test_sub_problem_differs_from_the_full_problem_by_a_constant(soft):
    rng = np.random.default_rng(3 + soft)
    penalty = 1.5 if soft else None
    checked = 0
    for problem, x, _ in _cases(rng, 30, penalty):
        experts = np.sort(rng.choice(problem.n_experts, 2, replace=False))
        clients, sub = expert_lns.sub_problem(problem, x, experts)
        assert set(clients.tolist()) == set(np.flatnonzero(x[:, experts].any(axis=1)).tolist())
        pick = np.ix_(clients, experts)
        own = x[pick]
        best = solve(sub, backend="pulp_highs", **({"soft": True, "soft_penalty": penalty} if soft else {}))
        assert best.has_solution
        y = x.copy()
        y[pick] = best.assignment
        if not soft:
            assert violations(problem, y) == []
        full = value(problem, y, soft_penalty=penalty) - value(problem, x, soft_penalty=penalty)
        part = value(sub, best.assignment, soft_penalty=penalty) - value(sub, own, soft_penalty=penalty)
        assert full == pytest.approx(part, abs=1e-7)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("soft", [False, True])
def test_keeps_hard_rows_never_worsens_and_stays_below_the_optimum(soft):
    rng = np.random.default_rng(11 + soft)
    penalty = 1.5 if soft else None
    gained = 0
    for problem, x, score in _cases(rng, 25, penalty):
        y, info = expert_lns.improve(problem, x, CPSAT, deadline=math.inf, seed=0, score=score, soft_penalty=penalty,
                                      max_steps=40, step_limit=30.0)
        assert info["steps"] <= 40
        assert violations(problem, y, soft=soft) == []
        before, after = value(problem, x, soft_penalty=penalty), value(problem, y, soft_penalty=penalty)
        assert after >= before - 1e-9
        optimum = scipy_milp(problem, soft_penalty=penalty)
        assert optimum is not None and after <= optimum + 1e-7 * max(1.0, abs(optimum))
        gained += after > before + 1e-9
    assert gained >= 5


def test_is_deterministic_per_seed_and_stops_at_the_bound():
    problem = read_orlib_gap(ORLIB / "d10100.txt", "min")
    x, score = _start(problem, None, iterations=2000)
    assert x is not None
    x = local.improve(problem, x, deadline=math.inf)
    runs = [expert_lns.improve(problem, x, CPSAT, deadline=math.inf, seed=4, score=score, max_steps=20, step_limit=30.0)
            for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][1]["improved"] >= 1
    reached = value(problem, runs[0][0])
    _, info = expert_lns.improve(problem, runs[0][0], CPSAT, deadline=math.inf, seed=4, score=score,
                                  bound=reached, max_steps=20)
    assert info["steps"] == 0


def test_cpsat_under_a_time_limit_returns_a_valid_plan_and_bound_from_the_search():
    """OR-Library d10200 (min; optimum within 12426..12432), through the backend itself: the
    probe, then the expert-subset search; the plan keeps every row and the reported bound is
    valid, whatever the machine's load."""
    problem = read_orlib_gap(ORLIB / "d10200.txt", "min")
    result = CpSatBackend().solve(problem, SolveRequest(time_limit=3, seed=0, soft=False, soft_penalty=1.0))
    assert result.has_solution and violations(problem, result.assignment) == []
    assert result.objective <= -12426 + 1e-9 and result.bound >= -12432 - 1e-9
    assert result.stats["warm_start"]["kind"] == "rows"
    # the probe and the search each run only if the limit leaves them time: on a busy machine the
    # warm start may take it all, so only what they produced is checked
    if result.stats.get("source") == "expert search":
        assert result.stats["expert_search"]["steps"] >= 1


def test_experts_come_from_the_free_mask_and_a_round_shares_no_expert_and_no_client():
    rng = np.random.default_rng(21)
    rounds = 0
    for problem, x, score in _cases(rng, 20, None):
        free = rng.random(problem.n_experts) < 0.6
        for k in (1, 2, 4):
            experts = expert_lns._experts(x, score, k, rng, free)
            assert len(experts) == min(k, int(free.sum()))
            assert free[experts].all() and np.array_equal(experts, np.unique(experts))
        for n in (1, 2, 3):
            steps = expert_lns._round(problem, x, score, 2, rng, n)
            assert 1 <= len(steps) <= n
            seen_clients, seen_experts = set(), set()
            for clients, experts, sub in steps:
                assert set(clients.tolist()) == set(np.flatnonzero(x[:, experts].any(axis=1)).tolist())
                assert sub.n_clients == len(clients) and sub.n_experts == len(experts)
                assert seen_clients.isdisjoint(clients.tolist()) and seen_experts.isdisjoint(experts.tolist())
                seen_clients |= set(clients.tolist())
                seen_experts |= set(experts.tolist())
            rounds += len(steps) > 1
    assert rounds >= 3
    problem = read_orlib_gap(ORLIB / "d10100.txt", "min")          # one expert per client: rounds of two
    x, score = _start(problem, None, iterations=2000)
    for k in (2, 3, 5):
        (c1, e1, _), (c2, e2, _) = expert_lns._round(problem, x, score, k, rng, 2)
        assert len(e1) == len(e2) == k and set(c1.tolist()).isdisjoint(c2.tolist())
