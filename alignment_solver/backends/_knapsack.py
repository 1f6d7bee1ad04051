"""Band prices over exact client knapsacks (budgeted count-load rounds; used by the ``flow`` warm start).

Folding the expert load rows into the fitness with prices ``nu`` (E,) leaves one independent
problem per client: its best set of allowed experts within its minimum, capacity and budget,
solved exactly by dynamic programming over (experts held, budget used)::

    UB(nu) = sum_c best_c(G - nu) + sum_e (nu+_e U_e - nu-_e L_e)

is an upper bound for every ``nu`` (soft band: ``|nu| <= soft_penalty``).  Each client's sets
are exact rather than the LP's fractional fill of its budget, so the bound's minimum is at most
the LP bound and, where budgets bind, well below it (2,000 x 32 budgeted, seed 1: 2,817.7
against the LP's 2,936.4; the optimum is 2,803.5).  The sets at good prices already fit every
budget, so they make good slot references for :func:`._lagrangian.slot_primal`.

Applies when usage values are integers after one common denominator and the table
(clients x experts x slots x budget units) stays within ``MAX_CELLS``.  Prices follow Polyak
subgradient steps towards 1 % below the best bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..problem import AlignmentProblem

MAX_DENOMINATOR = 64    # usage and budgets are scaled by a common denominator up to this
MAX_WIDTH = 256         # budget units per client at most (after scaling)
MAX_CELLS = 10 ** 8     # clients x experts x (slots + 1) x (budget units + 1) at most
STALL = 10              # iterations without a gain in the bound before the search stops


@dataclass
class BandPrices:
    bound: float = np.inf                   # best (least) UB(nu)
    references: list = field(default_factory=list)   # (UB, each client's best sets) per iteration
    stats: dict = field(default_factory=dict)


def integer_budget(problem: AlignmentProblem) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(usage, budget)`` as integers with the same 0-1 solutions (usage times the common
    denominator of its values, budgets times it rounded down and clipped to what a client's
    capacity can spend), or None when no small denominator exists or the table is too large."""
    if problem.usage_matrix is None or problem.weight_matrix is not None:
        return None
    from .cpsat import _denominator       # imported here: cpsat imports this module

    u, B = problem.usage_matrix, problem.budget
    values = u[problem.allowed_matrix]
    q = _denominator(values, MAX_DENOMINATOR)
    if q is None or np.any(values < 0):
        return None
    ui = np.rint(u * q).astype(np.int64)
    K = int(problem.capacity_array.max(initial=0))
    top = int(np.sort(np.where(problem.allowed_matrix, ui, 0), axis=1)[:, -K:].sum(axis=1).max(initial=0)) if K else 0
    Bi = np.minimum(np.floor(B * q + 1e-9).astype(np.int64), top)
    C, E = u.shape
    W = int(Bi.max(initial=0))
    if W > MAX_WIDTH or C * E * (K + 1) * (W + 1) > MAX_CELLS:
        return None
    return ui, Bi


def best_sets(value: np.ndarray, usage: np.ndarray, budget: np.ndarray, low: np.ndarray,
              cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each client's best total ``value`` (-inf: not allowed) over sets of ``low..cap`` experts
    with integer ``usage`` summing to at most ``budget``, and the (C, E) sets; -inf and an empty
    row where no set fits."""
    C, E = value.shape
    K, W = int(cap.max(initial=0)), int(budget.max(initial=0))
    dp = np.full((C, K + 1, W + 1), -np.inf)
    dp[:, 0, 0] = 0.0
    took = np.zeros((E, C, K + 1, W + 1), dtype=bool)
    for e in range(E):
        v = value[:, e]
        for w in np.unique(usage[np.isfinite(v), e]).tolist():
            if w > W:
                continue
            rows = np.flatnonzero((usage[:, e] == w) & np.isfinite(v))
            whole = len(rows) == C
            src = dp[:, :K, :W + 1 - w] if whole else dp[rows, :K, :W + 1 - w]
            cand = src + (v if whole else v[rows])[:, None, None]
            old = dp[:, 1:, w:] if whole else dp[rows, 1:, w:]
            better = cand > old
            if whole:
                np.copyto(dp[:, 1:, w:], cand, where=better)
                took[e, :, 1:, w:] = better
            else:
                dp[rows, 1:, w:] = np.where(better, cand, old)
                took[e, rows, 1:, w:] = better
    k = np.arange(K + 1)[None, :, None]
    fits = (k >= low[:, None, None]) & (k <= cap[:, None, None]) & (np.arange(W + 1)[None, None, :] <= budget[:, None, None])
    flat = np.where(fits, dp, -np.inf).reshape(C, -1)
    arg = flat.argmax(axis=1)
    best = flat[np.arange(C), arg]
    kk, bb = arg // (W + 1), arg % (W + 1)
    kk = np.where(np.isfinite(best), kk, 0)
    x = np.zeros((C, E), dtype=bool)
    every = np.arange(C)
    for e in range(E - 1, -1, -1):
        t = (kk > 0) & took[e, every, kk, bb]
        x[t, e] = True
        bb = np.where(t, bb - usage[:, e], bb)
        kk = np.where(t, kk - 1, kk)
    return best, x


def band_prices(problem: AlignmentProblem, *, deadline: float, soft_penalty: Optional[float] = None,
                max_iterations: int = 100) -> Optional[BandPrices]:
    """Subgradient search on the band prices until ``deadline`` (at least one iteration),
    ``max_iterations``, or ``STALL`` iterations without a relative gain of 1e-6 in the bound;
    None where the method does not apply (see the module docstring) or a client has no set that fits."""
    from ._lagrangian import BandRows      # imported here: _lagrangian imports this module

    ints = integer_budget(problem)
    if ints is None:
        return None
    usage, budget = ints
    started = time.perf_counter()
    G = np.where(problem.allowed_matrix, problem.objective_matrix, -np.inf)
    band = BandRows(problem, soft_penalty)
    low, cap = problem.min_experts_array, problem.capacity_array
    nu = np.zeros(G.shape[1])
    out = BandPrices()
    theta, stall, it, gained = 2.0, 0, 0, 0
    for it in range(1, max_iterations + 1):
        value, x = best_sets(G - nu[None, :], usage, budget, low, cap)
        if not np.all(np.isfinite(value)):
            return None
        ub = float(value.sum()) + band.constant(nu)
        ub += 1e-9 * max(1.0, abs(ub))                   # floating-point margin: the bound stays valid
        out.references.append((ub, x))
        if ub < out.bound - 1e-6 * abs(out.bound):
            gained = it
        if ub < out.bound:
            out.bound, stall = ub, 0
        else:
            stall += 1
            if stall >= 3:
                theta, stall = theta / 2, 0
        g = band.subgradient(nu, x.sum(axis=0))
        norm = float(g @ g)
        per_iteration = (time.perf_counter() - started) / it
        if norm == 0 or time.perf_counter() + per_iteration > deadline or it - gained >= STALL:
            break
        step = theta * 0.01 * max(abs(out.bound), 1e-9) / norm + theta * max(ub - out.bound, 0.0) / norm
        nu = band.step(nu, g, step)
    out.stats = {"iterations": it, "seconds": time.perf_counter() - started}
    return out
