"""``flow``: exact solve of count-load problems with OR-Tools' min-cost flow.

Polynomial and exact (the constraint matrix is totally unimodular).  Small instances are solved
on every allowed arc.  Large ones (more than ``FULL_ARCS`` allowed arcs) use a working set:
expert prices come from an exact solve on a sample of clients; each client keeps its
``candidates`` best experts by fitness plus price; the clear-cut half of the clients is fixed
to its top choices and only the rest enter the network.  The certificate in
:mod:`alignment_solver.formulations.flow` then checks the answer against EVERY allowed arc of
the full instance; clients it finds improvable are activated with their improving arcs and the
network is solved again, until the proof holds (``stats["proven"]``).

Problems with per-group rows (``expert_group``) are solved on every allowed arc of the network
with client-group nodes (:func:`~alignment_solver.formulations.flow.grouped_arcs`): OR-Tools'
answer on the full instance is the proof.

Costs are scaled to int64 for OR-Tools; the reported ``bound`` accounts for the rounding
(``stats["tolerance"]`` per arc).  Deterministic for a given seed (the sample); single-threaded.
Under a time limit the deadline is checked between rounds and each round's plan is reported as
an incumbent; :mod:`alignment_solver.deadline` stops a round that runs past the limit, and a
result cut short says ``stats["deterministic"] = False``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from ..formulations.flow import FlowNetwork, _all, grouped_arcs
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from .base import Backend, SolveRequest

FULL_ARCS = 200_000   # below this many allowed arcs, solve on all of them at once
ACTIVE_SHARE = 0.5    # share of clients left in the network on large instances


class FlowBackend(Backend):
    name = "flow"
    requires = ("ortools",)
    options = {
        "candidates": (6, "experts per client in the first candidate set (0: all allowed arcs)"),
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
        net = FlowNetwork.from_problem(problem, request.soft_penalty, soft=request.soft)
        C, E = net.shape
        if np.any(net.lo > net.k):
            return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=time.perf_counter() - t0)
        if problem.has_groups:
            return self._solve_grouped(problem, net, request, t0)
        scale = _cost_scale(net)
        tol = 4.0 / scale
        m = request.options.get("candidates", 6)
        max_rounds = request.options.get("max_rounds", 30)
        large = bool(m) and m < E and int(net.allowed.sum()) > FULL_ARCS
        rounds, proven, x, cut = 0, False, None, False
        if large:
            cand, active, fixed_x = _working_set(net, m, np.random.default_rng(request.seed), scale)
        else:
            cand, active, fixed_x = net.allowed, np.ones(C, dtype=bool), np.zeros((C, E), dtype=bool)
        build = time.perf_counter() - t0
        while True:
            rounds += 1
            rows = np.flatnonzero(active)
            sub = net.restrict(rows, fixed_x.sum(axis=0)) if large else net
            xs = _solve_network(sub, cand[rows] if large else None, scale)
            if xs is None:
                break
            d = sub.potentials(xs, cand[rows] if large else None, tol)
            x = fixed_x.copy()
            x[rows] = xs
            if d is not None and not large:
                proven = True
            if d is None or not large:
                if large and not active.all():
                    active[:] = True          # a fixed client was wrong in a way the check cannot name
                    fixed_x[:] = False
                    continue
                break
            improving, bad = net.check(x, d, tol)
            if not bad.any():
                proven = True
                break
            if request.report is not None and (request.soft or not _misses(net, x)):
                request.report(x, None)
            cand = cand | improving
            newly = bad & ~active
            active |= newly
            fixed_x[newly] = False
            if request.deadline is not None and time.perf_counter() > request.deadline:
                cut = True
                break
            if rounds >= max_rounds:
                cand, active[:], fixed_x[:] = net.allowed, True, False
        seconds = time.perf_counter() - t0 - build
        stats = {"rounds": rounds, "arcs": int(cand.sum()), "active_clients": int(active.sum()),
                 "proven": proven, "tolerance": tol, "deterministic": not cut}
        if x is None:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=seconds,
                                   build_seconds=build, explanation="OR-Tools min-cost flow did not return an optimum",
                                   stats=stats)
        if _misses(net, x) and not request.soft:
            status = SolveStatus.INFEASIBLE if proven else SolveStatus.NO_SOLUTION_FOUND
            return AlignmentResult(problem, status, self.name, solve_seconds=seconds, build_seconds=build, stats=stats)
        result = AlignmentResult(problem, SolveStatus.OPTIMAL if proven else SolveStatus.FEASIBLE, self.name,
                                 assignment=x, solve_seconds=seconds, build_seconds=build, soft=request.soft,
                                 soft_penalty=net.penalty if request.soft else None, stats=stats)
        if proven:
            result.bound = result.objective + 2 * tol * (C + E + 2)
        return result


    def _solve_grouped(self, problem: AlignmentProblem, net: FlowNetwork, request: SolveRequest,
                       t0: float) -> AlignmentResult:
        from ortools.graph.python import min_cost_flow

        C, E = net.shape
        L = problem.n_groups
        scale = _cost_scale(net, nodes=C + E + 2 + C * L)
        tol = 4.0 / scale
        tails, heads, caps, costs, supplies, pairs = grouped_arcs(net, problem.group_array, problem.group_min_matrix,
                                                                  problem.group_capacity_matrix)
        smcf = min_cost_flow.SimpleMinCostFlow()
        arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, np.rint(costs * scale).astype(np.int64))
        smcf.set_nodes_supplies(np.arange(len(supplies)), supplies)
        build = time.perf_counter() - t0
        status = smcf.solve()
        seconds = time.perf_counter() - t0 - build
        stats = {"rounds": 1, "arcs": len(pairs[0]), "groups": L, "proven": status == smcf.OPTIMAL,
                 "tolerance": tol, "deterministic": True}
        if status == smcf.INFEASIBLE:      # client and group rows are hard in both modes; the band is priced
            return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=seconds,
                                   build_seconds=build, stats=stats)
        if status != smcf.OPTIMAL:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=seconds,
                                   build_seconds=build, explanation=f"OR-Tools min-cost flow returned status {status}",
                                   stats=stats)
        first = C + C * L
        x = net.assignment(pairs, smcf.flows(arcs[first:first + len(pairs[0])]))
        if _misses(net, x) and not request.soft:
            return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=seconds,
                                   build_seconds=build, stats=stats)
        result = AlignmentResult(problem, SolveStatus.OPTIMAL, self.name, assignment=x, solve_seconds=seconds,
                                 build_seconds=build, soft=request.soft,
                                 soft_penalty=net.penalty if request.soft else None, stats=stats)
        result.bound = result.objective + 2 * tol * (int(net.k.sum()) + E + 2)
        return result


def _misses(net: FlowNetwork, x: np.ndarray) -> bool:
    """Whether ``x`` misses the integer (hard) load band."""
    load = x.sum(axis=0)
    return bool(np.any(load < net.L) or np.any(load > net.U))


def _cost_scale(net: FlowNetwork, nodes: Optional[int] = None) -> float:
    """Largest cost multiplier that keeps OR-Tools' internal cost scaling inside int64."""
    C, E = net.shape
    limit = float(2 ** 58 // ((C + E + 2 if nodes is None else nodes) + 1))
    biggest = max(net.penalty, net.max_abs, 1e-12)
    return limit / biggest


def _solve_network(net: FlowNetwork, cand: Optional[np.ndarray], scale: float) -> Optional[np.ndarray]:
    from ortools.graph.python import min_cost_flow

    pairs = np.nonzero(net.allowed if cand is None else cand)
    tails, heads, caps, costs, supplies = net.arcs(pairs)
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, np.rint(costs * scale).astype(np.int64))
    smcf.set_nodes_supplies(np.arange(len(supplies)), supplies)
    if smcf.solve() != smcf.OPTIMAL:
        return None
    C = net.shape[0]
    return net.assignment(pairs, smcf.flows(arcs[C:C + len(pairs[0])]))


