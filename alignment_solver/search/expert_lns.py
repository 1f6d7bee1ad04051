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
the priced fitness ``score``, of a random freed client.  ``k`` starts at 2; after ``2 E / k``
steps in a row without gain it grows by one if CP-SAT proved at least half of the steps at this
``k`` optimal (and ``k < MAX_EXPERTS``), else it starts again at 2; a step whose sub-problem would
exceed ``MAX_PAIRS`` pairs keeps fewer experts.  ``THREADS`` steps run at once on sub-problems
that share no expert and no client (CP-SAT releases the GIL), and their plans are applied in
turn.  A step's plan is taken when the full objective does not fall (ties move the search on)
and the best plan is returned: it keeps every hard row and is never worse than the start.
Randomness: a ``numpy`` Generator seeded by the caller; deterministic for a seed when no step
hits its time limit.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from ..problem import AlignmentProblem
from ..request import Solver, SolveRequest
from .values import plan_value

MAX_EXPERTS = 12        # experts freed per step at most
MAX_PAIRS = 4000        # pairs in one sub-problem at most
STEP_LIMIT = 0.2        # CP-SAT's time limit per step, seconds
THREADS = 2             # sub-problems solved at once (fixed, so a seed gives one plan on every machine)
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


def _experts(x: np.ndarray, score: np.ndarray, k: int, rng: np.random.Generator,
             free: Optional[np.ndarray] = None) -> np.ndarray:
    """Up to ``k`` distinct experts among ``free`` (a mask; default all), sorted (see the module
    docstring); empty when none is free."""
    free = np.ones(x.shape[1], dtype=bool) if free is None else free.copy()
    pool = np.flatnonzero(free)
    if not len(pool):
        return pool
    k = min(k, len(pool))
    chosen = [int(rng.choice(pool))]
    free[chosen[0]] = False
    while len(chosen) < k:
        clients = np.flatnonzero(x[:, chosen].any(axis=1))
        if len(clients) * (len(chosen) + 1) > MAX_PAIRS:
            break
        e = -1
        if len(clients) and rng.random() < 0.5:
            alt = np.where(free, score[int(rng.choice(clients))], -np.inf)
            e = int(np.argmax(alt)) if np.isfinite(alt.max()) else -1
        if e < 0:
            e = int(rng.choice(np.flatnonzero(free)))
        chosen.append(e)
        free[e] = False
    return np.array(sorted(chosen))


def _round(problem: AlignmentProblem, x: np.ndarray, score: np.ndarray, k: int, rng: np.random.Generator,
           n: int) -> list[tuple[np.ndarray, np.ndarray, AlignmentProblem]]:
    """Up to ``n`` steps' ``(clients, experts, sub-problem)`` of plan ``x`` that share no expert
    and no client, so that their plans can be applied one after the other; every step after the
    first frees at least two experts."""
    free = np.ones(x.shape[1], dtype=bool)
    out = []
    while len(out) < n:
        experts = _experts(x, score, k, rng, free)
        if len(experts) < (2 if out else 1):
            break
        clients, sub = sub_problem(problem, x, experts)
        out.append((clients, experts, sub))
        free[experts] = False
        free &= ~x[clients].any(axis=0)
    return out


def improve(problem: AlignmentProblem, x: np.ndarray, solve: Solver, *, deadline: float, seed: int, score: np.ndarray,
            soft_penalty: Optional[float] = None, bound: float = np.inf,
            report: Optional[Callable[[np.ndarray], None]] = None,
            max_steps: Optional[int] = None, step_limit: float = STEP_LIMIT,
            threads: int = THREADS) -> tuple[np.ndarray, dict]:
    """The best plan found from ``x`` (which keeps every hard row) until ``deadline``,
    ``max_steps`` or the plan reaches ``bound``; and ``{"steps", "improved", "seconds"}``.
    Each CP-SAT step may take ``step_limit`` seconds; up to ``threads`` steps run at once on
    sub-problems that share no expert and no client.
    ``score``: (C, E) priced fitness that ranks the related experts.  ``solve`` is CP-SAT on a
    sub-problem's whole model (the hint in ``request.options["hint"]``).  Each better plan goes to
    ``report``."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = np.array(x, dtype=bool)
    score = np.where(problem.allowed_matrix, score, -np.inf)
    value = plan_value(problem, x, soft_penalty)
    best, best_value = x, value
    E = problem.n_experts
    threads = max(1, threads)
    k, idle, steps, improved, proven, tried = 2, 0, 0, 0, 0, 0
    open_gap = (lambda: best_value < bound - 1e-9 * max(1.0, abs(bound))) if np.isfinite(bound) else (lambda: True)

    def step(sub: AlignmentProblem, hint: np.ndarray):
        limit = min(step_limit, deadline - time.perf_counter())
        request = SolveRequest(time_limit=limit, deadline=time.perf_counter() + limit, seed=seed,
                               soft=soft_penalty is not None,
                               soft_penalty=1.0 if soft_penalty is None else soft_penalty,
                               options={"workers": 1, "hint": hint})
        return solve(sub, request)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        while (np.isfinite(value) and E > 1 and deadline - time.perf_counter() > MIN_STEP
               and steps != max_steps and open_gap()):
            n = threads if max_steps is None else min(threads, max_steps - steps)
            jobs = []
            for clients, experts, sub in _round(problem, x, score, k, rng, n):
                pick = np.ix_(clients, experts)
                jobs.append((pick, pool.submit(step, sub, x[pick])))
            for pick, job in jobs:
                steps += 1
                res = job.result()
                tried += 1
                proven += res.stats.get("cp_sat_status") == "OPTIMAL"
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
                grow = k < MAX_EXPERTS and 2 * proven >= tried
                k, idle, proven, tried = (k + 1 if grow else 2), 0, 0, 0
    return best, {"steps": steps, "improved": improved, "seconds": time.perf_counter() - started}
