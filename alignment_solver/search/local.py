"""Local search on a plan that satisfies every hard row (used by ``cpsat`` after a warm start).

Count loads (every client adds 1 to an expert's load): ejection cycles.  Take a graph on the
experts plus a reservoir node ``R``; an arc ``a -> b`` is the best single client move from
``a`` to ``b``, ``R -> b`` the best client adding ``b`` (or ``b`` giving up one unit of load),
``a -> R`` the best client dropping ``a`` (or ``a`` keeping one more unit).  Around a cycle
every expert gains one client and loses one, so loads move only where the reservoir's slack
arcs say, and the cycle's gain is the sum of its arcs.  Each round scores every 2- and 3-cycle
and applies the best ones whose clients are distinct.

Weighted loads: single moves (a client shifts to another expert or adds one) and swaps of two
clients between two experts.

Every move is checked against the current plan before it is applied (capacity, minimum, budget,
allowed pairs, the band, or its price in soft mode) and applied only when the true objective
rises, so the plan stays feasible and never gets worse.  Deterministic: no randomness, stable
orders.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..problem import AlignmentProblem

EPS = 1e-9
CYCLES_PER_ROUND = 256


class _Plan:
    def __init__(self, p: AlignmentProblem, x: np.ndarray, soft_penalty: Optional[float]) -> None:
        self.G = np.where(p.allowed_matrix, p.objective_matrix, -np.inf)
        self.w = p.weight_matrix
        self.u, self.B = p.usage_matrix, p.budget
        self.k, self.lo = p.capacity_array, p.min_experts_array
        self.L, self.U = p.min_load_array.astype(float), p.max_load_array.astype(float)
        self.P = soft_penalty
        self.x = np.array(x, dtype=bool)
        self.count = self.x.sum(axis=1)
        self.load = self.x.sum(axis=0).astype(float) if self.w is None else (self.w * self.x).sum(axis=0)
        self.used = None if self.u is None else (self.u * self.x).sum(axis=1)

    def band(self, e: np.ndarray, load: np.ndarray) -> np.ndarray:
        """The band term of experts ``e`` at loads ``load``: 0 inside, -inf (hard) or -P * miss."""
        miss = np.maximum(self.L[e] - load, 0) + np.maximum(load - self.U[e], 0)
        if self.P is None:
            return np.where(miss > EPS, -np.inf, 0.0)
        return -self.P * miss

    def weight(self, c: int, e: int) -> float:
        return 1.0 if self.w is None else float(self.w[c, e])

    def try_moves(self, moves: list[tuple[int, int, int]]) -> bool:
        """Apply ``moves`` (client, expert dropped or -1, expert added or -1) if together they
        keep every hard row and raise the objective; distinct clients only."""
        clients = [m[0] for m in moves]
        if len(set(clients)) != len(clients):
            return False
        gain, delta = 0.0, {}
        for c, out, into in moves:
            n = self.count[c] - (out >= 0) + (into >= 0)
            if n < self.lo[c] or n > self.k[c]:
                return False
            if out >= 0 and not self.x[c, out]:
                return False
            if into >= 0 and (self.x[c, into] or not np.isfinite(self.G[c, into])):
                return False
            if self.u is not None:
                spend = self.used[c] - (self.u[c, out] if out >= 0 else 0) + (self.u[c, into] if into >= 0 else 0)
                if spend > self.B[c] + EPS:
                    return False
            if out >= 0:
                gain -= self.G[c, out]
                delta[out] = delta.get(out, 0.0) - self.weight(c, out)
            if into >= 0:
                gain += self.G[c, into]
                delta[into] = delta.get(into, 0.0) + self.weight(c, into)
        if delta:
            e = np.fromiter(delta, dtype=np.int64)
            d = np.fromiter(delta.values(), dtype=float)
            gain += float((self.band(e, self.load[e] + d) - self.band(e, self.load[e])).sum()) \
                if self.P is not None else (0.0 if np.all(np.isfinite(self.band(e, self.load[e] + d))) else -np.inf)
        if not gain > EPS:
            return False
        for c, out, into in moves:
            for e, on in ((out, False), (into, True)):
                if e >= 0:
                    self.x[c, e] = on
                    self.count[c] += 1 if on else -1
                    self.load[e] += self.weight(c, e) if on else -self.weight(c, e)
                    if self.u is not None:
                        self.used[c] += self.u[c, e] if on else -self.u[c, e]
        return True

    def fits_budget(self, rows: np.ndarray, out: Optional[int]) -> np.ndarray:
        """(len(rows), E) mask: adding each expert (after dropping ``out``) stays within budget."""
        if self.u is None:
            return np.ones((len(rows), self.x.shape[1]), dtype=bool)
        spend = self.used[rows] - (0.0 if out is None else self.u[rows, out])
        return spend[:, None] + self.u[rows] <= self.B[rows, None] + EPS


def improve(problem: AlignmentProblem, x: np.ndarray, *, deadline: float,
            soft_penalty: Optional[float] = None, max_rounds: int = 200) -> np.ndarray:
    """A plan at least as good as ``x`` (which must satisfy every hard row), by the moves in the
    module docstring, until no move gains, ``max_rounds`` rounds or ``deadline``."""
    plan = _Plan(problem, x, soft_penalty)
    step = _cycles if plan.w is None else _swaps
    for _ in range(max_rounds):
        if time.perf_counter() > deadline or not step(plan, deadline):
            break
    return plan.x


def _arcs(plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """(E+1, E+1) arc gains and clients of the cycle graph (node E is the reservoir); a slack arc
    has client -1."""
    G, x = plan.G, plan.x
    C, E = x.shape
    R = E
    gain = np.full((E + 1, E + 1), -np.inf)
    who = np.full((E + 1, E + 1), -1, dtype=np.int64)
    for a in range(E):
        h = np.flatnonzero(x[:, a])
        if not len(h):
            continue
        d = np.where(~x[h] & plan.fits_budget(h, a), G[h] - G[h, a][:, None], -np.inf)
        best = d.argmax(axis=0)
        gain[a, :E] = d[best, np.arange(E)]
        who[a, :E] = h[best]
    free = np.flatnonzero(plan.count < plan.k)
    if len(free):
        d = np.where(~x[free] & plan.fits_budget(free, None), G[free], -np.inf)
        best = d.argmax(axis=0)
        gain[R, :E], who[R, :E] = d[best, np.arange(E)], free[best]
    d = np.where(x & (plan.count > plan.lo)[:, None], -G, -np.inf)
    best = d.argmax(axis=0)
    gain[:E, R], who[:E, R] = d[best, np.arange(E)], best
    e = np.arange(E)
    with np.errstate(invalid="ignore"):
        give = plan.band(e, plan.load - 1) - plan.band(e, plan.load)   # R -> e as slack: e ends one lower
        keep = plan.band(e, plan.load + 1) - plan.band(e, plan.load)   # e -> R as slack: e ends one higher
    slack_in, slack_out = give > gain[R, :E], keep > gain[:E, R]
    gain[R, :E] = np.where(slack_in, give, gain[R, :E])
    who[R, :E] = np.where(slack_in, -1, who[R, :E])
    gain[:E, R] = np.where(slack_out, keep, gain[:E, R])
    who[:E, R] = np.where(slack_out, -1, who[:E, R])
    gain[np.isnan(gain)] = -np.inf
    np.fill_diagonal(gain, -np.inf)
    return gain, who


def _cycles(plan: _Plan, deadline: float) -> bool:
    gain, who = _arcs(plan)
    n = gain.shape[0]
    R = n - 1
    two = gain + gain.T
    i, j = np.nonzero(np.triu(two > EPS, 1))
    found = [(two[a, b], (a, b)) for a, b in zip(i.tolist(), j.tolist())]
    with np.errstate(invalid="ignore"):
        three = gain[:, :, None] + gain[None, :, :] + gain.T[:, None, :]
    three[~np.isfinite(three)] = -np.inf
    a, b, c = np.nonzero(three > EPS)
    keep = (a < b) & (a < c)                                      # each cycle once, from its least node
    found += [(three[p, q, r], (p, q, r)) for p, q, r in zip(a[keep].tolist(), b[keep].tolist(), c[keep].tolist())]
    found.sort(key=lambda f: -f[0])
    applied = False
    for _, cycle in found[:CYCLES_PER_ROUND]:
        if time.perf_counter() > deadline:
            break
        moves = []
        for s, t in zip(cycle, cycle[1:] + cycle[:1]):
            c = int(who[s, t])
            if c < 0:
                continue
            moves.append((c, s if s != R else -1, t if t != R else -1))
        applied |= plan.try_moves(moves)
    return applied


def _swaps(plan: _Plan, deadline: float) -> bool:
    """Weighted loads: every improving single move, then swaps of two clients between two experts."""
    G, x, w = plan.G, plan.x, plan.w
    C, E = x.shape
    applied = False
    for c in range(C):
        for a in np.flatnonzero(x[c]).tolist() + [-1]:
            d = np.where(~x[c] & plan.fits_budget(np.array([c]), None if a < 0 else a)[0],
                         G[c] - (0.0 if a < 0 else G[c, a]), -np.inf)
            for b in np.argsort(-d, kind="stable")[:3].tolist():
                if d[b] > EPS and plan.try_moves([(c, a, b)]):
                    applied = True
                    break
        if time.perf_counter() > deadline:
            return applied
    for a in range(E):
        ha = np.flatnonzero(x[:, a])
        for b in range(a + 1, E):
            hb = np.flatnonzero(x[:, b] & ~x[:, a])
            hab = ha[~x[ha, b]]
            if not len(hab) or not len(hb):
                continue
            gain = (G[hab, b] - G[hab, a])[:, None] + (G[hb, a] - G[hb, b])[None, :]
            da = -w[hab, a][:, None] + w[hb, a][None, :]
            db = w[hab, b][:, None] - w[hb, b][None, :]
            ok = (plan.load[a] + da <= plan.U[a] + EPS) & (plan.load[a] + da >= plan.L[a] - EPS) \
                & (plan.load[b] + db <= plan.U[b] + EPS) & (plan.load[b] + db >= plan.L[b] - EPS)
            if plan.P is None:                       # soft mode: try_moves prices the band
                gain = np.where(ok, gain, -np.inf)
            if not np.any(gain > EPS):
                continue
            p, q = np.unravel_index(int(np.argmax(gain)), gain.shape)
            if plan.try_moves([(int(hab[p]), a, b), (int(hb[q]), b, a)]):
                applied = True
                ha = np.flatnonzero(x[:, a])
        if time.perf_counter() > deadline:
            break
    return applied
