"""``flow``: exact solve of count-load problems with OR-Tools' min-cost flow.

Polynomial and exact (the constraint matrix is totally unimodular).  Small instances (up to
``FULL_ARCS`` allowed arcs) are solved on every allowed arc: OR-Tools' optimum is the proof.
Large ones use a priced working set:

1. expert prices are the potentials of the exact optimum of a client sample (``_prices``: a
   sample of a quarter of the clients, itself solved this way on prices from a smaller sample,
   down to ``SAMPLE_PER_EXPERT`` clients per expert solved on candidate arcs);
2. each client's candidates are its ``capacity + slack`` best experts by fitness plus price
   (``_Candidates``, fixed-width rows: no client x expert mask in the loop);
3. round one solves the least clear-cut clients (up to ``FIRST_ARCS`` candidate arcs) with the
   others fixed to their priced top choices; each later round re-solves the clients whose
   candidate arcs improve under the whole plan's potentials (``bad``) with those closest to
   changing, the rest fixed to the current plan (``_PricedRun``);
4. when no client is bad, the certificate in :mod:`alignment_solver.formulations.flow` checks
   the plan against EVERY allowed arc of the full instance, and :func:`_band_breaks` the band
   arcs at the whole plan's loads (potentials of the active clients' network have not seen an
   expert only fixed clients hold): it is proven optimal (``stats["proven"]``), or the arcs it
   names join the candidates and the rounds go on.  After ``max_rounds`` rounds the whole
   network is solved on every arc.

A warm start (``solve(warm_start=...)``, :mod:`alignment_solver.search.warm`) replaces step 1 by
the previous round's potentials, adds its plan to the candidates and starts from a smaller
active set (``WARM_ARCS``, ``WARM_SHARE``); steps 3 and 4 are unchanged, so is the proof.  A
proven working-set answer carries its potentials in ``stats["potentials"]``.

A privacy floor (``expert_min_group``, hard mode) is searched by
:func:`~alignment_solver.search.floor.branch_and_bound` with one exact flow per node, each
warm-started from its parent's, and bounds from the node's residual graph
(:func:`_forced_bounds`) that fix experts on or off without branching.

Problems with per-group rows (``expert_group``) are solved on every allowed arc of the network
with client-group nodes (:func:`~alignment_solver.formulations.flow.grouped_arcs`): OR-Tools'
answer on the full instance is the proof.

Costs are scaled to int64 for OR-Tools; the reported ``bound`` accounts for the rounding
(``stats["tolerance"]`` per arc).  Deterministic for a given seed (the samples); single-threaded.
Under a time limit the deadline is checked between rounds and each round's plan is reported as
an incumbent; :mod:`alignment_solver.deadline` stops a round that runs past the limit, and a
result cut short says ``stats["deterministic"] = False``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from ..formulations.flow import FlowNetwork, _all, grouped_arcs, relax
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from ..search.floor import NodeAnswer, branch_and_bound
from ..search.warm import WarmHint
from .base import Backend, SolveRequest

FULL_ARCS = 40_000      # up to this many allowed arcs, solve on all of them at once
FIRST_ARCS = 100_000    # candidate arcs of the first round's active clients on large instances
REFOCUS_SHARE = 0.05    # least share of clients re-solved after a round with bad clients
BAD_FACTOR = 4          # clients re-solved per bad client (the closest to changing)
SLACK = 3               # least candidates per client beyond its capacity
SAMPLE_PER_EXPERT = 8   # clients per expert in the smallest price sample
LEVEL = 4               # each price sample has 1 / LEVEL of the clients of the level above
MAX_SAMPLE_ROUNDS = 10  # rounds a price sample may take
MAX_NODES = 1000        # flows of the privacy-floor search (expert_min_group)
MOVE_ROWS = 50_000      # held pairs whose moves (a row of E each) the floor's bounds price at once
WARM_ARCS = 10_000      # least candidate arcs of the first round's active clients on a warm start
WARM_SHARE = 0.1        # ... or this share of the candidate arcs, if more (at most FIRST_ARCS)
ARGMAX_TOP = 16         # candidate lists up to this long are picked by repeated row maxima


class FlowBackend(Backend):
    name = "flow"
    requires = ("ortools",)
    options = {
        "candidates": (None, "experts per client beyond its capacity in the first candidate set (default: "
                              "max(3, (largest capacity + 3) // 2); 0: every allowed arc)"),
        "max_rounds": (30, "candidate-enlargement rounds before falling back to every arc"),
        "max_nodes": (MAX_NODES, "flows the privacy-floor search may solve before it stops unproven"),
    }

    def unsupported_reason(self, problem: AlignmentProblem, soft: bool = False) -> Optional[str]:
        if soft and problem.has_min_group:
            return ("with soft=True the load band is priced but the privacy floor (expert_min_group) stays hard, "
                    "which one network cannot price; use 'cpsat' or a pulp backend")
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
        if np.any(net.lo > net.k):
            return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=time.perf_counter() - t0)
        if problem.has_min_group:
            return self._solve_floor(problem, net, request, t0)
        return self._solve_net(problem, net, request, t0)

    def _solve_floor(self, problem: AlignmentProblem, net: FlowNetwork, request: SolveRequest,
                     t0: float) -> AlignmentResult:
        """The privacy floor by :func:`~alignment_solver.search.floor.branch_and_bound`, one
        exact flow per node (experts off: their arcs removed; on: lower load bound raised to the
        floor)."""
        m = problem.min_group_array
        node_request = replace(request, report=None, options={k: v for k, v in request.options.items() if k != "_warm"})
        C, E = net.shape

        def node(off: np.ndarray, on: np.ndarray, hint: Optional[WarmHint] = None) -> NodeAnswer:
            allowed = net.allowed & ~off[None, :]
            k = np.minimum(net.k, allowed.sum(axis=1))
            if np.any(net.lo > k):
                return NodeAnswer(None)
            sub = FlowNetwork(G=net.G, allowed=allowed, lo=net.lo, k=k, L=np.where(on, np.maximum(net.L, m), net.L),
                              U=net.U, penalty=net.penalty, max_abs=net.max_abs)
            sub_request = node_request if hint is None else replace(
                node_request, options={**node_request.options, "_warm": hint})     # warm from the parent's answer
            r = self._solve_net(problem, sub, sub_request, time.perf_counter())
            if r.status is SolveStatus.INFEASIBLE:
                return NodeAnswer(None)
            if not r.has_solution:
                return NodeAnswer(None, proven=False)
            proven = r.status is SolveStatus.OPTIMAL and r.bound is not None
            x = np.asarray(r.assignment)
            pot = r.stats.get("potentials")
            rows, experts = np.nonzero(x)
            child = WarmHint(None if pot is None else np.asarray(pot), rows, experts, C)
            if not proven:
                return NodeAnswer(x, r.objective, np.inf, False, hint=child)
            on_bound, off_bound = _forced_bounds(sub, x, m, r.bound, float(r.stats.get("tolerance", 0.0)),
                                                 todo=~off & ~on & (m > 1))
            return NodeAnswer(x, r.objective, r.bound, True, hint=child, on_bound=on_bound, off_bound=off_bound)

        report = request.report
        found = branch_and_bound(problem, node, deadline=request.deadline,
                                 max_nodes=request.options.get("max_nodes", MAX_NODES),
                                 incumbent=None if report is None else (lambda x: report(x, None)))
        seconds = time.perf_counter() - t0
        stats = {**found.stats, "proven": found.proven,
                 "deterministic": request.deadline is None or found.proven}
        if found.x is None:
            status = SolveStatus.INFEASIBLE if found.proven else SolveStatus.NO_SOLUTION_FOUND
            return AlignmentResult(problem, status, self.name, solve_seconds=seconds, stats=stats)
        result = AlignmentResult(problem, SolveStatus.OPTIMAL if found.proven else SolveStatus.FEASIBLE, self.name,
                                 assignment=found.x, solve_seconds=seconds, stats=stats)
        result.bound = found.bound if np.isfinite(found.bound) else None
        return result

    def _solve_net(self, problem: AlignmentProblem, net: FlowNetwork, request: SolveRequest,
                   t0: float) -> AlignmentResult:
        """The exact flow of ``net`` (the problem's, or a floor node's)."""
        C, E = net.shape
        if problem.has_groups:
            return self._solve_grouped(problem, net, request, t0)
        scale = _cost_scale(net)
        tol = 4.0 / scale
        slack = request.options.get("candidates")
        if slack is None:
            slack = max(SLACK, (int(net.k.max(initial=0)) + 3) // 2)
        max_rounds = request.options.get("max_rounds", 30)
        large = bool(slack) and int(net.k.max(initial=0)) + slack < E and int(net.allowed.sum()) > FULL_ARCS
        if not large:
            return self._solve_full(problem, net, request, t0, scale, tol)
        cut = False
        warm = request.options.get("_warm")
        if C <= _base(E):                        # no sample smaller than the instance: candidates, no prices
            build = time.perf_counter() - t0
            x, d, proven, rounds, arcs = _on_candidates(net, slack, scale, tol, max_rounds)
            if not proven:
                return self._solve_full(problem, net, request, t0, scale, tol)
            active = C
        else:
            warm_prices = warm is not None and warm.prices is not None
            prices = warm.prices if warm_prices else _prices(net, np.random.default_rng(request.seed), scale, tol, slack)
            build = time.perf_counter() - t0
            run = _PricedRun(net, prices, slack, scale, tol, plan=None if warm is None else (warm.rows, warm.experts),
                             warm=warm_prices)
            x = run.solve(max_rounds, request.deadline, request.report, request.soft)
            if run.gave_up:                      # prices never settled: the whole network, proven by OR-Tools
                return self._solve_full(problem, net, request, t0, scale, tol)
            proven, cut, rounds, arcs, active = run.proven, run.cut, run.rounds, int(run.cs.on.sum()), int(run.active.sum())
            d = run.d
        seconds = time.perf_counter() - t0 - build
        stats = {"rounds": rounds, "arcs": arcs, "active_clients": active,
                 "proven": proven, "tolerance": tol, "deterministic": not cut}
        if warm is not None:
            stats["warm_start"] = {"prices": C > _base(E) and warm.prices is not None, "clients": warm.matched}
        if proven and d is not None:             # the certified potentials: the next round's warm prices
            stats["potentials"] = [float(v) for v in d]
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

    def _solve_full(self, problem: AlignmentProblem, net: FlowNetwork, request: SolveRequest, t0: float,
                    scale: float, tol: float) -> AlignmentResult:
        """Every allowed arc at once: OR-Tools' OPTIMAL on the whole network is the proof, and
        the bound adds the cost rounding (at most ``tol`` per unit of flow on a priced arc)."""
        C, E = net.shape
        build = time.perf_counter() - t0
        pairs = np.nonzero(net.allowed)
        flows = _solve_network(net, pairs, scale)
        x = None if flows is None else _assignment(net.shape, pairs, flows)
        seconds = time.perf_counter() - t0 - build
        stats = {"rounds": 1, "arcs": int(net.allowed.sum()), "active_clients": C, "proven": x is not None,
                 "tolerance": tol, "deterministic": True}
        if x is None:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=seconds,
                                   build_seconds=build, explanation="OR-Tools min-cost flow did not return an optimum",
                                   stats=stats)
        return self._whole(problem, net, request, x, tol, seconds, build, stats)

    def _whole(self, problem: AlignmentProblem, net: FlowNetwork, request: SolveRequest, x: np.ndarray, tol: float,
               seconds: float, build: float, stats: dict) -> AlignmentResult:
        """OR-Tools' optimum on a whole network: INFEASIBLE when it misses the hard band (the
        penalty makes the least violation optimal), else OPTIMAL with the rounding in the bound."""
        if _misses(net, x) and not request.soft:
            return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=seconds,
                                   build_seconds=build, stats=stats)
        result = AlignmentResult(problem, SolveStatus.OPTIMAL, self.name, assignment=x, solve_seconds=seconds,
                                 build_seconds=build, soft=request.soft,
                                 soft_penalty=net.penalty if request.soft else None, stats=stats)
        result.bound = result.objective + 2 * tol * (int(net.k.sum()) + net.shape[1] + 2)
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
        return self._whole(problem, net, request, x, tol, seconds, build, stats)


def _forced_bounds(net: FlowNetwork, x: np.ndarray, m: np.ndarray, bound: float, tol: float,
                   todo: Optional[np.ndarray] = None) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Upper bounds on the relaxation ``net`` with each expert forced on (``m_e`` trainers or
    more) / off (none), from its plan ``x`` (feasible, with upper bound ``bound``), without a flow.

    A plan ``y`` of the forced relaxation differs from ``x`` by a circulation in the residual
    graph of ``x``.  A conformal decomposition has ``m_e - t_e`` cycles through the band arc
    ``e -> T`` to force ``e`` on (``t_e`` trainers of ``e`` in ``x``), each entering ``e`` from
    its own client ``c`` (arc ``c -> e``, capacity 1), or ``t_e`` cycles through ``T -> e`` to
    force it off, each leaving ``e`` through its own client holding ``e``; ``x`` plus the other
    cycles is a plan of ``net``, worth at most ``bound``.  So ``y <= bound - sum`` of the
    cheapest such cycles, one per client: entering ``e`` from ``c`` costs at least
    ``min(cheapest path T ~> e' + G[c, e'] over e' held by c; T ~> S if c has room) - G[c, e]``,
    leaving it ``G[c, e] + min(-G[c, e'] + cheapest path e' ~> T over e' free for c; S ~> T if c
    may drop one)``.  Paths are priced on the E + 2 expert/source/sink nodes (client paths
    contracted, as in the certificate) over every residual client arc of the full network, band
    arcs inside the band only (``y`` keeps the band); Bellman-Ford relaxes by more than ``tol``
    only, so each cycle is taken ``(E + 4) * tol`` cheaper.  (None, None) when it does not settle.
    ``todo``: the experts whose forced-on bound is wanted (default: every floored one).
    """
    C, E = net.shape
    N, S, T = E + 2, E, E + 1
    G, allowed = net.G, net.allowed
    f, load = x.sum(axis=1), x.sum(axis=0)
    free = allowed & ~x
    W = np.full((N, N), np.inf)
    he, hc = np.nonzero(x.T)                             # held pairs, grouped by expert
    if len(hc):
        takes = np.where(free, -G, np.inf)               # c -> b for a free b
        starts = np.flatnonzero(np.r_[True, he[1:] != he[:-1]])
        ends = np.r_[starts[1:], len(he)]
        i = 0
        while i < len(starts):                           # a -> b: a client of a moves to a free b
            j = max(i + 1, int(np.searchsorted(ends, starts[i] + MOVE_ROWS, side="right")))
            lo_, hi_ = starts[i], ends[j - 1]            # experts i..j-1, at most MOVE_ROWS held pairs at once
            moves = G[hc[lo_:hi_], he[lo_:hi_]][:, None] + takes[hc[lo_:hi_]]
            W[he[starts[i:j]], :E] = np.minimum.reduceat(moves, starts[i:j] - lo_, axis=0)
            i = j
        drop = np.where(f[hc] > net.lo[hc], G[hc, he], np.inf)       # a -> S: a client drops a
        W[he[starts], S] = np.minimum.reduceat(drop, starts)
    spare = f < net.k
    if spare.any():                                      # S -> b: a client with room takes b
        W[S, :E] = np.where(free[spare], -G[spare], np.inf).min(axis=0)
    W[T, :E] = np.where(load - 1 >= net.L, 0.0, np.inf)  # T -> e: one trainer fewer, inside the band
    W[:E, T] = np.where(load + 1 <= net.U, 0.0, np.inf)  # e -> T: one more
    W[S, T] = W[T, S] = 0.0
    np.fill_diagonal(W, np.inf)

    def shortest(weights: np.ndarray) -> Optional[np.ndarray]:
        d = np.full(N, np.inf)
        d[T] = 0.0
        return relax(weights, d, tol)

    from_T, to_T = shortest(W), shortest(W.T)
    if from_T is None or to_T is None:
        return None, None
    slack = (N + 2) * tol
    # entering e from client c: A[c] - G[c, e], A[c] the cheapest way to free one unit at c
    reach = np.where(x, G + from_T[None, :E], np.inf).min(axis=1)
    A = np.minimum(reach, np.where(spare, from_T[S], np.inf)) - slack
    # leaving e through client c: G[c, e] + B[c], B[c] the cheapest way to place that unit
    place = np.where(free, to_T[None, :E] - G, np.inf).min(axis=1)
    B = np.minimum(place, np.where(f > net.lo, to_T[S], np.inf)) - slack
    on_bound = np.full(E, bound)
    off_bound = np.full(E, bound)
    todo = (m > 1) if todo is None else todo
    for e in np.flatnonzero(todo & (load < m)):
        need = int(m[e] - load[e])
        if load[e] + need > net.U[e] or not np.isfinite(from_T[e]):
            on_bound[e] = -np.inf                        # no plan reaches the floor
            continue
        enter = np.where(free[:, e], A - G[:, e], np.inf)
        if np.count_nonzero(np.isfinite(enter)) < need:
            on_bound[e] = -np.inf
        else:
            on_bound[e] = bound - float(np.partition(enter, need - 1)[:need].sum())
    if len(hc):                                          # every client of e leaves it
        leave = G[hc, he] + B[hc]
        finite = np.isfinite(leave)
        total = np.bincount(he, weights=np.where(finite, leave, 0.0), minlength=E)
        stuck = np.bincount(he, weights=(~finite).astype(float), minlength=E) > 0
        stuck |= (net.L > 0) | ~np.isfinite(to_T[:E])   # off would break the band, or nothing leaves e
        off_bound = np.where(load > 0, np.where(stuck, -np.inf, bound - total), bound)
    return on_bound, off_bound


