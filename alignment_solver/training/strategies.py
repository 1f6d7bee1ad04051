"""Alignment strategies compared by the training loop, all planned through the coordinator.

Each baseline is an ``assign(problem) -> (C, E) bool`` rule handed to
``AlignmentCoordinator.plan_round``; the aligned strategies let the coordinator solve.

- ``random``: each client its ``capacity`` experts uniformly at random.
- ``greedy``: each client its top-``capacity`` experts by fitness (the FedMoE-style baseline),
  skipping those with negative fitness (below the coordinator's ``expert_cost``) beyond ``min_experts``.
- ``greedy_sticky``: greedy on the problem's objective, fitness minus ``switch_penalty`` for every
  expert the client did not hold last round (new clients pay it for every expert).
- ``round_robin``: experts dealt out in turn across clients (load only, fitness ignored).
- ``aligned``: the exact flow solve with the load band.
- ``aligned_budget``: the same with per-client memory budgets (budget rows, CP-SAT).

Two bounds that a real server could not run, for reference:

- ``oracle``: each client the experts of its true domains (domain ``d`` -> expert ``d mod E``,
  largest domain first, up to its capacity).
- ``fedavg``: every client trains expert 0 only (single-expert FedAvg).

And what Flower users run today: ``dense``, every available client trains the whole MoE (every
expert and the global gate), weighted FedAvg; bytes and device time grow with the number of experts.

Fitness ties are broken by the coordinator (``CoordinatorConfig.tie_break``) before any rule sees
the problem, so every fitness-driven strategy of a seed breaks them with the same draws.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..problem import AlignmentProblem

STRATEGIES = ("random", "greedy", "round_robin", "aligned", "aligned_budget", "oracle", "fedavg", "greedy_sticky",
              "dense")
FITNESS_DRIVEN = ("greedy", "greedy_sticky", "aligned", "aligned_budget")

Assign = Callable[[AlignmentProblem], np.ndarray]


def make_assign(name: str, rng: np.random.Generator,
                domains: Optional[dict[object, list[int]]] = None) -> Optional[Assign]:
    """The rule for strategy ``name`` (None: the coordinator's own solve).  ``oracle`` needs
    ``domains``: each client id's true domains, largest first."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}; got {name!r}")
    if name in ("aligned", "aligned_budget"):
        return None
    if name == "oracle" and domains is None:
        raise ValueError("strategy 'oracle' needs each client's true domains (a dataset with domains)")
    pointer = [0]

    def random(problem: AlignmentProblem) -> np.ndarray:
        score = np.where(problem.allowed_matrix, rng.random(problem.fitness.shape), -np.inf)
        return _top(score, problem.capacity_array)

    def greedy(problem: AlignmentProblem) -> np.ndarray:
        score = np.where(problem.allowed_matrix, problem.fitness, -np.inf)
        top = _top(score, problem.capacity_array)
        keep = _top(score, problem.min_experts_array) | (score >= 0)      # negative fitness: not worth its cost
        return top & keep

    def greedy_sticky(problem: AlignmentProblem) -> np.ndarray:
        score = np.where(problem.allowed_matrix, problem.objective_matrix, -np.inf)
        top = _top(score, problem.capacity_array)
        return top & (_top(score, problem.min_experts_array) | (score >= 0))

    def dense(problem: AlignmentProblem) -> np.ndarray:
        return problem.allowed_matrix.copy()

    def round_robin(problem: AlignmentProblem) -> np.ndarray:
        C, E = problem.fitness.shape
        x = np.zeros((C, E), dtype=bool)
        for c, k in enumerate(problem.capacity_array):
            for _ in range(min(int(k), E)):
                x[c, pointer[0] % E] = True
                pointer[0] += 1
        return x

    def oracle(problem: AlignmentProblem) -> np.ndarray:
        C, E = problem.fitness.shape
        x = np.zeros((C, E), dtype=bool)
        for c, (cid, k) in enumerate(zip(problem.client_ids or range(C), problem.capacity_array)):
            for e in list(dict.fromkeys(d % E for d in domains[cid]))[:int(k)]:
                x[c, e] = True
        return x

    def fedavg(problem: AlignmentProblem) -> np.ndarray:
        x = np.zeros(problem.fitness.shape, dtype=bool)
        x[:, 0] = problem.capacity_array > 0
        return x

    return {"random": random, "greedy": greedy, "greedy_sticky": greedy_sticky, "round_robin": round_robin,
            "oracle": oracle, "fedavg": fedavg, "dense": dense}[name]


def _top(score: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    order = np.argsort(-score, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(score.shape[1])[None, :], axis=1)
    return (ranks < capacity[:, None]) & np.isfinite(score)
