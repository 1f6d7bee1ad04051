"""Lagrangian warm start for budgeted count-load problems (used by ``cpsat`` at scale).

Folding the budget rows into the costs with prices ``lam[c] >= 0`` leaves a count-load problem
that the flow backend solves exactly, and each answer bounds the budgeted optimum::

    UB(lam) = max_x sum_ce (G[c,e] - lam[c] usage[c,e]) x[c,e]  +  sum_c lam[c] budget[c]

(its minimum over ``lam`` is the LP bound: the flow polytope is integral).  Prices follow
Polyak subgradient steps.  The primal side is exact too: the best relaxed answer fixes each
client's budget slots (:mod:`alignment_solver.formulations.slots`) and one min-cost flow over
the slot network returns the best assignment that fits every budget within those slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..formulations.flow import count_band, penalty_for
from ..formulations.slots import chain_arcs, choose_slots, cover_demand, levels_of
from ..problem import AlignmentProblem
from ..result import SolveStatus
from .base import SolveRequest
from .flow import FlowBackend


PRIMAL_TRIES = 3        # relaxed answers (lowest bounds first) tried as slot references


@dataclass
class WarmStart:
    x: Optional[np.ndarray] = None       # best assignment that satisfies every constraint
    value: float = -np.inf               # its objective
    bound: float = np.inf                # best Lagrangian upper bound
    prices: Optional[np.ndarray] = None  # budget prices at the best bound
    stats: dict = field(default_factory=dict)


def applies(problem: AlignmentProblem) -> bool:
    return problem.has_budget and problem.weight_matrix is None


def _relaxed(problem: AlignmentProblem, lam: np.ndarray) -> AlignmentProblem:
    return AlignmentProblem(fitness=problem.objective_matrix - lam[:, None] * problem.usage_matrix,
                            capacity=problem.capacity_array, min_experts=problem.min_experts_array,
                            expert_min_load=problem.min_load_array, expert_max_load=problem.max_load_array,
                            allowed=problem.allowed)


def slot_primal(problem: AlignmentProblem, reference: np.ndarray) -> Optional[np.ndarray]:
    """Best budget-feasible assignment within the slots chosen around ``reference``."""
    from ortools.graph.python import min_cost_flow

    G, usage, allowed = problem.objective_matrix, problem.usage_matrix, problem.allowed_matrix
    levels, index = levels_of(usage, allowed)
    counts = choose_slots(reference, index, levels, problem.budget, problem.capacity_array)
    L, U = count_band(problem)
    expert_level = index.max(axis=0)                  # an expert needs a slot at least this large
    demand = np.array([L[expert_level >= v].sum() for v in range(len(levels))])
    counts = cover_demand(counts, levels, problem.budget, problem.min_experts_array, problem.capacity_array, demand)
    P = penalty_for(problem.n_experts, problem.max_abs_objective)
    pairs = np.nonzero(allowed)
    tails, heads, caps, costs, supplies, sl = chain_arcs(G, pairs, index, counts, problem.min_experts_array, L, U, P)
    scale = float(2 ** 58 // (len(supplies) + 1)) / max(P, 1e-12)
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, np.rint(costs * scale).astype(np.int64))
    smcf.set_nodes_supplies(np.arange(len(supplies)), supplies)
    if smcf.solve() != smcf.OPTIMAL:
        return None
    flows = smcf.flows(arcs[sl])
    x = np.zeros(G.shape, dtype=bool)
    x[pairs[0][flows > 0], pairs[1][flows > 0]] = True
    count, load = x.sum(axis=1), x.sum(axis=0)
    ok = (np.all(count >= problem.min_experts_array) and np.all(load >= L) and np.all(load <= U)
          and np.all((usage * x).sum(axis=1) <= problem.budget + 1e-9))
    return x if ok else None


def lagrangian(problem: AlignmentProblem, *, deadline: float, seed: int, max_iterations: int = 30) -> WarmStart:
    """Subgradient search on the budget prices until ``deadline``, then the slot primal."""
    usage, budget = problem.usage_matrix, problem.budget
    lam = np.zeros(problem.n_clients)
    flow = FlowBackend()
    best = WarmStart(prices=lam.copy())
    references: list[tuple[float, np.ndarray]] = []      # relaxed answers by their bound
    theta, stall, it = 1.0, 0, 0
    started = time.perf_counter()
    for it in range(1, max_iterations + 1):
        relaxed = _relaxed(problem, lam)
        res = flow.solve(relaxed, SolveRequest(time_limit=None, seed=seed, soft=False,
                                               soft_penalty=penalty_for(relaxed.n_experts, relaxed.max_abs_objective)))
        if res.status is not SolveStatus.OPTIMAL:
            break
        x = res.assignment
        ub = float(res.bound) + float(lam @ budget)
        references.append((ub, x))
        if ub < best.bound:
            best.bound, best.prices, stall = ub, lam.copy(), 0
        else:
            stall += 1
            if stall >= 2:
                theta, stall = theta / 2, 0
        g = (usage * x).sum(axis=1) - budget
        g = np.where((lam <= 0) & (g < 0), 0.0, g)
        norm = float(g @ g)
        if norm == 0:                          # relaxed answer fits every budget
            if float(lam @ -g) <= 1e-9:        # and complementary slackness holds: optimal
                best.x, best.value = x, float(problem.objective_matrix[x].sum())
            break
        per_iteration = (time.perf_counter() - started) / it
        if time.perf_counter() + 2 * per_iteration > deadline:
            break
        target = best.bound - 0.015 * abs(best.bound)         # Polyak step towards an estimate
        lam = np.maximum(0.0, lam + theta * (ub - target) / norm * g)
    tried = 0
    for _, reference in sorted(references, key=lambda r: r[0])[:PRIMAL_TRIES]:
        if best.x is not None:
            break
        tried += 1
        x = slot_primal(problem, reference)
        if x is not None:
            best.x, best.value = x, float(problem.objective_matrix[x].sum())
    best.stats = {"iterations": it, "primal_tries": tried, "seconds": time.perf_counter() - started}
    return best
