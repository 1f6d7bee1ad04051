"""Band prices over exact client knapsacks (budgeted count-load rounds; used by the ``flow`` warm start).

Folding the expert load rows into the fitness with prices ``nu`` (E,) leaves one independent
problem per client: its best set of allowed experts within its minimum, capacity and budget,
solved exactly by dynamic programming over (experts held, budget used)::

    UB(nu) = sum_c best_c(G - nu) + sum_e (nu+_e U_e - nu-_e L_e)

is an upper bound for every ``nu`` (soft band: ``|nu| <= soft_penalty``).  Each client's sets
are exact rather than the LP's fractional fill of its budget, so the bound's minimum is at most
the LP bound and, where budgets bind, well below it (2,000 x 32 budgeted, seed 1: 2,817.7
against the LP's 2,936.4; the optimum is 2,803.5).  The sets at good prices already fit every
budget, so they make good slot references for :func:`.prices.slot_primal`.

Only each client's ``capacity`` best experts of each usage value can be in its best set
(:class:`Knapsacks`), so the programme runs on those candidates where they are fewer than the
experts: 12 columns instead of 128 at 100,000 x 128 with four expert sizes.  Applies when usage
values are integers after one common denominator and the table (clients x candidate columns x
slots x budget units) stays within ``MAX_CELLS``.  Prices follow Polyak
subgradient steps towards 1 % below the best bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..numeric import common_denominator
from ..problem import AlignmentProblem
from .bands import BandRows

MAX_DENOMINATOR = 64    # usage and budgets are scaled by a common denominator up to this
MAX_WIDTH = 256         # budget units per client at most (after scaling)
MAX_CELLS = 10 ** 8     # clients x columns x (slots + 1) x (budget units + 1) at most
STALL = 10              # iterations without a gain in the bound before the search stops
TARGET = 0.01          # Polyak steps aim this far (relative) below the best bound
THETA = 2.0             # first step scale (halved after 3 iterations without a better bound)
SAMPLE_CLIENTS = 20_000  # above this many clients the prices are first searched on a sample this large
SAMPLE_SHARE = 0.6      # of the time the sample may use
SAMPLE_THETA = 0.25     # step scale of the full search that starts from the sample's prices


@dataclass
class BandPrices:
    bound: float = np.inf                   # best (least) UB(nu)
    references: list = field(default_factory=list)   # (UB, each client's best sets) per iteration
    stats: dict = field(default_factory=dict)


def integer_budget(problem: AlignmentProblem) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(usage, budget)`` as integers with the same 0-1 solutions (usage times the common
    denominator of its values, budgets times it rounded down and clipped to what a client's
    capacity can spend; a pair that is not allowed gets a usage no budget fits), or None when no
    small denominator exists or the table is too large.  Per-expert usage with every pair allowed
    stays a (C, E) broadcast of one row."""
    if problem.usage is None or problem.weight_matrix is not None:
        return None

    u, B = np.asarray(problem.usage, dtype=float), problem.budget
    C, E = problem.fitness.shape
    allowed = None if problem.allowed is None else problem.allowed_matrix
    row = u.ndim == 1 and allowed is None                   # one usage row shared by every client
    values = u if allowed is None else u[allowed.any(axis=0)] if u.ndim == 1 else u[allowed]
    q = common_denominator(values, MAX_DENOMINATOR)
    if q is None or np.any(values < 0):
        return None
    ui = np.rint(u * q).astype(np.int64)
    K = min(int(problem.capacity_array.max(initial=0)), E)
    if row:
        top = int(np.sort(ui)[E - K:].sum()) if K else 0
    else:
        ui = np.broadcast_to(ui, (C, E))
        held = np.where(allowed, ui, 0)
        top = int(np.partition(held, E - K, axis=1)[:, E - K:].sum(axis=1).max(initial=0)) if K else 0
    Bi = np.minimum(np.floor(B * q + 1e-9).astype(np.int64), top)
    W = int(Bi.max(initial=0))
    if W > MAX_WIDTH:
        return None
    if row:
        ui = np.broadcast_to(ui, (C, E))
    else:
        ui = np.where(allowed, ui, W + 1)                 # never fits (and never a candidate)
    kinds = np.count_nonzero(np.bincount(np.minimum(ui[0] if row else ui, W + 1).ravel(), minlength=W + 2)[:W + 1])
    columns = K * kinds if K * kinds < E else E           # see Knapsacks
    if C * columns * (K + 1) * (W + 1) > MAX_CELLS:
        return None
    return ui, Bi


