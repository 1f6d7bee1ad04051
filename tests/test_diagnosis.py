"""Infeasible problems: a status, never an exception, with the offending ids in words."""

import numpy as np
import pytest

from alignment_solver import AlignmentProblem, SolveStatus, solve

from .conftest import backends_for


def statuses(problem, **kw):
    return {b: solve(problem, backend=b, **kw) for b in backends_for(problem)}


def test_experts_nobody_may_take_are_named():
    allowed = np.ones((6, 4), bool)
    allowed[:, [1, 3]] = False
    allowed[0, 3] = True
    p = AlignmentProblem(fitness=np.ones((6, 4)), capacity=2, expert_min_load=2, allowed=allowed,
                         expert_ids=["e0", "e1", "e2", "e3"])
    for backend, r in statuses(p).items():
        assert r.status is SolveStatus.INFEASIBLE, backend
        assert "['e1', 'e3']" in r.explanation and "need at least" in r.explanation


def test_hall_violation_found_by_the_min_cut():
    # experts 2 and 3 each need 3 clients, but only clients 0..2 may take them (capacity 1 each):
    # every single expert is reachable by enough clients, so only the cut explains it.
    allowed = np.ones((8, 4), bool)
    allowed[3:, 2:] = False
    p = AlignmentProblem(fitness=np.ones((8, 4)), capacity=1, expert_min_load=[0, 0, 3, 3], allowed=allowed)
    for backend, r in statuses(p).items():
        assert r.status is SolveStatus.INFEASIBLE, backend
    text = solve(p).explanation
    assert "experts [2, 3] need at least 6 clients" in text and "only 3 client slots" in text, text


def test_clients_that_cannot_meet_their_minimum_are_named():
    allowed = np.ones((4, 3), bool)
    allowed[2] = [True, False, False]
    p = AlignmentProblem(fitness=np.ones((4, 3)), capacity=2, min_experts=2, allowed=allowed,
                         client_ids=["a", "b", "c", "d"])
    for backend, r in statuses(p).items():
        assert r.status is SolveStatus.INFEASIBLE, backend
        assert "clients ['c'] must train at least [2] experts but are allowed only [1]" in r.explanation
    # soft mode cannot fix a client-side impossibility either
    assert solve(p, soft=True).status is SolveStatus.INFEASIBLE


def test_clients_overloading_capped_experts_are_named():
    p = AlignmentProblem(fitness=np.ones((5, 2)), capacity=1, min_experts=1, expert_max_load=[1, 2])
    r = solve(p)
    assert r.status is SolveStatus.INFEASIBLE
    assert "must train at least 5 experts in total but experts accept at most 3" in r.explanation


def test_budget_too_small_for_min_experts():
    p = AlignmentProblem(fitness=np.ones((3, 3)), capacity=2, min_experts=1, usage=[3, 4, 5], budget=[3, 2, 9])
    for backend, r in statuses(p).items():
        assert r.status is SolveStatus.INFEASIBLE, backend
        assert "clients [1] cannot fit min_experts within their budget" in r.explanation


def test_soft_mode_always_goes_ahead_and_reports_the_miss():
    # 4 clients with capacity 1 cannot give 3 experts 2 clients each: 2 units short at best.
    p = AlignmentProblem(fitness=np.arange(12.0).reshape(4, 3), capacity=1, min_experts=1, expert_min_load=2,
                         expert_max_load=2)
    for backend, r in statuses(p, soft=True).items():
        assert r.status is SolveStatus.OPTIMAL, backend
        assert r.load_shortfall.sum() == pytest.approx(2), backend
        assert r.load_excess.sum() == 0
        assert any("expert_min_load" in v for v in r.violations())
    hard = solve(p)
    assert hard.status is SolveStatus.INFEASIBLE
    assert "need at least 6 client slots in total but clients offer at most 4" in hard.explanation


def test_soft_penalty_trades_band_for_fitness():
    # one client, two experts; expert 0 wants a client (min load 1), but expert 1 fits far better.
    p = AlignmentProblem(fitness=[[0.0, 10.0]], capacity=1, expert_min_load=[1, 0])
    cheap = solve(p, soft=True, soft_penalty=1.0)
    dear = solve(p, soft=True, soft_penalty=100.0)
    assert cheap.experts_of(0) == [1] and cheap.load_shortfall.tolist() == [1, 0]
    assert dear.experts_of(0) == [0] and dear.load_shortfall.sum() == 0
    assert cheap.objective == pytest.approx(10.0 - 1.0)
