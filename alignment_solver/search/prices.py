"""Lagrangian warm starts (used by ``cpsat`` at scale and under time limits).

:func:`lagrangian`, for budgeted count-load problems: first the band prices of :mod:`.knapsack`
where they apply (a tighter bound; their clients' sets are the slot references), else:

Folding the budget rows into the costs with prices ``lam[c] >= 0`` leaves a count-load problem
that the flow backend solves exactly, and each answer bounds the budgeted optimum::

    UB(lam) = max_x sum_ce (G[c,e] - lam[c] usage[c,e]) x[c,e]  +  sum_c lam[c] budget[c]

(its minimum over ``lam`` is the LP bound: the flow polytope is integral).  Prices follow
Polyak subgradient steps.  The primal side is exact too: the best relaxed answer fixes each
client's budget slots (:mod:`alignment_solver.formulations.slots`) and one min-cost flow over
the slot network returns the best assignment that fits every budget within those slots.

:func:`row_lagrangian`, for any problem (weighted loads too): prices on every expert load row
and budget row leave one independent choice per client (its ``min_experts`` best pairs, then
more up to its capacity while they gain), so each price vector gives a bound in O(C E)::

    UB(nu, lam) = sum_c best_c(G - nu w - lam usage) + sum_e (nu+_e U_e - nu-_e L_e) + sum_c lam_c budget_c

valid for ``lam >= 0`` and any ``nu`` (``nu+``/``nu-`` its positive/negative parts; in soft mode
``|nu| <= soft_penalty``).  The primal side is the greedy heuristic run on the priced fitness
under the real constraints, keeping the best plan by the true objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..formulations.flow import count_band, penalty_for
from ..formulations.slots import chain_arcs, choose_slots, cover_demand, levels_of
from ..problem import AlignmentProblem
from ..request import Solver, SolveRequest
from ..result import SolveStatus
from . import knapsack, rebalance
from .bands import BandRows
from .greedy import complete
from .values import plan_value

PRIMAL_TRIES = 3        # relaxed answers (lowest bounds first) tried as slot references
SLOT_ARCS = 1_000_000   # above this many allowed pairs the slot flow runs only within the warm start's share


@dataclass
class WarmStart:
    x: Optional[np.ndarray] = None       # best assignment that satisfies every constraint
    value: float = -np.inf               # its objective
    bound: float = np.inf                # best Lagrangian upper bound
    prices: Optional[np.ndarray] = None  # budget prices at the best bound
    reference: Optional[np.ndarray] = None  # the relaxed answer at the best bound (may break rows)
    stats: dict = field(default_factory=dict)


def applies(problem: AlignmentProblem) -> bool:
    return problem.has_budget and problem.weight_matrix is None


def _pick(score: np.ndarray, low: np.ndarray, cap: np.ndarray) -> tuple[np.ndarray, float]:
    """Each client's best choice alone: its ``low`` best pairs, then more up to ``cap`` while > 0."""
    C, E = score.shape
    top = int(cap.max(initial=0))
    if top == 0:
        return np.zeros((C, E), dtype=bool), 0.0
    idx = np.argpartition(-score, top - 1, axis=1)[:, :top] if top < E else np.tile(np.arange(E), (C, 1))
    vals = np.take_along_axis(score, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
    j = np.arange(idx.shape[1])[None, :]
    take = ((j < low[:, None]) | ((j < cap[:, None]) & (vals > 0))) & np.isfinite(vals)
    x = np.zeros((C, E), dtype=bool)
    x[np.nonzero(take)[0], idx[take]] = True
    return x, float(vals[take].sum())


def priced(problem: AlignmentProblem, load_prices: np.ndarray, budget_prices: Optional[np.ndarray],
           G: Optional[np.ndarray] = None) -> np.ndarray:
    """``G - nu w - lam usage``: the fitness net of load prices ``nu`` (E,) and budget prices ``lam`` (C,)."""
    G = problem.objective_matrix if G is None else G
    w = problem.weight_matrix
    score = G - (load_prices[None, :] if w is None else load_prices[None, :] * w)
    if problem.usage_matrix is not None and budget_prices is not None:
        score = score - budget_prices[:, None] * problem.usage_matrix
    return score


def repair(problem: AlignmentProblem, x: np.ndarray, score: np.ndarray, deadline: Optional[float] = None) -> np.ndarray:
    """A plan near the relaxed answer ``x``: over-full experts shed the clients that lose least
    by leaving (``score`` against their best other expert), over-budget clients their lowest-score
    pairs; then the greedy completion (ranked by ``score``) refills under-full experts and clients."""
    x = x.copy()
    w = problem.weight_matrix
    load = x.sum(axis=0).astype(float) if w is None else (w * x).sum(axis=0)
    over = np.flatnonzero(load > problem.max_load_array + 1e-9)
    if len(over):
        alt = np.where(x, -np.inf, score).max(axis=1)
        for e in over:
            held = np.flatnonzero(x[:, e])
            held = held[np.argsort(score[held, e] - alt[held], kind="stable")]
            weights = np.ones(len(held)) if w is None else w[held, e]
            n = int(np.searchsorted(np.cumsum(weights), load[e] - problem.max_load_array[e] - 1e-9)) + 1
            x[held[:n], e] = False
    if problem.usage_matrix is not None:
        u = problem.usage_matrix
        while True:
            bad = np.flatnonzero((u * x).sum(axis=1) > problem.budget + 1e-9)
            if not len(bad):
                break
            worst = np.where(x[bad], score[bad], np.inf).argmin(axis=1)
            x[bad, worst] = False
    return complete(problem, start=x, deadline=deadline, score=score)


def row_lagrangian(problem: AlignmentProblem, *, deadline: float, soft_penalty: Optional[float] = None,
                   max_iterations: int = 2000, primal_deadline: Optional[float] = None) -> WarmStart:
    """Subgradient search on load and budget prices until ``deadline`` (see the module docstring),
    then a last primal round at the best prices, which may run until ``primal_deadline``.

    ``soft_penalty`` None: hard band.  ``WarmStart.prices`` holds the budget prices (zeros without
    budgets) and ``stats["load_prices"]`` the load prices at the best bound.
    """
    started = time.perf_counter()
    G = np.where(problem.allowed_matrix, problem.objective_matrix, -np.inf)
    w = problem.weight_matrix
    u, B = problem.usage_matrix, problem.budget
    band = BandRows(problem, soft_penalty)
    low, cap = problem.min_experts_array, problem.capacity_array
    C, E = G.shape
    nu, lam = np.zeros(E), np.zeros(C)
    best = WarmStart(prices=lam.copy())
    best_nu = nu.copy()
    theta, stall, it, primal_due = 2.0, 0, 0, 1
    for it in range(1, max_iterations + 1):
        score = priced(problem, nu, lam, G)
        x, value = _pick(score, low, cap)
        ub = value + band.constant(nu) + (0.0 if B is None else float(lam @ B))
        ub += 1e-9 * max(1.0, abs(ub))                   # floating-point margin: the bound stays valid
        if ub < best.bound:
            best.bound, best.prices, best_nu, best.reference, stall = ub, lam.copy(), nu.copy(), x, 0
        else:
            stall += 1
            if stall >= 3:
                theta, stall = theta / 2, 0
        if it == primal_due:
            primal_due *= 2
            _keep_best(problem, best, (complete(problem, deadline=deadline, score=score),
                                       repair(problem, x, score, deadline)), soft_penalty)
        if time.perf_counter() > deadline or best.bound - best.value <= 1e-9 * max(1.0, abs(best.bound)):
            break
        load = x.sum(axis=0) if w is None else (w * x).sum(axis=0)
        g = band.subgradient(nu, load)
        gb = np.zeros(C) if u is None else (u * x).sum(axis=1) - B
        gb = np.where((lam <= 0) & (gb < 0), 0.0, gb)
        norm = float(g @ g + gb @ gb)
        if norm == 0:
            break
        target = best.value if np.isfinite(best.value) else best.bound - 0.015 * abs(best.bound)
        step = theta * max(ub - target, 1e-9 * max(1.0, abs(ub))) / norm
        nu = band.step(nu, g, step)
        if u is not None:
            lam = np.maximum(0.0, lam + step * gb)
    if best.reference is not None:
        score = priced(problem, best_nu, best.prices, G)
        _keep_best(problem, best, (repair(problem, best.reference, score, primal_deadline),), soft_penalty)
    best.stats = {"iterations": it, "seconds": time.perf_counter() - started, "load_prices": best_nu}
    return best


def _keep_best(problem: AlignmentProblem, best: WarmStart, plans, soft_penalty: Optional[float]) -> None:
    for plan in plans:
        v = plan_value(problem, plan, soft_penalty)
        if v > best.value:
            best.x, best.value = plan, v


def _relaxed(problem: AlignmentProblem, lam: np.ndarray) -> AlignmentProblem:
    return AlignmentProblem(fitness=problem.objective_matrix - lam[:, None] * problem.usage_matrix,
                            capacity=problem.capacity_array, min_experts=problem.min_experts_array,
                            expert_min_load=problem.min_load_array, expert_max_load=problem.max_load_array,
                            allowed=problem.allowed)


def slot_primal(problem: AlignmentProblem, reference: np.ndarray, soft: bool = False) -> Optional[np.ndarray]:
    """Best budget-feasible assignment within the slots chosen around ``reference`` (``soft``: the
    load band may be missed, at the flow's band price)."""
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
    ok = (np.all(count >= problem.min_experts_array) and (soft or (np.all(load >= L) and np.all(load <= U)))
          and np.all((usage * x).sum(axis=1) <= problem.budget + 1e-9))
    return x if ok else None


def lagrangian(problem: AlignmentProblem, flow: Solver, *, deadline: float, seed: int, max_iterations: int = 30,
               soft_penalty: Optional[float] = None, primal_deadline: float = np.inf) -> WarmStart:
    """Subgradient search on the budget prices until ``deadline``, then the slot primal
    (``soft_penalty``: a soft band priced at it; None: hard band).  ``flow`` solves each relaxed
    count-load problem exactly (the ``flow`` backend's ``solve``).

    Where :mod:`.knapsack` applies, its band prices come first instead: the best-bound clients'
    sets are the references, each repaired by :func:`.rebalance.rebalance` (moves within the
    band; it stops at ``primal_deadline``); where that still misses the band (soft mode too),
    the slot flow also runs (it can change how a client spends its budget; above ``SLOT_ARCS``
    allowed pairs only while the warm start's share lasts) and the better plan is kept.  The
    band-price bound is reported; the budget prices run only if no reference gives a plan.
    """
    knap = knapsack.band_prices(problem, deadline=deadline, soft_penalty=soft_penalty, seed=seed)
    if knap is not None:
        small = int(problem.allowed_matrix.sum()) <= SLOT_ARCS
        tried = 0
        for _, reference in sorted(knap.references, key=lambda r: r[0])[:PRIMAL_TRIES]:
            tried += 1
            x = rebalance.rebalance(problem, reference, soft_penalty=soft_penalty, deadline=primal_deadline)
            value, method = plan_value(problem, x, soft_penalty), "rebalance"
            hard = value if soft_penalty is None else plan_value(problem, x, None)   # the band, not only its price
            if not np.isfinite(hard) and (small or time.perf_counter() <= deadline):  # slot flow: slow above SLOT_ARCS
                y = slot_primal(problem, reference, soft=soft_penalty is not None)
                v = -np.inf if y is None else plan_value(problem, y, soft_penalty)
                if v > value:
                    x, value, method = y, v, "slot flow"
            if np.isfinite(value):
                return WarmStart(x=x, value=value, bound=knap.bound, prices=np.zeros(problem.n_clients),
                                 reference=reference, stats={"method": "band prices", **knap.stats,
                                                             "primal": method, "primal_tries": tried})
    priced = _flow_lagrangian(problem, flow, deadline=deadline, seed=seed, max_iterations=max_iterations,
                              soft_penalty=soft_penalty)
    if knap is not None and knap.bound < priced.bound:
        priced.bound = knap.bound
    return priced


def _flow_lagrangian(problem: AlignmentProblem, flow: Solver, *, deadline: float, seed: int, max_iterations: int,
                     soft_penalty: Optional[float]) -> WarmStart:
    usage, budget = problem.usage_matrix, problem.budget
    lam = np.zeros(problem.n_clients)
    best = WarmStart(prices=lam.copy())
    references: list[tuple[float, np.ndarray]] = []      # relaxed answers by their bound
    theta, stall, it = 1.0, 0, 0
    started = time.perf_counter()
    for it in range(1, max_iterations + 1):
        relaxed = _relaxed(problem, lam)
        price = soft_penalty if soft_penalty is not None else penalty_for(relaxed.n_experts, relaxed.max_abs_objective)
        res = flow(relaxed, SolveRequest(time_limit=None, seed=seed, soft=soft_penalty is not None,
                                               soft_penalty=price))
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
                best.x, best.value = x, plan_value(problem, x, soft_penalty)
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
        x = slot_primal(problem, reference, soft=soft_penalty is not None)
        if x is not None:
            best.x, best.value = x, plan_value(problem, x, soft_penalty)
    best.stats = {"method": "budget prices", "iterations": it, "primal_tries": tried,
                  "seconds": time.perf_counter() - started}
    return best
