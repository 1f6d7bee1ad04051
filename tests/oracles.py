"""Independent answers for small problems: brute-force enumeration and scipy's milp.

Built from the problem's fields directly (not from the package's formulations), so a bug in a
formulation cannot hide behind the same bug in its check.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from alignment_solver import AlignmentProblem


def _dense(p: AlignmentProblem):
    C, E = p.fitness.shape
    G = np.asarray(p.fitness, float).copy()
    if p.previous is not None:
        G -= p.switch_penalty * ~np.asarray(p.previous)
    w = np.ones((C, E)) if p.load_weight is None else np.broadcast_to(
        np.asarray(p.load_weight, float)[:, None] if np.ndim(p.load_weight) == 1 else p.load_weight, (C, E))
    cap = np.broadcast_to(p.capacity, (C,))
    low = np.broadcast_to(p.min_experts, (C,))
    L = np.broadcast_to(p.expert_min_load, (E,)).astype(float)
    U = np.broadcast_to(np.inf if p.expert_max_load is None else p.expert_max_load, (E,)).astype(float)
    allowed = np.ones((C, E), bool) if p.allowed is None else np.asarray(p.allowed)
    usage = None if p.usage is None else np.broadcast_to(p.usage, (C, E))
    return G, w, cap, low, L, U, allowed, usage


def _groups(p: AlignmentProblem):
    """``(member, glo, gk)`` from the raw group fields: member (L, E) bool, bounds (C, L); or None."""
    if p.expert_group is None:
        return None
    C = p.fitness.shape[0]
    g = np.asarray(p.expert_group, dtype=int)
    n = int(g.max()) + 1
    member = np.arange(n)[:, None] == g[None, :]

    def per(v, default):
        v = np.asarray(default if v is None else v)
        return np.broadcast_to(v[:, None] if v.ndim == 1 else v, (C, n)).astype(float)
    return member, per(p.group_min_experts, 0), per(p.group_capacity, np.inf)


def _group_ok(p: AlignmentProblem, x: np.ndarray) -> bool:
    groups = _groups(p)
    if groups is None:
        return True
    member, glo, gk = groups
    per = x.astype(int) @ member.T.astype(int)
    return bool(((per >= glo) & (per <= gk)).all())


def _floor(p: AlignmentProblem) -> np.ndarray:
    return np.broadcast_to(np.asarray(p.expert_min_group, dtype=int), (p.fitness.shape[1],))


def _floor_ok(p: AlignmentProblem, x: np.ndarray) -> bool:
    """Each expert has no trainer or at least ``expert_min_group`` (from the raw field)."""
    n = x.sum(axis=0)
    return bool(((n == 0) | (n >= _floor(p))).all())


def brute_force(p: AlignmentProblem, soft_penalty: Optional[float] = None) -> Optional[float]:
    """Best objective over every 0-1 matrix (None if infeasible); C * E <= 16."""
    C, E = p.fitness.shape
    assert C * E <= 16
    G, w, cap, low, L, U, allowed, usage = _dense(p)
    rows = np.array(list(itertools.product([0, 1], repeat=E)), dtype=bool)       # every row pattern
    best = None
    for combo in itertools.product(range(len(rows)), repeat=C):
        x = rows[list(combo)]
        if (x & ~allowed).any():
            continue
        n = x.sum(1)
        if (n > cap).any() or (n < low).any() or not _group_ok(p, x) or not _floor_ok(p, x):
            continue
        if usage is not None and ((usage * x).sum(1) > np.asarray(p.budget) + 1e-9).any():
            continue
        load = (w * x).sum(0)
        miss = np.maximum(L - load, 0).sum() + np.maximum(load - U, 0).sum()
        if soft_penalty is None and miss > 1e-9:
            continue
        value = (G * x).sum() - (soft_penalty or 0.0) * miss
        if best is None or value > best + 1e-12:
            best = value
    return best


def scipy_milp(p: AlignmentProblem, time_limit: float = 60, soft_penalty: Optional[float] = None) -> Optional[float]:
    """Optimal objective from scipy.optimize.milp (HiGHS inside scipy, gap 0); None if infeasible.

    The value returned is recomputed from the rounded 0-1 answer by :func:`value`.

    ``soft_penalty``: the load band becomes slack (shortfall and excess per expert) priced at it.
    """
    C, E = p.fitness.shape
    G, w, cap, low, L, U, allowed, usage = _dense(p)
    n = C * E
    ns = 2 * E if soft_penalty is not None else 0
    groups = _groups(p)
    n_groups = 0 if groups is None else groups[0].shape[0]
    rows = C + E + (C if usage is not None else 0) + C * n_groups
    A = lil_matrix((rows, n + ns))
    lo = np.full(rows, -np.inf)
    hi = np.full(rows, np.inf)
    for c in range(C):
        A[c, c * E:(c + 1) * E] = 1
        lo[c], hi[c] = low[c], cap[c]
    for e in range(E):
        A[C + e, [c * E + e for c in range(C)]] = w[:, e]
        lo[C + e], hi[C + e] = L[e], U[e]
        if ns:
            A[C + e, n + e] = 1.0          # shortfall
            A[C + e, n + E + e] = -1.0     # excess
    if usage is not None:
        for c in range(C):
            A[C + E + c, c * E:(c + 1) * E] = usage[c]
            hi[C + E + c] = p.budget[c]
    if groups is not None:
        member, glo, gk = groups
        first = C + E + (C if usage is not None else 0)
        for c in range(C):
            for g in range(n_groups):
                r = first + c * n_groups + g
                A[r, [c * E + e for e in np.flatnonzero(member[g])]] = 1
                lo[r], hi[r] = glo[c, g], gk[c, g]
    floors = [e for e in range(E) if _floor(p)[e] > 1]
    nf = len(floors)
    if nf:                                 # y_e: m_e y_e <= trainers of e <= C y_e
        F = lil_matrix((2 * nf, n + ns + nf))
        for i, e in enumerate(floors):
            for r, bound in ((2 * i, _floor(p)[e]), (2 * i + 1, C)):
                F[r, [c * E + e for c in range(C)]] = 1
                F[r, n + ns + i] = -bound
        A = lil_matrix(np.vstack([np.hstack([A.toarray(), np.zeros((rows, nf))]), F.toarray()]))
        lo = np.concatenate([lo, np.tile([0.0, -np.inf], nf)])
        hi = np.concatenate([hi, np.tile([np.inf, 0.0], nf)])
    cost = np.concatenate([-G.ravel(), np.full(ns, soft_penalty or 0.0), np.zeros(nf)])
    upper = np.concatenate([allowed.ravel().astype(float), np.full(ns, np.inf), np.ones(nf)])
    res = milp(cost, constraints=LinearConstraint(A.tocsr(), lo, hi),
               integrality=np.concatenate([np.ones(n), np.zeros(ns), np.ones(nf)]),
               bounds=Bounds(np.zeros(n + ns + nf), upper),
               options={"time_limit": time_limit, "mip_rel_gap": 0.0})
    if res.status == 2:
        return None
    assert res.status == 0, res.message
    # The value of the rounded assignment: HiGHS' tolerances (1e-7 on rows) would otherwise let
    # the continuous slack, and so -res.fun, drift by up to about 1e-6.
    return value(p, res.x[:n].reshape(C, E) > 0.5, soft_penalty)


def violations(p: AlignmentProblem, x: np.ndarray, soft: bool = False, tol: float = 1e-6) -> list[str]:
    """Constraints of ``p`` that ``x`` breaks, from the raw fields (not the package's checker)."""
    G, w, cap, low, L, U, allowed, usage = _dense(p)
    x = np.asarray(x, dtype=bool)
    out = []
    n = x.sum(1)
    out += [f"capacity of client {c}" for c in np.flatnonzero(n > cap)]
    out += [f"min_experts of client {c}" for c in np.flatnonzero(n < low)]
    out += [f"mask at {tuple(ce)}" for ce in np.argwhere(x & ~allowed)]
    if not _group_ok(p, x):
        out.append("a group row")
    if not _floor_ok(p, x):
        out.append("a privacy floor")
    if usage is not None:
        out += [f"budget of client {c}" for c in np.flatnonzero((usage * x).sum(1) > np.asarray(p.budget) + tol)]
    if not soft:
        load = (w * x).sum(0)
        out += [f"load of expert {e}" for e in np.flatnonzero((load < L - tol) | (load > U + tol))]
    return out


def value(p: AlignmentProblem, x: np.ndarray, soft_penalty: Optional[float] = None) -> float:
    """Objective of ``x`` from the raw fields (penalised band misses when ``soft_penalty``)."""
    G, w, cap, low, L, U, allowed, usage = _dense(p)
    x = np.asarray(x, dtype=bool)
    total = float((G * x).sum())
    if soft_penalty is not None:
        load = (w * x).sum(0)
        total -= soft_penalty * float(np.maximum(L - load, 0).sum() + np.maximum(load - U, 0).sum())
    return total


def networkx_flow(p: AlignmentProblem, scale: float = 1e6) -> Optional[float]:
    """Count-load optimum as a min-cost circulation solved by networkx's network simplex.

    Lower bounds are moved into node demands; costs are scaled to integers by ``scale``.  Group
    rows become client-group nodes between each client and its experts.
    """
    import networkx as nx

    C, E = p.fitness.shape
    G, _, cap, low, L, U, allowed, _ = _dense(p)
    L = np.ceil(L - 1e-9).astype(int)
    U = np.floor(np.minimum(U, C) + 1e-9).astype(int)
    g = nx.DiGraph()
    demand = {("c", c): 0 for c in range(C)} | {("e", e): 0 for e in range(E)} | {"S": 0, "T": 0}

    def arc(u, v, lower, upper, cost):
        if upper < lower:
            raise ValueError("infeasible arc")
        g.add_edge(u, v, capacity=int(upper - lower), weight=int(cost))
        demand[u] += lower        # u must send `lower` more than it receives
        demand[v] -= lower

    groups = _groups(p)
    try:
        for c in range(C):
            arc("S", ("c", c), int(low[c]), int(cap[c]), 0)
            if groups is not None:
                member, glo, gk = groups
                for grp in range(member.shape[0]):
                    demand[("g", c, grp)] = 0
                    arc(("c", c), ("g", c, grp), int(glo[c, grp]), int(min(gk[c, grp], cap[c])), 0)
            for e in range(E):
                if allowed[c, e]:
                    tail = ("c", c) if groups is None else ("g", c, int(np.asarray(p.expert_group)[e]))
                    arc(tail, ("e", e), 0, 1, -round(G[c, e] * scale))
        for e in range(E):
            arc(("e", e), "T", int(L[e]), int(U[e]), 0)
        arc("T", "S", 0, int(cap.sum()), 0)
    except ValueError:
        return None
    for node, dem in demand.items():
        g.add_node(node, demand=dem)
    try:
        flow = nx.min_cost_flow(g)
    except nx.NetworkXUnfeasible:
        return None
    def tail(c, e):
        return ("c", c) if groups is None else ("g", c, int(np.asarray(p.expert_group)[e]))
    return sum(G[c, e] * flow[tail(c, e)].get(("e", e), 0) for c in range(C) for e in range(E))


def strict_violations(p: AlignmentProblem, x: np.ndarray, soft: bool = False, rtol: float = 1e-9) -> list[str]:
    """Like :func:`violations`, with each weighted row's slack ``rtol`` times that row's magnitude
    (its largest finite bound or allowed coefficient), so rows of tiny numbers are checked as
    strictly as rows of large ones."""
    G, w, cap, low, L, U, allowed, usage = _dense(p)
    x = np.asarray(x, dtype=bool)
    out = [v for v in violations(p, x, soft=True, tol=np.inf)]
    if usage is not None:
        mag = np.maximum(np.where(allowed, usage, 0).max(1), np.asarray(p.budget, float))
        out += [f"budget of client {c}" for c in
                np.flatnonzero((usage * x).sum(1) > np.asarray(p.budget) + rtol * mag)]
    if not soft:
        load = (w * x).sum(0)
        mag = np.maximum(np.where(allowed, w, 0).max(0), np.maximum(L, np.where(np.isfinite(U), U, 0)))
        if p.load_weight is None:
            mag = np.zeros_like(mag)                          # counts are exact
        out += [f"load of expert {e}" for e in np.flatnonzero((load < L - rtol * mag) | (load > U + rtol * mag))]
    return out


def strict_brute_force(p: AlignmentProblem) -> Optional[float]:
    """Best objective over every 0-1 matrix under :func:`strict_violations` (None if infeasible)."""
    C, E = p.fitness.shape
    assert C * E <= 12
    G = _dense(p)[0]
    rows = np.array(list(itertools.product([0, 1], repeat=E)), dtype=bool)
    best = None
    for combo in itertools.product(range(len(rows)), repeat=C):
        x = rows[list(combo)]
        if not strict_violations(p, x):
            v = float((G * x).sum())
            best = v if best is None else max(best, v)
    return best