def _band_breaks(net: FlowNetwork, load: np.ndarray, d: np.ndarray, tol: float) -> np.ndarray:
    """Experts whose band arcs (``e -> T`` one more trainer, ``T -> e`` one fewer, at the full
    plan's ``load``) or the ``S <-> T`` arcs have a reduced cost below ``-2 tol`` under ``d``
    (all experts when an ``S <-> T`` arc does).  :meth:`FlowNetwork.check` tests the client arcs
    only, which is enough for potentials of the whole plan; potentials of the active clients'
    network (``base_load`` fixed) have not seen ``T -> e`` where only fixed clients hold ``e``."""
    E = net.shape[1]
    dS, dT, de = d[E], d[E + 1], d[:E]
    up = net.marginal(load + 1) + de - dT < -2 * tol
    down = (load > 0) & (-net.marginal(load) + dT - de < -2 * tol)
    if dT - dS < -2 * tol or (load.sum() > 0 and dS - dT < -2 * tol):
        return np.ones(E, dtype=bool)
    return up | down


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


def _solve_network(net: FlowNetwork, pairs: tuple[np.ndarray, np.ndarray], scale: float) -> Optional[np.ndarray]:
    """OR-Tools' optimum of ``net`` on the client-expert arcs ``pairs``: which pairs carry flow."""
    from ortools.graph.python import min_cost_flow

    tails, heads, caps, costs, supplies = net.arcs(pairs)
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, np.rint(costs * scale).astype(np.int64))
    smcf.set_nodes_supplies(np.arange(len(supplies)), supplies)
    if smcf.solve() != smcf.OPTIMAL:
        return None
    C = net.shape[0]
    return smcf.flows(arcs[C:C + len(pairs[0])]) > 0


