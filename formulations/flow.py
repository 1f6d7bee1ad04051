"""Count-load alignment as a min-cost circulation, and its optimality certificate.

With count loads and no budget rows the constraint matrix is the incidence matrix of a
bipartite graph (totally unimodular), so the integer program is the circulation::

    S --[min_experts, capacity]--> client --[0, 1], cost -G--> expert --band--> T --[0, inf)--> S

The band arc ``expert -> T`` is piecewise linear and convex: load ``l`` costs
``P * (max(0, Lf - l) + max(0, l - Uf))``, split into parallel arcs whose unit costs are the
marginal costs ``f(l) - f(l - 1)``: ``-P`` per unit below ``Lf`` (a reward for covering it), 0
inside the band, ``+P`` per unit above ``Uf``, and an intermediate price for the one unit that
crosses a fractional bound.  In hard mode ``(Lf, Uf)`` is the integer band ``(ceil(min),
floor(max))`` and ``P`` is larger than any fitness change a unit of violation can buy
(``penalty_for``), so the optimum misses the band by the least total amount, and by zero exactly
when the hard problem is feasible.  In soft mode ``(Lf, Uf)`` is the band as given (fractional
bounds are priced exactly as the result's objective prices them) and ``P`` is the soft penalty.  ``base_load`` is load already placed on each expert
by clients kept out of the network (fixed); the band arcs are shifted by it.

Per-group rows (``expert_group`` with ``group_min_experts`` / ``group_capacity``) are laminar
inside the client row, so they add a layer of client-group nodes::

    S --[min_experts, capacity]--> client --[group min, group cap]--> client-group --[0, 1]--> expert

(``grouped_arcs``); that network is solved on every allowed arc, without the certificate.

Optimality certificate: every cycle of the residual graph passes through expert, source or sink
nodes, so eliminating the client nodes leaves a graph on ``E + 2`` nodes whose arc ``a -> b``
costs the cheapest residual path ``a -> client -> b`` (``potentials`` runs Bellman-Ford on it).
A client's potential must lie between the largest bound set by its outgoing residual arcs and
the smallest set by its incoming ones; ``check`` tests that for every client over every allowed
arc of the FULL instance.  If it holds, the potentials are feasible for the whole residual graph,
so it has no negative cycle and the flow is optimal (each arc within ``tol``), even though it was
solved on candidate arcs with some clients fixed.  Otherwise ``check`` names the arcs and
clients to add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from alignment_solver.problem import AlignmentProblem


def _all(mask: np.ndarray) -> bool:
    return bool(mask.all())


def count_band(problem: AlignmentProblem) -> tuple[np.ndarray, np.ndarray]:
    """Integer load band (L, U) for count loads: ``ceil(min)``, ``floor(max)`` capped at C clients."""
    C = problem.n_clients
    L = np.ceil(problem.min_load_array - 1e-9).astype(np.int64)
    U = np.floor(np.minimum(problem.max_load_array, C) + 1e-9).astype(np.int64)
    return L, U


def penalty_for(experts: int, max_abs: float) -> float:
    """A band-violation price larger than the fitness any unit of violation can buy.

    A simple residual cycle alternates clients with expert/source/sink nodes, so it holds at
    most ``2 (E + 2)`` client-expert arcs, each worth at most ``max_abs = max |G|``.
    """
    return 2.0 * (experts + 2) * max_abs + 1.0


def relax(weights: np.ndarray, d: np.ndarray, tol: float) -> Optional[np.ndarray]:
    """Bellman-Ford on a dense arc-weight matrix (``weights[a, b]``: arc a -> b, ``inf``: none) from
    the distances ``d``: the shortest distances, or None when a negative cycle (beyond ``tol``) exists."""
    for _ in range(len(d) + 1):
        relaxed = (d[:, None] + weights).min(axis=0)
        better = relaxed < d - tol
        if not better.any():
            return d
        d = np.where(better, relaxed, d)
    return None


@dataclass
class FlowNetwork:
    """The circulation for one problem (or for a subset of its clients); index space arrays."""

    G: np.ndarray            # (C, E) objective coefficients, maximised
    allowed: np.ndarray      # (C, E) bool
    lo: np.ndarray           # (C,) min experts per client
    k: np.ndarray            # (C,) capacity, clipped to the number of allowed experts
    L: np.ndarray            # (E,) integer lower load bound (hard feasibility)
    U: np.ndarray            # (E,) integer upper load bound (hard feasibility)
    penalty: float           # price per unit of band violation
    max_abs: float           # largest |G| over allowed pairs (sets the cost scale)
    base_load: np.ndarray = field(default=None)  # (E,) load of clients outside this network
    Lf: np.ndarray = field(default=None)  # (E,) band priced by the arcs (default L)
    Uf: np.ndarray = field(default=None)  # (E,) band priced by the arcs (default U)

    def __post_init__(self) -> None:
        if self.base_load is None:
            self.base_load = np.zeros(self.G.shape[1], dtype=np.int64)
        if self.Lf is None:
            self.Lf = self.L.astype(float)
        if self.Uf is None:
            self.Uf = self.U.astype(float)

    def marginal(self, load: np.ndarray) -> np.ndarray:
        """Cost of the ``load``-th unit on each expert's band arc, ``f(l) - f(l - 1)``
        in closed form (exactly ``+-P`` or 0 away from fractional bounds; nondecreasing in load)."""
        load = np.asarray(load, dtype=float)
        return self.penalty * (np.clip(load - self.Uf, 0.0, 1.0) - np.clip(self.Lf - load + 1.0, 0.0, 1.0))

    @classmethod
    def from_problem(cls, problem: AlignmentProblem, penalty: Optional[float] = None,
                     soft: bool = False) -> "FlowNetwork":
        """The circulation; ``soft`` prices the band as given (fractional bounds included)."""
        if not problem.is_flow:
            raise ValueError("the flow formulation needs count loads and no budget rows")
        allowed = problem.allowed_matrix
        G = problem.objective_matrix
        k = np.minimum(problem.capacity_array, allowed.sum(axis=1))
        L, U = count_band(problem)
        big = problem.max_abs_objective
        P = penalty_for(problem.n_experts, big) if penalty is None else float(penalty)
        Lf = np.minimum(problem.min_load_array, problem.n_clients) if soft else None
        Uf = np.minimum(problem.max_load_array, problem.n_clients) if soft else None
        return cls(G=G, allowed=allowed, lo=problem.min_experts_array.astype(np.int64), k=k.astype(np.int64),
                   L=L, U=U, penalty=P, max_abs=big, Lf=Lf, Uf=Uf)

    def restrict(self, rows: np.ndarray, fixed_load: np.ndarray) -> "FlowNetwork":
        """The network of the clients ``rows`` with ``fixed_load`` placed by the others."""
        return FlowNetwork(G=self.G[rows], allowed=self.allowed[rows], lo=self.lo[rows], k=self.k[rows], L=self.L,
                           U=self.U, penalty=self.penalty, max_abs=self.max_abs,
                           base_load=self.base_load + fixed_load, Lf=self.Lf, Uf=self.Uf)

    @property
    def shape(self) -> tuple[int, int]:
        return self.G.shape  # type: ignore[return-value]

    # ---- the network ------------------------------------------------------------------------
    def arcs(self, pairs: tuple[np.ndarray, np.ndarray]):
        """Arc arrays of the circulation restricted to the candidate ``pairs`` (clients, experts).

        Returns ``tails, heads, capacities, costs (float, minimised), supplies``; the
        client-expert arcs come right after the C source arcs.  Nodes: clients ``0..C-1``,
        experts ``C..C+E-1``, then S and T.
        """
        C, E = self.shape
        ci, ei = pairs
        S, T = C + E, C + E + 1
        experts = np.arange(C, C + E)
        big = int(self.k.sum()) + 1
        b = self.base_load
        # Band segments (start, end] in total load, each at one marginal cost; clipped at base_load.
        # Below both bounds a unit earns P, above both it costs P, between them it is free (both
        # orders: an empty integer band has Lf > Uf); a unit crossing a fractional bound costs its
        # exact marginal.
        low, high = np.minimum(self.Lf, self.Uf), np.maximum(self.Lf, self.Uf)
        fl, cl = np.floor(low + 1e-9), np.ceil(low - 1e-9)
        fu, cu = np.floor(high + 1e-9), np.ceil(high - 1e-9)
        inf = np.full(E, np.inf)
        segs = [(np.zeros(E), fl, np.full(E, -self.penalty)),
                (fl, cl, self.marginal(cl)),
                (cl, np.maximum(fu, cl), np.zeros(E)),
                (np.maximum(cl, fu), np.maximum(cu, cl), self.marginal(np.maximum(cu, cl))),
                (np.maximum(cu, cl), inf, np.full(E, self.penalty))]
        seg_caps = [np.minimum(np.maximum(end - np.maximum(start, b), 0), big) for start, end, _ in segs]
        tails = np.concatenate([np.full(C, S), ci, np.tile(experts, len(segs)), [T]])
        heads = np.concatenate([np.arange(C), ei + C, np.full(len(segs) * E, T), [S]])
        caps = np.concatenate([self.k - self.lo, np.ones(len(ci), np.int64), *seg_caps, [big]])
        costs = np.concatenate([np.zeros(C), -self.G[ci, ei], *[cost for _, _, cost in segs], [0.0]])
        supplies = np.zeros(C + E + 2, np.int64)
        supplies[:C] = self.lo
        supplies[S] = -int(self.lo.sum())
        return tails, heads, caps.astype(np.int64), costs, supplies

    def assignment(self, pairs: tuple[np.ndarray, np.ndarray], flows: np.ndarray) -> np.ndarray:
        x = np.zeros(self.shape, dtype=bool)
        ci, ei = pairs
        on = flows > 0
        x[ci[on], ei[on]] = True
        return x

    # ---- certificate ------------------------------------------------------------------------
    def potentials(self, x: np.ndarray, candidates: Optional[np.ndarray], tol: float) -> Optional[np.ndarray]:
        """Node potentials ``d`` (experts, then S, T) of the residual graph of ``x`` restricted to
        ``candidates`` (None: every allowed arc), or None if it has a cycle cheaper than ``-tol``."""
        fc, fe = np.nonzero((self.allowed if candidates is None else candidates) & ~x)
        hc, he = np.nonzero(x)
        return self.pair_potentials((fc, fe, self.G[fc, fe]), (hc, he, self.G[hc, he]), x.sum(axis=1),
                                    x.sum(axis=0), tol)

    def pair_potentials(self, free: tuple, held: tuple, f: np.ndarray, load: np.ndarray,
                        tol: float) -> Optional[np.ndarray]:
        """:meth:`potentials` from arc lists: ``free = (clients, experts, G)`` the free candidate
        arcs, ``held = (clients, experts, G)`` the held ones sorted by client; ``f`` each client's
        held count and ``load`` each expert's held count (``base_load`` is added here)."""
        C, E = self.shape
        N, iS, iT = E + 2, E, E + 1
        fc, fe, free_value = free
        hc, he, held_value = held
        load = load + self.base_load
        W = np.full((N, N), np.inf)
        if len(hc) and len(fc):
            # e -> e': a client holding e moves to a free e'; cost G[c,e] - G[c,e'].
            first = np.flatnonzero(np.r_[True, hc[1:] != hc[:-1]])
            rank = np.arange(len(hc)) - np.repeat(first, np.diff(np.r_[first, len(hc)]))
            slots = np.full((C, int(rank.max()) + 1), -1, dtype=np.int64)
            slot_value = np.zeros(slots.shape)
            slots[hc, rank] = he
            slot_value[hc, rank] = held_value
            flat = np.full(E * E, np.inf)
            for j in range(slots.shape[1]):
                h = slots[fc, j]
                ok = h >= 0
                np.minimum.at(flat, h[ok] * E + fe[ok], slot_value[fc[ok], j] - free_value[ok])
            W[:E, :E] = flat.reshape(E, E)
        # S -> e': a client with spare capacity takes a free e'.
        row = np.full(E, np.inf)
        on = (f < self.k)[fc]
        np.minimum.at(row, fe[on], -free_value[on])
        W[iS, :E] = row
        # e -> S: a client above its minimum drops e.
        col = np.full(E, np.inf)
        on = (f > self.lo)[hc]
        np.minimum.at(col, he[on], held_value[on])
        W[:E, iS] = col
        # expert -> T band residuals (piecewise-linear convex arc); T <-> S circulation arc.
        W[np.arange(E), iT] = self.marginal(load + 1)
        W[iT, np.arange(E)] = np.where(load > self.base_load, -self.marginal(load), np.inf)
        W[iT, iS] = 0.0
        if load.sum() > 0:
            W[iS, iT] = 0.0
        np.fill_diagonal(W, np.inf)
        return relax(W, np.zeros(N), tol)

    def check(self, x: np.ndarray, d: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
        """Test the potentials ``d`` against every residual arc of the full instance at ``x``.

        Returns ``(improving, bad_clients)``: the free allowed arcs ``(c, e')`` with reduced cost
        below ``-2 tol``, and the clients with any such arc or an improving drop ``c -> S``.  Both
        empty: ``x`` is optimal.
        """
        C, E = self.shape
        f = x.sum(axis=1)
        hc, he = np.nonzero(x)
        held = np.full(C, np.inf)
        np.minimum.at(held, hc, d[he] + self.G[hc, he])
        d_in = np.minimum(np.where(f < self.k, d[E], np.inf), held)      # cheapest way into each client
        # arc c -> e' has reduced cost d_in - G - d_e' < -tol  <=>  G + d_e' > d_in + tol
        value = np.add(self.G, d[None, :E])
        value[hc, he] = -np.inf                                            # held arcs are not free
        if not _all(self.allowed):
            value[~self.allowed] = -np.inf
        thr = d_in + 2 * tol
        bad = (value.max(axis=1) > thr) | ((f > self.lo) & (d[E] > thr))
        improving = np.zeros((C, E), dtype=bool)
        rows = np.flatnonzero(bad)
        improving[rows] = value[rows] > thr[rows, None]
        return improving, bad


def grouped_arcs(net: FlowNetwork, group: np.ndarray, glo: np.ndarray, gk: np.ndarray):
    """The circulation of ``net`` with a client-group layer on every allowed arc.

    ``group`` (E,) is each expert's group; ``glo``/``gk`` (C, L) bound each client's experts per
    group.  Nodes: clients ``0..C-1``, experts ``C..C+E-1``, S, T, then client-group ``(c, l)`` at
    ``C + E + 2 + c * L + l``.  Returns ``tails, heads, capacities, costs, supplies, pairs`` with
    the pair arcs right after the ``C`` source arcs and the ``C * L`` client-group arcs.
    """
    C, E = net.shape
    L = glo.shape[1]
    pairs = np.nonzero(net.allowed)
    ci, ei = pairs
    base = C + E + 2
    reach = np.zeros((C, L), dtype=np.int64)
    np.add.at(reach, (ci, group[ei]), 1)
    upper = np.minimum(gk, reach)
    tails, heads, caps, costs, supplies = net.arcs(pairs)
    cg = base + np.arange(C * L)
    g_tails = np.repeat(np.arange(C), L)
    g_caps = np.maximum(upper - glo, 0).ravel()
    supplies = np.concatenate([supplies, glo.ravel().astype(np.int64)])
    np.add.at(supplies, g_tails, -glo.ravel().astype(np.int64))
    tails = np.concatenate([tails[:C], g_tails, base + ci * L + group[ei], tails[C + len(ci):]])
    heads = np.concatenate([heads[:C], cg, heads[C:C + len(ci)], heads[C + len(ci):]])
    caps = np.concatenate([caps[:C], g_caps, caps[C:]])
    costs = np.concatenate([costs[:C], np.zeros(C * L), costs[C:]])
    return tails, heads, caps.astype(np.int64), costs, supplies, pairs