class Knapsacks:
    """Each client's best sets under integer ``usage`` (C, E), ``budget`` (C,), ``low..cap`` experts.

    Only the ``cap`` best experts of each usage value can be in a best set (swapping one for a
    better expert of the same usage keeps the set within every limit), so where that leaves fewer
    columns than ``E`` the dynamic programme runs on those candidates alone: the same optimum.
    """

    def __init__(self, usage: np.ndarray, budget: np.ndarray, low: np.ndarray, cap: np.ndarray) -> None:
        self.usage, self.budget, self.low, self.cap = usage, budget, low, cap
        C, E = usage.shape
        self.K, self.W = int(cap.max(initial=0)), int(budget.max(initial=0))
        row = C > 0 and usage.strides[0] == 0                # a broadcast row: the same usage for every client
        clipped = np.minimum(usage[:1] if row else usage, self.W + 1)
        present = np.flatnonzero(np.bincount(clipped.ravel(), minlength=self.W + 2)[:self.W + 1])
        self.groups: list[tuple[int, np.ndarray, Optional[np.ndarray]]] = []
        if 0 < self.K and self.K * len(present) < E and clipped.min(initial=0) >= 0:
            for w in present.tolist():
                cols = np.flatnonzero((clipped == w).any(axis=0))
                inside = None if row else usage[:, cols] == w
                self.groups.append((w, cols, None if inside is None or inside.all() else inside))

    @property
    def columns(self) -> int:
        """Columns the dynamic programme runs on."""
        if not self.groups:
            return self.usage.shape[1]
        return sum(min(self.K, len(cols)) for _, cols, _ in self.groups)

    def best(self, value: np.ndarray, shift: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Each client's best total of ``value - shift[None, :]`` (value -inf: not allowed) and its
        (C, E) set; -inf and an empty row where no set fits."""
        if not self.groups:
            return _programme(value if shift is None else value - shift[None, :], self.usage, self.budget,
                              self.low, self.cap)
        C = value.shape[0]
        index, values, usages = [], [], []
        for w, cols, inside in self.groups:
            sub = value[:, cols]
            if shift is not None:
                sub -= shift[cols][None, :]
            if inside is not None:
                sub[~inside] = -np.inf
            if len(cols) > self.K:
                top = np.argpartition(-sub, self.K - 1, axis=1)[:, :self.K]
                sub = np.take_along_axis(sub, top, axis=1)
                index.append(cols[top])
            else:
                index.append(np.broadcast_to(cols, (C, len(cols))))
            values.append(sub)
            usages.append(np.full(sub.shape, w, dtype=np.int64))
        index = np.concatenate(index, axis=1)
        best, chosen = _programme(np.concatenate(values, axis=1), np.concatenate(usages, axis=1),
                                  self.budget, self.low, self.cap)
        x = np.zeros(value.shape, dtype=bool)
        rows, j = np.nonzero(chosen)
        x[rows, index[rows, j]] = True
        return best, x


def best_sets(value: np.ndarray, usage: np.ndarray, budget: np.ndarray, low: np.ndarray,
              cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each client's best total ``value`` (-inf: not allowed) over sets of ``low..cap`` experts
    with integer ``usage`` summing to at most ``budget``, and the (C, E) sets; -inf and an empty
    row where no set fits."""
    return Knapsacks(usage, budget, low, cap).best(value)


def _programme(value: np.ndarray, usage: np.ndarray, budget: np.ndarray, low: np.ndarray,
               cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`best_sets` by dynamic programming over (experts held, budget used), column by column."""
    C, E = value.shape
    K, W = int(cap.max(initial=0)), int(budget.max(initial=0))
    dp = np.full((K + 1, W + 1, C), -np.inf)             # clients last: every slice is contiguous rows
    dp[0, 0] = 0.0
    took = np.zeros((E, K + 1, W + 1, C), dtype=bool)
    buffer, higher = np.empty((K, W + 1, C)), np.empty((K, W + 1, C), dtype=bool)   # reused: no new pages per column
    for e in range(E):
        v = value[:, e]
        finite = np.isfinite(v)
        u = usage[:, e]
        for w in ([int(u[0])] if finite.all() and np.all(u == u[0]) else np.unique(u[finite]).tolist()):
            if w > W:
                continue
            rows = np.flatnonzero((u == w) & finite)
            if len(rows) == C:
                cand, better = buffer[:, :W + 1 - w], higher[:, :W + 1 - w]
                np.add(dp[:K, :W + 1 - w], v, out=cand)
                np.greater(cand, dp[1:, w:], out=better)
                np.copyto(dp[1:, w:], cand, where=better)
                took[e, 1:, w:] = better
            else:
                cand = dp[:K, :W + 1 - w, rows] + v[rows]
                old = dp[1:, w:, rows]
                better = cand > old
                dp[1:, w:, rows] = np.where(better, cand, old)
                took[e][1:, w:, rows] = better
    k = np.arange(K + 1)[:, None, None]
    fits = (k >= low) & (k <= cap) & (np.arange(W + 1)[None, :, None] <= budget)
    flat = np.where(fits, dp, -np.inf).reshape(-1, C)
    arg = flat.argmax(axis=0)
    every = np.arange(C)
    best = flat[arg, every]
    kk, bb = arg // (W + 1), arg % (W + 1)
    kk = np.where(np.isfinite(best), kk, 0)
    x = np.zeros((C, E), dtype=bool)
    for e in range(E - 1, -1, -1):
        t = (kk > 0) & took[e, kk, bb, every]
        x[t, e] = True
        bb = np.where(t, bb - usage[:, e], bb)
        kk = np.where(t, kk - 1, kk)
    return best, x


def band_prices(problem: AlignmentProblem, *, deadline: float, soft_penalty: Optional[float] = None,
                max_iterations: int = 100, seed: int = 0) -> Optional[BandPrices]:
    """Subgradient search on the band prices until ``deadline`` (at least one iteration),
    ``max_iterations``, or ``STALL`` iterations without a relative gain of 1e-6 in the bound;
    None where the method does not apply (see the module docstring) or a client has no set that fits.

    Above ``SAMPLE_CLIENTS`` clients the prices are first searched on that many clients drawn
    with ``seed`` (the band scaled to their share; up to ``SAMPLE_SHARE`` of the time), and the
    search on every client starts from them: loads respond to prices alike in the sample, at a
    fraction of the cost per iteration.  Only full iterations give bounds and references.
    """

    ints = integer_budget(problem)
    if ints is None:
        return None
    usage, budget = ints
    started = time.perf_counter()
    low, cap = problem.min_experts_array, problem.capacity_array
    G = np.where(problem.allowed_matrix, problem.objective_matrix, -np.inf)
    band = BandRows(problem, soft_penalty)
    C, E = G.shape
    nu, theta, stats = np.zeros(E), THETA, {}
    if C > SAMPLE_CLIENTS:
        rows = np.sort(np.random.default_rng(seed).choice(C, SAMPLE_CLIENTS, replace=False))
        shared = usage.strides[0] == 0                      # one usage row: keep it a broadcast (see Knapsacks)
        picked = np.broadcast_to(usage[0], (len(rows), E)) if shared else usage[rows]
        sample = _Search(Knapsacks(picked, budget[rows], low[rows], cap[rows]), G[rows],
                         BandRows(problem, soft_penalty, share=SAMPLE_CLIENTS / C), keep=False)
        end = started + SAMPLE_SHARE * (deadline - started) if np.isfinite(deadline) else np.inf
        if not sample.run(nu, theta, end, max_iterations):
            return None
        nu, theta = sample.best_nu, SAMPLE_THETA
        stats["sample"] = {"clients": SAMPLE_CLIENTS, "iterations": sample.iterations}
    full = _Search(Knapsacks(usage, budget, low, cap), G, band, keep=True)
    if not full.run(nu, theta, deadline, max_iterations):
        return None
    out = BandPrices(bound=full.bound, references=full.references)
    out.stats = {"iterations": full.iterations, "seconds": time.perf_counter() - started,
                 "columns": full.sets.columns, **stats}
    return out


class _Search:
    """Polyak subgradient steps on the band prices over one set of clients."""

    def __init__(self, sets: Knapsacks, G: np.ndarray, band, keep: bool) -> None:
        self.sets, self.G, self.band, self.keep = sets, G, band, keep
        self.bound, self.best_nu, self.references, self.iterations = np.inf, None, [], 0

    def run(self, nu: np.ndarray, theta: float, deadline: float, max_iterations: int) -> bool:
        """Search from ``nu`` until ``deadline`` (one iteration at least), ``max_iterations`` or a
        stall; False if a client has no set that fits."""
        started = time.perf_counter()
        stall, gained = 0, 0
        for it in range(1, max_iterations + 1):
            self.iterations = it
            value, x = self.sets.best(self.G, nu)
            if not np.all(np.isfinite(value)):
                return False
            ub = float(value.sum()) + self.band.constant(nu)
            ub += 1e-9 * max(1.0, abs(ub))                   # floating-point margin: the bound stays valid
            if self.keep:
                self.references.append((ub, x))
            if ub < self.bound - 1e-6 * abs(self.bound):
                gained = it
            if ub < self.bound:
                self.bound, self.best_nu, stall = ub, nu, 0
            else:
                stall += 1
                if stall >= 3:
                    theta, stall = theta / 2, 0
            g = self.band.subgradient(nu, x.sum(axis=0))
            norm = float(g @ g)
            per_iteration = (time.perf_counter() - started) / it
            if norm == 0 or time.perf_counter() + per_iteration > deadline or it - gained >= STALL:
                break
            step = theta * TARGET * max(abs(self.bound), 1e-9) / norm + theta * max(ub - self.bound, 0.0) / norm
            nu = self.band.step(nu, g, step)
        return True