def _working_set(net: FlowNetwork, m: int, rng: np.random.Generator, scale: float):
    """Candidates, active clients and the fixed clients' assignment for a large instance.

    Expert prices come from an exact solve on a sample of clients.  Each client's ``m`` best
    experts by fitness plus price are its candidates.  A client whose ``capacity``-th best
    expert beats the next one and the source price by a clear margin is fixed to its top
    ``capacity`` experts (the ``1 - ACTIVE_SHARE`` most clear-cut clients); the rest stay
    active.  The certificate later activates any fixed client that was wrong.
    """
    C, E = net.shape
    n = min(C, max(2000, 20 * E))
    rows = np.sort(rng.choice(C, size=n, replace=False))
    frac = n / C
    sample = FlowNetwork(G=net.G[rows], allowed=net.allowed[rows], lo=net.lo[rows], k=net.k[rows],
                         L=np.floor(net.L * frac).astype(np.int64), U=np.ceil(net.U * frac).astype(np.int64),
                         penalty=net.penalty, max_abs=net.max_abs, Lf=net.Lf * frac, Uf=net.Uf * frac)
    d0 = np.zeros(E + 2)
    xs = _solve_network(sample, None, scale)
    if xs is not None:
        d = sample.potentials(xs, None, 4.0 / scale)
        if d is not None:
            d0 = d
    score = np.add(net.G, d0[None, :E])
    if not _all(net.allowed):
        score[~net.allowed] = -np.inf
    top = np.argpartition(score, E - m, axis=1)[:, E - m:]
    vals = np.take_along_axis(score, top, axis=1)
    cand = np.zeros((C, E), dtype=bool)
    np.put_along_axis(cand, top, True, axis=1)
    cand &= net.allowed
    needy = net.lo > m
    cand[needy] = net.allowed[needy]
    active = np.ones(C, dtype=bool)
    fixed_x = np.zeros((C, E), dtype=bool)
    if int(net.k.max(initial=0)) + 1 > m:
        return cand, active, fixed_x
    order = np.argsort(-vals, axis=1, kind="stable")
    top, vals = np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)
    idx = np.arange(C)
    k = net.k
    kth = vals[idx, np.maximum(k - 1, 0)]
    margin = np.minimum(kth - vals[idx, k], kth - d0[E])
    eligible = (k >= 1) & ~needy & np.isfinite(kth)
    if not eligible.any():
        return cand, active, fixed_x
    cut = max(float(np.quantile(margin[eligible], ACTIVE_SHARE)), 0.0)
    fixed = eligible & (margin > cut)
    take = np.arange(m)[None, :] < k[:, None]
    sel = take & fixed[:, None]
    fixed_x[np.repeat(idx, m)[sel.ravel()], top[sel]] = True
    active = ~fixed
    return cand, active, fixed_x
