"""The greedy completion: the ``greedy`` backend, the time-limit fallback and the warm starts' repair.

Three vectorised phases, each adding one (client, expert) pair per client per pass while it
fits every upper limit (capacity, per-group capacity, expert max load, budget): first the experts
below their minimum load take their best-fitting free clients, then clients below their minimum
(or below a group's minimum: an expert of that group) take their best expert, then every client
adds its best remaining expert while that raises the objective.  The answer is FEASIBLE when
it satisfies every hard constraint, else NO_SOLUTION_FOUND (in soft mode band misses are
allowed and priced).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..problem import AlignmentProblem


class _State:
    def __init__(self, p: AlignmentProblem, start: Optional[np.ndarray] = None,
                 score: Optional[np.ndarray] = None) -> None:
        self.every = p.allowed is None or bool(p.allowed_matrix.all())
        G = p.objective_matrix if score is None else score
        self.G = G if self.every else np.where(p.allowed_matrix, G, -np.inf)
        self.w = None if p.weight_matrix is None else np.asarray(p.weight_matrix)   # None: count loads
        self.u = None if p.usage_matrix is None else np.asarray(p.usage_matrix)
        self.B = None if p.budget is None else p.budget + p.budget_tolerance
        self.k = p.capacity_array
        self.lo = p.min_experts_array
        self.L, self.U = p.min_load_array, p.max_load_array + p.load_tolerance     # the checker's own slack
        self.L_short = p.min_load_array - p.load_tolerance
        self.x = np.zeros(p.fitness.shape, dtype=bool) if start is None else np.array(start, dtype=bool)
        self.count = self.x.sum(axis=1)
        self.load = self.x.sum(axis=0).astype(float) if self.w is None else (self.w * self.x).sum(axis=0)
        self.used = np.zeros(p.n_clients) if self.u is None else (self.u * self.x).sum(axis=1)
        self.grouped = p.has_groups
        if self.grouped:
            self.group = p.group_array
            self.gk, self.glo = p.group_capacity_matrix, p.group_min_matrix
            self.gcount = p.group_counts(self.x)

    def group_room(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), E) mask: the expert's group still has room in the client's group capacity."""
        return (self.gcount[rows] < self.gk[rows])[:, self.group]

    def group_short(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), E) mask: the expert's group is below the client's group minimum."""
        return (self.gcount[rows] < self.glo[rows])[:, self.group]

    def weight(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.ones(len(rows)) if self.w is None else self.w[rows, cols]

    def fits(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), E) mask of pairs that may be added now without breaking an upper limit."""
        ok = ~self.x[rows] & (self.count[rows] < self.k[rows])[:, None]
        if not self.every:
            ok &= np.isfinite(self.G[rows])
        ok &= self.load[None, :] + (1.0 if self.w is None else self.w[rows]) <= self.U[None, :]
        if self.u is not None:
            ok &= self.used[rows, None] + self.u[rows] <= self.B[rows, None]
        if self.grouped:
            ok &= self.group_room(rows)
        return ok

    def fits_expert(self, e: int) -> np.ndarray:
        """(C,) mask of clients that may take expert ``e`` now."""
        ok = ~self.x[:, e] & (self.count < self.k)
        if not self.every:
            ok &= np.isfinite(self.G[:, e])
        ok &= self.load[e] + (1.0 if self.w is None else self.w[:, e]) <= self.U[e]
        if self.u is not None:
            ok &= self.used + self.u[:, e] <= self.B
        if self.grouped:
            ok &= self.gcount[:, self.group[e]] < self.gk[:, self.group[e]]
        return ok

    def add(self, rows: np.ndarray, cols: np.ndarray) -> int:
        """Add pairs in the given order, skipping those that would overfill their expert."""
        if not len(rows):
            return 0
        order = np.lexsort((np.arange(len(rows)), cols))
        rows, cols = rows[order], cols[order]
        w = self.weight(rows, cols)
        starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, len(cols)]))
        csum = np.cumsum(w)
        within = csum - (csum[group_start] - w[group_start])
        keep = self.load[cols] + within <= self.U[cols]
        rows, cols = rows[keep], cols[keep]
        self.x[rows, cols] = True
        np.add.at(self.count, rows, 1)
        np.add.at(self.load, cols, w[keep])
        if self.u is not None:
            np.add.at(self.used, rows, self.u[rows, cols])
        if self.grouped:
            np.add.at(self.gcount, (rows, self.group[cols]), 1)
        return len(rows)


def _best_first(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest ``values``, largest first (ties by position)."""
    if n < len(values):
        part = np.argpartition(-values, n - 1)[:n]
        return part[np.lexsort((part, -values[part]))]
    return np.argsort(-values, kind="stable")


def complete(problem: AlignmentProblem, start: Optional[np.ndarray] = None,
             deadline: Optional[float] = None, score: Optional[np.ndarray] = None) -> np.ndarray:
    """Extend ``start`` (default: nothing assigned) greedily; never removes a pair.

    ``score`` (C, E) ranks the pairs instead of the objective (e.g. fitness minus Lagrangian
    prices); the constraints are the problem's own.  ``deadline`` (a ``time.perf_counter()`` value) stops the passes early; the partial answer
    is returned and the caller checks it like any other.
    """
    s = _State(problem, start, score)

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    # Phase 1: experts below their minimum load take their best free clients (scarcest first).
    reach = (np.isfinite(s.G).sum(axis=0).astype(float) if s.w is None
             else np.where(np.isfinite(s.G), s.w, 0).sum(axis=0))
    for e in np.argsort(-(s.L / np.maximum(reach, 1e-12)), kind="stable"):
        while s.load[e] < s.L_short[e] and not late():
            rows = np.flatnonzero(s.fits_expert(e))
            if not len(rows):
                break
            short = s.L_short[e] - s.load[e]
            guess = int(np.ceil(short)) + 1 if s.w is None else len(rows)
            rows = rows[_best_first(s.G[rows, e], min(guess, len(rows)))]
            need = np.searchsorted(np.cumsum(s.weight(rows, np.full(len(rows), e))), short) + 1
            if not s.add(rows[:need], np.full(min(need, len(rows)), e)):
                break
    # Phase 2 and 3: clients below their minimum, then any client while it gains.
    for positive_only in (False, True):
        while not late():
            below = s.count < (s.k if positive_only else s.lo)
            if s.grouped and not positive_only:
                below |= (s.gcount < s.glo).any(axis=1) & (s.count < s.k)
            rows = np.flatnonzero(below)
            if not len(rows):
                break
            ok = s.fits(rows)
            if s.grouped and not positive_only:      # a client short in a group takes from that group first
                short = s.group_short(rows)
                ok &= np.where(short.any(axis=1)[:, None], short, True)
            value = np.where(ok, s.G[rows], -np.inf)
            if positive_only:
                value = np.where(value > 0, value, -np.inf)
            best = value.argmax(axis=1)
            ok = np.isfinite(value[np.arange(len(rows)), best])
            if not ok.any():
                break
            rows, best = rows[ok], best[ok]
            order = np.argsort(-s.G[rows, best], kind="stable")
            if not s.add(rows[order], best[order]):
                break
    return s.x


__all__ = ["complete"]
