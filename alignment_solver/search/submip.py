"""Sub-MIP neighbourhood search for budgeted rounds (used by ``cpsat`` under a time limit).

Where budgets bind, the best plans move several pairs of several clients at once (one client
frees budget by trading an expert with another, then adds one); single-client moves miss them.
Each step frees a set of clients, keeps every other client's pairs, and lets CBC re-plan the
freed clients exactly: their own rows as given, and each expert's band less the load the kept
clients already bring.  In soft mode the residual band is priced like the full one, so the
sub-objective differs from the full objective by a constant.  A step's plan is kept only if the
full objective rises; the plan stays feasible and never gets worse.

The freed clients: every client up to ``CLIENTS`` (one step is then the exact problem); else a
third among clients with spare capacity, a third among those with the most budget left, a third
at random (a ``numpy`` Generator seeded by the caller).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from ..problem import AlignmentProblem
from ..request import Solver, SolveRequest
from .values import plan_value

CLIENTS = 120           # clients freed per step
STEP_LIMIT = 1.0        # CBC's time limit per step, seconds
MIN_STEP = 0.2          # seconds a step needs at least to be worth starting


def available() -> bool:
    """Whether PuLP (and so its bundled CBC) is installed; the search needs it."""
    import importlib.util

    return importlib.util.find_spec("pulp") is not None


def _freed(problem: AlignmentProblem, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    C = x.shape[0]
    if C <= CLIENTS:
        return np.arange(C)
    n = CLIENTS // 3
    spare = np.flatnonzero(x.sum(axis=1) < problem.capacity_array)
    left = problem.budget - (problem.usage_matrix * x).sum(axis=1)
    rich = np.argsort(-(left + 0.5 * rng.random(C)), kind="stable")
    return np.unique(np.r_[rng.permutation(spare)[:n], rich[:n], rng.choice(C, n, replace=False)])


def _sub(problem: AlignmentProblem, x: np.ndarray, rows: np.ndarray) -> AlignmentProblem:
    kept = np.ones(x.shape[0], dtype=bool)
    kept[rows] = False
    fixed = x[kept].sum(axis=0)
    return AlignmentProblem(fitness=problem.objective_matrix[rows], capacity=problem.capacity_array[rows],
                            min_experts=problem.min_experts_array[rows], usage=problem.usage_matrix[rows],
                            budget=problem.budget[rows], allowed=problem.allowed_matrix[rows],
                            expert_min_load=np.maximum(problem.min_load_array - fixed, 0),
                            expert_max_load=np.maximum(problem.max_load_array - fixed, 0))


def improve(problem: AlignmentProblem, x: np.ndarray, solve: Solver, *, deadline: float, seed: int,
            soft_penalty: Optional[float] = None, report: Optional[Callable[[np.ndarray], None]] = None,
            max_steps: Optional[int] = None, step_limit: float = STEP_LIMIT) -> tuple[np.ndarray, dict]:
    """A plan at least as good as ``x`` (budgeted, count loads, every hard row kept) and
    ``{"steps", "improved", "seconds"}``, after steps until ``deadline`` or ``max_steps``; each
    better plan is passed to ``report``.  ``solve`` is CBC's (the ``pulp_cbc`` backend's ``solve``).
    Deterministic for a seed when no step hits ``step_limit``."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = np.array(x, dtype=bool)
    if problem.usage_matrix is None or problem.weight_matrix is not None:
        raise ValueError("the sub-MIP search is for budgeted count-load problems")
    value = plan_value(problem, x, soft_penalty)
    steps = improved = 0
    while np.isfinite(value) and deadline - time.perf_counter() > MIN_STEP and steps != max_steps:
        steps += 1
        rows = _freed(problem, x, rng)
        limit = min(step_limit, deadline - time.perf_counter())
        res = solve(_sub(problem, x, rows),
                        SolveRequest(time_limit=limit, deadline=time.perf_counter() + limit, seed=seed,
                                     soft=soft_penalty is not None,
                                     soft_penalty=1.0 if soft_penalty is None else soft_penalty))
        if not res.has_solution:
            continue
        y = x.copy()
        y[rows] = res.assignment
        v = plan_value(problem, y, soft_penalty)
        if v > value + 1e-9 * max(1.0, abs(value)):
            x, value, improved = y, v, improved + 1
            if report is not None:
                report(x)
    return x, {"steps": steps, "improved": improved, "seconds": time.perf_counter() - started}
