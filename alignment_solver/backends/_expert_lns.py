"""Expert-subset neighbourhood search for weighted rounds (used by ``cpsat`` under a time limit).

A very large-scale neighbourhood search in the manner of Mitrović-Minić and Punnen (2008) for the
generalised assignment problem.  Each step picks ``k`` experts, frees every pair the plan holds
on them, and lets CP-SAT (one worker, the current pairs as its hint) re-plan those pairs exactly
among the same experts; every other pair is kept.  The freed clients are all those holding one
of the ``k`` experts, so those experts' loads come from the freed clients alone and keep their
own band; each freed client keeps its other pairs and its rows less what they use.  In soft mode
the ``k`` experts' bands are priced as in the full problem, so the sub-objective differs from the
full objective by a constant.

Experts: the first at random, each next one at random or (even odds) the best other expert, by
the priced fitness ``score``, of a random freed client.  ``k`` starts at 2 and grows by one after
``2 E / k`` steps in a row without gain, back to 2 after ``MAX_EXPERTS``; a step whose
sub-problem would exceed ``MAX_PAIRS`` pairs keeps fewer experts.  A step's plan is taken when the
full objective does not fall (ties move the search on) and the best plan is returned: it keeps
every hard row and is never worse than the start.  Randomness: a ``numpy`` Generator seeded by
the caller; deterministic for a seed when no step hits its time limit.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ._lagrangian import plan_value
from .base import SolveRequest

MAX_EXPERTS = 6         # experts freed per step at most
MAX_PAIRS = 4000        # pairs in one sub-problem at most
STEP_LIMIT = 0.2        # CP-SAT's time limit per step, seconds
MIN_STEP = 0.02         # seconds a step needs at least to be worth starting


def sub_problem(problem: AlignmentProblem, x: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, AlignmentProblem]:
    """The clients holding one of ``experts`` in plan ``x`` and their sub-problem on those experts
    (their other pairs fixed: capacity, minimum and budget less what those pairs use)."""
    clients = np.flatnonzero(x[:, experts].any(axis=1))
    other = np.ones(problem.n_experts, dtype=bool)
    other[experts] = False
    kept = x[clients][:, other]
    held = kept.sum(axis=1)
    pick = np.ix_(clients, experts)
    fields = {}
    if problem.weight_matrix is not None:
        fields["load_weight"] = problem.weight_matrix[pick]
    if problem.usage_matrix is not None:
        spent = (problem.usage_matrix[clients][:, other] * kept).sum(axis=1)
        fields.update(usage=problem.usage_matrix[pick], budget=np.maximum(problem.budget[clients] - spent, 0.0))
    return clients, AlignmentProblem(
        fitness=problem.objective_matrix[pick], allowed=problem.allowed_matrix[pick],
        capacity=problem.capacity_array[clients] - held,
        min_experts=np.maximum(problem.min_experts_array[clients] - held, 0),
        expert_min_load=problem.min_load_array[experts], expert_max_load=problem.max_load_array[experts], **fields)


def _experts(x: np.ndarray, score: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k <= E`` distinct experts, sorted (see the module docstring)."""
    E = x.shape[1]
    chosen = [int(rng.integers(E))]
    while len(chosen) < k:
        clients = np.flatnonzero(x[:, chosen].any(axis=1))
        if len(clients) * (len(chosen) + 1) > MAX_PAIRS:
            break
        if len(clients) and rng.random() < 0.5:
            c = int(rng.choice(clients))
            alt = score[c].copy()
            alt[chosen] = -np.inf
            e = int(np.argmax(alt)) if np.isfinite(alt.max()) else int(rng.integers(E))
        else:
            e = int(rng.integers(E))
        if e not in chosen:
            chosen.append(e)
    return np.array(sorted(chosen))


def improve(problem: AlignmentProblem, x: np.ndarray, *, deadline: float, seed: int, score: np.ndarray,
            soft_penalty: Optional[float] = None, bound: float = np.inf,
            report: Optional[Callable[[np.ndarray], None]] = None,
            max_steps: Optional[int] = None, step_limit: float = STEP_LIMIT) -> tuple[np.ndarray, dict]:
    """The best plan found from ``x`` (which keeps every hard row) until ``deadline``,
    ``max_steps`` or the plan reaches ``bound``; and ``{"steps", "improved", "seconds"}``.
    Each CP-SAT step may take ``step_limit`` seconds.
    ``score``: (C, E) priced fitness that ranks the related experts.  Each better plan goes to
    ``report``."""
    from .cpsat import CpSatBackend

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = np.array(x, dtype=bool)
    score = np.where(problem.allowed_matrix, score, -np.inf)
    value = plan_value(problem, x, soft_penalty)
    best, best_value = x, value
    E = problem.n_experts
    backend = CpSatBackend()
    k, idle, steps, improved = 2, 0, 0, 0
    open_gap = (lambda: best_value < bound - 1e-9 * max(1.0, abs(bound))) if np.isfinite(bound) else (lambda: True)
    while (np.isfinite(value) and E > 1 and deadline - time.perf_counter() > MIN_STEP and steps != max_steps
           and open_gap()):
        steps += 1
        experts = _experts(x, score, min(k, E), rng)
        clients, sub = sub_problem(problem, x, experts)
        limit = min(step_limit, deadline - time.perf_counter())
        request = SolveRequest(time_limit=limit, deadline=time.perf_counter() + limit, seed=seed,
                               soft=soft_penalty is not None,
                               soft_penalty=1.0 if soft_penalty is None else soft_penalty,
                               options={"workers": 1})
        pick = np.ix_(clients, experts)
        res = backend._run(sub, LinearModel.from_problem(sub, soft_penalty), request, time.perf_counter(),
                           x[pick], limit)
        gained = False
        if res.has_solution:
            y = x.copy()
            y[pick] = res.assignment
            v = plan_value(problem, y, soft_penalty)
            if v >= value - 1e-9 * max(1.0, abs(value)):
                gained = v > value + 1e-9 * max(1.0, abs(value))
                x, value = y, v
            if v > best_value + 1e-9 * max(1.0, abs(best_value)):
                best, best_value, improved = y, v, improved + 1
                if report is not None:
                    report(best)
        idle = 0 if gained else idle + 1
        if idle > 2 * E // k:
            k, idle = (k + 1 if k < MAX_EXPERTS else 2), 0
    return best, {"steps": steps, "improved": improved, "seconds": time.perf_counter() - started}
