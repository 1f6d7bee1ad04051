"""``flow``: exact solve of count-load problems with OR-Tools' min-cost flow.

Polynomial and exact (the constraint matrix is totally unimodular).  Large instances are solved
on each client's best ``candidates`` experts, ranked by fitness plus expert prices estimated
from a sample of clients, then proven optimal for the FULL instance by the certificate in
:mod:`alignment_solver.formulations.flow`; arcs that the certificate finds improving are added
and the flow is solved again, until the proof holds.  Costs are scaled to int64 for OR-Tools;
the reported ``bound`` accounts for that rounding (``stats["tolerance"]`` per node).
Deterministic for a given seed (the sample); no worker threads.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from ..formulations.flow import FlowNetwork, penalty_for, top_candidates
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from .base import Backend, SolveRequest

FULL_ARCS = 200_000   # below this many allowed arcs, solve on all of them at once


class FlowBackend(Backend):
    name = "flow"
    requires = ("ortools",)
    options = {
        "candidates": (8, "experts per client in the first candidate set (0: all allowed arcs)"),
        "max_rounds": (30, "candidate-enlargement rounds before falling back to every arc"),
    }

    def unsupported_reason(self, problem: AlignmentProblem) -> Optional[str]:
        if problem.weight_matrix is not None:
            return "it solves count loads only, and load_weight makes loads weighted (use 'cpsat' or a pulp backend)"
        if problem.has_budget:
            return "it cannot express budget rows (usage/budget); use 'cpsat' or a pulp backend"
        return None

    def check_option(self, name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"option {name!r} of backend 'flow' must be an integer >= 0; got {value!r}")
        return int(value)

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        t0 = time.perf_counter()
        net = FlowNetwork.from_problem(problem, request.soft_penalty)
        C, E = net.shape
        if np.any(net.lo > net.k):
            return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=time.perf_counter() - t0)
        scale = _cost_scale(net)
        tol = 4.0 / scale
        m = request.options.get("candidates", 8)
        cand: Optional[np.ndarray] = None
        if m and m < E and int(net.allowed.sum()) > FULL_ARCS:
            cand = _initial_candidates(net, m, np.random.default_rng(request.seed), scale)
        build = time.perf_counter() - t0
        rounds, proven, x = 0, False, None
        max_rounds = request.options.get("max_rounds", 30)
        while True:
            rounds += 1
            x = _solve_network(net, cand, scale)
            if x is None:
                break
            d = net.potentials(x, cand, tol)
            if d is None:
                break
            if cand is None:
                proven = True
                break
            improving = net.improving_arcs(x, cand, d, tol)
            if not improving.any():
                proven = True
                break
            cand = cand | improving
            out_of_time = request.time_limit is not None and time.perf_counter() - t0 > request.time_limit
            if out_of_time:
                break
            if rounds >= max_rounds:
                cand = None
        seconds = time.perf_counter() - t0 - build
        stats = {"rounds": rounds, "arcs": int(net.allowed.sum() if cand is None else cand.sum()),
                 "proven": proven, "tolerance": tol, "deterministic": True}
        if x is None:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=seconds,
                                   build_seconds=build, explanation="OR-Tools min-cost flow did not return an optimum",
                                   stats=stats)
        load = x.sum(axis=0)
        miss = int(np.maximum(net.L - load, 0).sum() + np.maximum(load - net.U, 0).sum())
        if miss and not request.soft:
            status = SolveStatus.INFEASIBLE if proven else SolveStatus.NO_SOLUTION_FOUND
            return AlignmentResult(problem, status, self.name, solve_seconds=seconds, build_seconds=build, stats=stats)
        result = AlignmentResult(problem, SolveStatus.OPTIMAL if proven else SolveStatus.FEASIBLE, self.name,
                                 assignment=x, solve_seconds=seconds, build_seconds=build, soft=request.soft,
                                 soft_penalty=net.penalty if request.soft else None, stats=stats)
        if proven:
            result.bound = result.objective + tol * (C + E + 2)
        return result


def _cost_scale(net: FlowNetwork) -> float:
    """Largest cost multiplier that keeps OR-Tools' internal cost scaling inside int64."""
    C, E = net.shape
    limit = float(2 ** 58 // (C + E + 3))
    biggest = max(net.penalty, (penalty_for(net.G, net.allowed) - 1.0) / (2 * (E + 2)), 1e-12)
    return limit / biggest


def _solve_network(net: FlowNetwork, cand: Optional[np.ndarray], scale: float) -> Optional[np.ndarray]:
    from ortools.graph.python import min_cost_flow

    pairs = np.nonzero(net.allowed if cand is None else cand)
    tails, heads, caps, costs, supplies, _ = net.arcs(pairs)
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, np.rint(costs * scale).astype(np.int64))
    smcf.set_nodes_supplies(np.arange(len(supplies)), supplies)
    if smcf.solve() != smcf.OPTIMAL:
        return None
    C = net.shape[0]
    return net.assignment(pairs, smcf.flows(arcs[C:C + len(pairs[0])]))


def _initial_candidates(net: FlowNetwork, m: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Each client's ``m`` best experts by fitness plus expert prices from a sampled solve."""
    C, E = net.shape
    n = min(C, max(2000, 20 * E))
    rows = np.sort(rng.choice(C, size=n, replace=False))
    frac = n / C
    sub = FlowNetwork(G=net.G[rows], allowed=net.allowed[rows], lo=net.lo[rows], k=net.k[rows],
                      L=np.floor(net.L * frac).astype(np.int64),
                      U=np.ceil(net.U * frac).astype(np.int64), penalty=net.penalty)
    prices = np.zeros(E)
    xs = _solve_network(sub, None, scale)
    if xs is not None:
        d = sub.potentials(xs, None, 4.0 / scale)
        if d is not None:
            prices = d[:E]
    cand = top_candidates(net.G + prices[None, :], net.allowed, m)
    needy = net.lo > m
    cand[needy] = net.allowed[needy]
    return cand