def _assignment(shape: tuple[int, int], pairs: tuple[np.ndarray, np.ndarray], on: np.ndarray) -> np.ndarray:
    x = np.zeros(shape, dtype=bool)
    x[pairs[0][on], pairs[1][on]] = True
    return x


def _top(score: np.ndarray, count: int, scratch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``count`` best columns, best first: ``(columns, values)``.  Up to
    ``ARGMAX_TOP`` columns by repeated row maxima (three times faster than a partition and
    sort at 100,000 x 128), else by ``argpartition``.  ``scratch``: ``score`` may be overwritten
    (saves a C x E copy, whose fresh pages cost 0.2-0.5 s at 100,000 x 128 on a loaded machine)."""
    C, E = score.shape
    if count <= ARGMAX_TOP and count < E:
        work = score if scratch else score.copy()
        rows = np.arange(C)
        top = np.empty((C, count), dtype=np.int64)
        vals = np.empty((C, count))
        for j in range(count):
            best = work.argmax(axis=1)
            top[:, j] = best
            vals[:, j] = work[rows, best]
            work[rows, best] = -np.inf
        return top, vals
    top = np.argpartition(score, E - count, axis=1)[:, E - count:] if count < E else np.broadcast_to(np.arange(E), (C, E))
    vals = np.take_along_axis(score, top, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _first(top: np.ndarray, count: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mask of each row's first ``count`` entries of ``top``."""
    take = np.arange(top.shape[1])[None, :] < count[:, None]
    mask = np.zeros(shape, dtype=bool)
    mask[np.repeat(np.arange(shape[0]), top.shape[1])[take.ravel()], top[take]] = True
    return mask


def _base(experts: int) -> int:
    """Clients of the smallest price sample."""
    return max(1000, SAMPLE_PER_EXPERT * experts)


def _prices(net: FlowNetwork, rng: np.random.Generator, scale: float, tol: float, slack: int) -> np.ndarray:
    """Expert prices (potentials: experts, then S and T) of the exact optimum of a client sample.

    The sample keeps the band in proportion and has ``1 / LEVEL`` of the clients, or
    ``base = SAMPLE_PER_EXPERT * E`` clients (at least 1,000) when ``C / LEVEL`` is at most
    ``2 * base``.  Above ``base`` clients it is solved like the full instance
    (:class:`_PricedRun` on prices from a sample of its own), else on candidate arcs (each client's ``capacity +
    slack`` best experts and each expert's best clients, so every expert can reach its band)
    that its own certificate widens until its optimum is proven.  Prices only steer the working
    set, so an unproven sample still gives usable ones.
    """
    C, E = net.shape
    base = _base(E)
    n = min(C, C // LEVEL if C // LEVEL > 2 * base else base)
    rows = np.sort(rng.choice(C, size=n, replace=False))
    frac = n / C
    sample = FlowNetwork(G=net.G[rows], allowed=net.allowed[rows], lo=net.lo[rows], k=net.k[rows],
                         L=np.floor(net.L * frac).astype(np.int64), U=np.ceil(net.U * frac).astype(np.int64),
                         penalty=net.penalty, max_abs=net.max_abs, Lf=net.Lf * frac, Uf=net.Uf * frac)
    if n > base:
        run = _PricedRun(sample, _prices(sample, rng, scale, tol, slack), slack, scale, tol)
        run.solve(MAX_SAMPLE_ROUNDS)
        return run.d if run.d is not None else np.zeros(E + 2)
    return _on_candidates(sample, slack, scale, tol)[1]


def _on_candidates(net: FlowNetwork, slack: int, scale: float, tol: float, max_rounds: int = MAX_SAMPLE_ROUNDS):
    """Every client on candidate arcs, widened by the certificate until the optimum is proven:
    ``(plan or None, potentials, proven, rounds, candidate arcs)``.

    Candidates: each client's ``capacity + slack`` best experts and each expert's best clients
    (twice its upper band, so every expert can reach its band without prices).
    """
    C, E = net.shape
    score = np.where(net.allowed, net.G, -np.inf)
    count = np.minimum(net.k + slack, E)
    cand = _first(_top(score, int(count.max(initial=0)))[0], count, net.shape)
    reach = min(C, int(2 * net.U.clip(0, C).max(initial=0)) + slack)
    best = np.argpartition(-score, reach - 1, axis=0)[:reach] if reach < C else np.broadcast_to(np.arange(C)[:, None], (C, E))
    cand[best, np.arange(E)[None, :]] = True
    cand &= net.allowed
    d, x, proven, rounds = np.zeros(E + 2), None, False, 0
    while rounds < max_rounds:
        rounds += 1
        pairs = np.nonzero(cand)
        flows = _solve_network(net, pairs, scale)
        x = None if flows is None else _assignment(net.shape, pairs, flows)
        found = None if x is None else net.potentials(x, cand, tol)
        if found is None:
            break
        d = found
        improving, bad = net.check(x, d, tol)
        if not bad.any():
            proven = True
            break
        cand |= improving
    return x, d, proven, rounds, int(cand.sum())


class _PricedRun:
    """The working-set loop on one network from expert prices.

    Round: solve the active clients' candidate arcs with the others fixed; potentials of the
    whole plan on the candidate arcs; clients with an improving candidate arc are ``bad`` and,
    with the clients closest to changing, form the next round's active set.  When no client is
    bad the plan is optimal on the candidate arcs, and :meth:`FlowNetwork.check` tests it on
    every allowed arc: it is proven, or the arcs it names join the candidates.
    """

    def __init__(self, net: FlowNetwork, prices: np.ndarray, slack: int, scale: float, tol: float,
                 plan: Optional[tuple[np.ndarray, np.ndarray]] = None, warm: bool = False) -> None:
        self.net, self.scale, self.tol = net, scale, tol
        self.cs = _Candidates(net, prices, slack)
        first = min(FIRST_ARCS, max(WARM_ARCS, int(WARM_SHARE * self.cs.on.sum()))) if warm else FIRST_ARCS
        self.active, self.hold = self.cs.first_active(first)
        if plan is not None and len(plan[0]):    # a warm start's plan joins the candidates
            self.hold = self.cs.widen(self.cs.missing(*plan), self.hold)
        self.rounds, self.proven, self.cut, self.gave_up = 0, False, False, False
        self.d: Optional[np.ndarray] = None

    def solve(self, max_rounds: int, deadline: Optional[float] = None, report: Any = None,
              soft: bool = True) -> Optional[np.ndarray]:
        """Run rounds until proven, cut by ``deadline`` or ``max_rounds`` (``gave_up``); the
        last plan (None if no round solved)."""
        net, cs, tol = self.net, self.cs, self.tol
        E = net.shape[1]
        solved = False
        while True:
            if self.rounds >= max_rounds:
                self.gave_up = True
                break
            self.rounds += 1
            active, hold = self.active, self.hold
            rows = np.flatnonzero(active)
            sub = net.restrict(rows, np.bincount(cs.top[hold & ~active[:, None]], minlength=E))
            flows = _solve_network(sub, cs.pairs(rows), self.scale)
            if flows is None:
                break
            solved = True
            hold[rows] = cs.scatter(rows, flows)
            d = cs.potentials(hold, tol)
            if d is None and not active.all():   # a fixed client is wrong: the network's own prices name it
                d = cs.potentials(hold, tol, rows=rows, sub=sub)
            if d is None:
                if active.all():
                    break
                self.active[:] = True
                continue
            self.d = d
            bad, values = cs.bad(hold, d, tol)
            if not bad.any():                    # optimal on the candidates: certify on the full instance
                x = cs.assignment(hold)
                improving, bad = net.check(x, d, tol)
                wrong = _band_breaks(net, x.sum(axis=0), d, tol)
                if not bad.any() and not wrong.any():
                    self.proven = True
                    break
                if wrong.any():                  # d came from the active clients' network: a fixed client
                    bad = bad | (hold & wrong[cs.top]).any(axis=1)     # on a mispriced expert must move
                self.hold = hold = cs.widen(improving, hold)
                values = cs._values(hold, d)
            if report is not None:
                x = cs.assignment(hold)
                if soft or not _misses(net, x):
                    report(x, None)
            if deadline is not None and time.perf_counter() > deadline:
                self.cut = True
                break
            self.active = cs.refocus(values, d, bad)
        return cs.assignment(self.hold) if solved else None


class _Candidates:
    """Each client's best experts under expert prices, as fixed-width rows (no C x E masks in the loop).

    ``top[c]`` lists client ``c``'s ``capacity + slack`` best allowed experts by fitness plus
    price, best first (``on`` marks the real entries, ``g`` their fitness); the certificate may
    append experts (:meth:`widen`).  A plan is ``hold``, a mask over the same rows.
    """

    def __init__(self, net: FlowNetwork, prices: np.ndarray, slack: int) -> None:
        self.net = net
        C, E = net.shape
        score = np.add(net.G, prices[None, :E])
        if _all(net.allowed):
            count = np.minimum(net.k + slack, E)
        else:
            score[~net.allowed] = -np.inf
            count = np.minimum(net.k + slack, net.allowed.sum(axis=1))
        self.top, self.vals = _top(score, int(count.max(initial=0)), scratch=True)
        M = self.top.shape[1]
        self.on = (np.arange(M)[None, :] < count[:, None]) & np.isfinite(self.vals)
        self.g = net.G[np.arange(C)[:, None], self.top]
        self.prices = prices

    def first_active(self, limit: int = FIRST_ARCS) -> tuple[np.ndarray, np.ndarray]:
        """Active clients and the plan of the fixed ones: a client whose ``capacity``-th best
        expert beats the next one and the source price by a clear margin takes its top
        ``capacity``; the least clear-cut clients, up to ``limit`` candidate arcs, are active."""
        net, M = self.net, self.top.shape[1]
        C, E = net.shape
        k, idx = net.k, np.arange(C)
        hold = np.zeros(self.top.shape, dtype=bool)
        kth = self.vals[idx, np.maximum(k - 1, 0)]
        margin = np.minimum(kth - self.vals[idx, np.minimum(k, M - 1)], kth - self.prices[E])
        eligible = (k >= 1) & (k < M) & np.isfinite(margin) & self.on[idx, np.minimum(k, M - 1)]
        share = limit / max(int(self.on.sum()), 1)
        if share >= 1 or not eligible.any():
            return np.ones(C, dtype=bool), hold
        cut = max(float(np.quantile(margin[eligible], share)), 0.0)
        fixed = eligible & (margin > cut)
        hold[fixed] = np.arange(M)[None, :] < k[fixed, None]
        return ~fixed, hold

    def pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate arcs of ``rows`` as (position in ``rows``, expert), row-major."""
        sel = self.on[rows]
        return np.nonzero(sel)[0], self.top[rows][sel]

    def scatter(self, rows: np.ndarray, flows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), self.top.shape[1]), dtype=bool)
        out[self.on[rows]] = flows
        return out

    def assignment(self, hold: np.ndarray) -> np.ndarray:
        x = np.zeros(self.net.shape, dtype=bool)
        x[np.nonzero(hold)[0], self.top[hold]] = True
        return x

    def potentials(self, hold: np.ndarray, tol: float, rows: Optional[np.ndarray] = None,
                   sub: Optional[FlowNetwork] = None) -> Optional[np.ndarray]:
        """Potentials of the residual graph on the candidate arcs (of ``rows`` in ``sub``, the
        network of the active clients, when given)."""
        net, top, g, on = self.net, self.top, self.g, self.on
        if rows is not None:
            net, top, g, on, hold = sub, top[rows], g[rows], on[rows], hold[rows]
        E = net.shape[1]
        free = on & ~hold
        fc, hc = np.nonzero(free)[0], np.nonzero(hold)[0]
        return net.pair_potentials((fc, top[free], g[free]), (hc, top[hold], g[hold]), hold.sum(axis=1),
                                   np.bincount(top[hold], minlength=E), tol)

    def _values(self, hold: np.ndarray, d: np.ndarray):
        E = self.net.shape[1]
        value = self.g + d[self.top]
        held = np.where(hold, value, np.inf).min(axis=1)
        free = np.where(self.on & ~hold, value, -np.inf).max(axis=1)
        f = hold.sum(axis=1)
        d_in = np.minimum(np.where(f < self.net.k, d[E], np.inf), held)
        return held, free, f, d_in

    def bad(self, hold: np.ndarray, d: np.ndarray, tol: float) -> tuple[np.ndarray, tuple]:
        """Clients with an improving candidate arc or an improving drop under ``d`` (the check of
        :meth:`FlowNetwork.check` on the candidate arcs), and the values :meth:`refocus` reuses."""
        E = self.net.shape[1]
        values = self._values(hold, d)
        _, free, f, d_in = values
        return (free > d_in + 2 * tol) | ((f > self.net.lo) & (d[E] > d_in + 2 * tol)), values

    def refocus(self, values: tuple, d: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """The next round's active clients: ``bad`` and those closest to changing under ``d`` (a
        held expert's value near a free one's or the source price), at least ``REFOCUS_SHARE``
        of the clients and ``BAD_FACTOR`` per bad one."""
        net = self.net
        C, E = net.shape
        held, free, f, _ = values
        margin = np.minimum(held - free, np.where(f > net.lo, held - d[E], np.inf))
        margin = np.minimum(margin, np.where(f < net.k, d[E] - free, np.inf))
        margin[bad] = -np.inf
        n = min(C, max(BAD_FACTOR * int(bad.sum()), int(REFOCUS_SHARE * C), 1))
        active = np.zeros(C, dtype=bool)
        active[np.argpartition(margin, n - 1)[:n]] = True
        return active

    def missing(self, rows: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Mask of the allowed pairs ``(rows, experts)`` that are not candidates yet."""
        net = self.net
        C, M = self.top.shape
        mask = np.zeros(net.shape, dtype=bool)
        mask[rows, experts] = True
        mask &= net.allowed
        mask[np.repeat(np.arange(C), M)[self.on.ravel()], self.top[self.on]] = False
        return mask

    def widen(self, improving: np.ndarray, hold: np.ndarray) -> np.ndarray:
        """Append each client's improving arcs (found by the full certificate) to its candidates;
        returns ``hold`` on the widened rows."""
        rc, re = np.nonzero(improving)
        if not len(rc):
            return hold
        first = np.flatnonzero(np.r_[True, rc[1:] != rc[:-1]])
        rank = np.arange(len(rc)) - np.repeat(first, np.diff(np.r_[first, len(rc)]))
        M = self.top.shape[1]
        extra = int(rank.max()) + 1
        C = self.top.shape[0]
        self.top = np.concatenate([self.top, np.zeros((C, extra), dtype=self.top.dtype)], axis=1)
        self.g = np.concatenate([self.g, np.zeros((C, extra))], axis=1)
        self.on = np.concatenate([self.on, np.zeros((C, extra), dtype=bool)], axis=1)
        self.top[rc, M + rank] = re
        self.g[rc, M + rank] = self.net.G[rc, re]
        self.on[rc, M + rank] = True
        return np.concatenate([hold, np.zeros((C, extra), dtype=bool)], axis=1)
