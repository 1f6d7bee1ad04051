"""Band repair for count loads: move clients between experts along one min-cost flow on the experts.

A plan that keeps every client row (capacity, minimum, budget, allowed pairs) but misses the
load band, such as the clients' best sets under band prices, is repaired without touching the
client rows.  Nodes are the experts, a reservoir ``R``, a source and a sink; a unit of flow on
``a -> b`` moves one client from expert ``a`` to ``b`` (cost: the fitness it loses), on
``R -> b`` a client adds ``b``, on ``a -> R`` one drops ``a``.  The source feeds each expert up
to its load above the band's floor and the sink takes up to its room below the ceiling; the
units outside the band are priced at ``-penalty`` (hard band: :func:`penalty_for`, more than any
chain of moves gains), so the flow fixes as much of the band as it can at the least loss, and
takes any move that gains on its way.  Each arc family keeps its ``MOVES_PER_PAIR`` best
clients, each a move that fits the client's budget.  A client is moved at most once per round
(where the flow uses a client twice, the family's next best client that has not moved stands
in), and rounds repeat on the new plan until the integer band holds, nothing moves, ``STALL``
rounds pass without fewer misses, or ``ROUNDS``; the best plan by the true objective is kept.  Deterministic.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..formulations.flow import count_band, penalty_for
from ..problem import AlignmentProblem
from .values import plan_value

MOVES_PER_PAIR = 24     # best clients per arc family (expert pair, add, drop) offered to the flow
RESERVE = 48            # best clients per family kept to stand in for clients the round already moved
ROUNDS = 8
STALL = 2               # rounds without fewer band misses before giving up


def rebalance(problem: AlignmentProblem, x: np.ndarray, *, soft_penalty: Optional[float] = None,
              deadline: float = np.inf) -> np.ndarray:
    """The best plan by :func:`.values.plan_value` among ``x`` and the rounds' plans (see
    the module docstring), which keep the client rows ``x`` keeps.  ``soft_penalty`` None: hard band."""

    x = np.array(x, dtype=bool)
    G = np.where(problem.allowed_matrix, problem.objective_matrix, -np.inf)
    L, U = count_band(problem)
    price = soft_penalty if soft_penalty is not None else penalty_for(problem.n_experts, problem.max_abs_objective)
    best, value = x.copy(), plan_value(problem, x, soft_penalty)
    least, stall = np.inf, 0
    for _ in range(ROUNDS):
        load = x.sum(axis=0)
        miss = int(np.maximum(L - load, 0).sum() + np.maximum(load - U, 0).sum())
        stall = 0 if miss < least else stall + 1
        least = min(least, miss)
        if miss == 0 or stall >= STALL or time.perf_counter() > deadline:
            break
        moves = _flow(problem, G, x, L, U, price)
        if not moves:
            break
        for c, a, b in moves:
            if a >= 0:
                x[c, a] = False
            if b >= 0:
                x[c, b] = True
        v = plan_value(problem, x, soft_penalty)
        if v > value:
            best, value = x.copy(), v
    return best


def _best(gain: np.ndarray, who: np.ndarray, n: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per row of ``gain`` (columns: clients ``who``), its up to ``n`` best finite entries, best
    first: (row, clients, gains)."""
    if not gain.size:
        return []
    m = gain.shape[1]
    top = np.argpartition(-gain, n - 1, axis=1)[:, :n] if n < m else np.broadcast_to(np.arange(m), gain.shape)
    g = np.take_along_axis(gain, top, axis=1)
    order = np.argsort(-g, axis=1, kind="stable")
    top, g = np.take_along_axis(top, order, axis=1), np.take_along_axis(g, order, axis=1)
    out = []
    for r in range(gain.shape[0]):
        ok = np.isfinite(g[r])
        if ok.any():
            out.append((r, who[top[r, ok]], g[r, ok]))
    return out


def _flow(problem: AlignmentProblem, G: np.ndarray, x: np.ndarray, L: np.ndarray, U: np.ndarray,
          price: float) -> list[tuple[int, int, int]]:
    """The moves (client, expert dropped or -1, expert added or -1) of one round."""
    from ortools.graph.python import min_cost_flow

    u, B = problem.usage_matrix, problem.budget
    row = np.asarray(problem.usage) if u is not None and np.ndim(problem.usage) == 1 else None
    C, E = x.shape
    count, load = x.sum(axis=1), x.sum(axis=0)
    slack = None if u is None else B - (u * x).sum(axis=1) + 1e-9
    R, S, T = E, E + 1, E + 2
    families: list[tuple[int, int, np.ndarray, np.ndarray]] = []     # (tail, head, clients, gains), best first

    def fits(rows: np.ndarray, room: np.ndarray) -> np.ndarray:
        """(E, len(rows)) mask: the expert's usage fits the client's ``room``."""
        if u is None:
            return np.ones((E, len(rows)), dtype=bool)
        return (row[:, None] if row is not None else u[rows].T) <= room[None, :]

    xt = np.ascontiguousarray(x.T)
    for a in range(E):
        h = np.flatnonzero(xt[a])
        if not len(h):
            continue
        d = np.ascontiguousarray(G[h].T)
        d -= G[h, a][None, :]
        d[xt[:, h]] = -np.inf
        if u is not None:
            d[~fits(h, slack[h] + u[h, a])] = -np.inf
        families += [(a, b, c, g) for b, c, g in _best(d, h, RESERVE)]                 # a -> b: a client moves
        drop = h[count[h] > problem.min_experts_array[h]]
        families += [(a, R, c, g) for _, c, g in _best(-G[drop, a][None, :], drop, RESERVE)]   # a -> R: drops a
    free = np.flatnonzero(count < problem.capacity_array)
    if len(free):
        d = np.ascontiguousarray(G[free].T)
        d[xt[:, free]] = -np.inf
        if u is not None:
            d[~fits(free, slack[free])] = -np.inf
        families += [(R, b, c, g) for b, c, g in _best(d, free, RESERVE)]              # R -> b: adds b
    surplus, room = np.maximum(load - L, 0), np.maximum(U - load, 0)
    over, under = np.maximum(load - U, 0), np.maximum(L - load, 0)
    every = np.arange(E)
    F = int(surplus.sum() + room.sum()) + 1
    n = [min(len(c), MOVES_PER_PAIR) for _, _, c, _ in families]
    tails = [np.repeat([f[0] for f in families], n), np.full(E, S), np.full(E, S), every, every, [S, R]]
    heads = [np.repeat([f[1] for f in families], n), every, every, np.full(E, T), np.full(E, T), [R, T]]
    caps = [np.ones(sum(n), np.int64), over, surplus - over, under, room - under, [F, F]]
    gains = [np.concatenate([g[:k] for (_, _, _, g), k in zip(families, n)] or [np.empty(0)]),
             np.full(E, price), np.zeros(E), np.full(E, price), np.zeros(E), [0.0, 0.0]]
    tails, heads = np.concatenate(tails).astype(np.int64), np.concatenate(heads).astype(np.int64)
    caps, gains = np.concatenate(caps).astype(np.int64), np.concatenate(gains)
    keep = np.flatnonzero(caps > 0)
    scale = 2.0 ** 40 / max(price, 1e-12)
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails[keep], heads[keep], caps[keep],
                                                     -np.rint(gains[keep] * scale).astype(np.int64))
    smcf.set_nodes_supplies(np.arange(E + 3), np.r_[np.zeros(E + 1, np.int64), F, -F])
    if smcf.solve() != smcf.OPTIMAL:
        return []
    flows = np.zeros(len(caps), np.int64)
    flows[keep] = smcf.flows(arcs)
    units = np.add.reduceat(flows[:sum(n)], np.r_[0, np.cumsum(n)[:-1]]) if sum(n) else np.zeros(0, np.int64)
    moves, moved = [], set()
    for (a, b, clients, _), k in zip(families, units.tolist()):
        for c in clients.tolist():                 # the family's best clients not moved yet this round
            if k == 0:
                break
            if c not in moved:
                moved.add(c)
                moves.append((c, -1 if a == R else a, -1 if b == R else b))
                k -= 1
    return moves
