"""Budget rows as nested slots: a flow whose every answer fits every client's budget.

Give client ``c`` a vector of slots ``s_1 >= s_2 >= ... `` with ``sum s <= budget[c]``; a set of
experts fits the slots when, for every size level ``v``, it holds no more experts of usage
``>= v`` than there are slots of size ``>= v`` (sorted dominance).  Those counts are nested, so
they are capacities on a chain of nodes per client::

    S --[min, #slots]--> c@level1 --[#slots >= level2]--> c@level2 --> ... --> c@levelV
    c@level(usage[c,e]) --[0, 1], cost -G--> expert e --band--> T --> S

Every flow of this network is budget-feasible, and min-cost flow finds the best one exactly.
Usage is rounded UP to at most ``MAX_LEVELS`` levels (conservative: a fitting answer still fits).
``choose_slots`` builds each client's slots around a reference assignment (e.g. the answer of a
Lagrangian relaxation): its sizes, shrunk until they fit, then grown into the spare budget.
"""

from __future__ import annotations

import numpy as np

MAX_LEVELS = 8


def levels_of(usage: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size levels and each pair's level index (usage rounded up to a level)."""
    values = np.unique(usage[allowed])
    if len(values) > MAX_LEVELS:
        values = np.unique(np.quantile(values, np.linspace(0, 1, MAX_LEVELS), method="higher"))
    values = values[values > 0] if np.any(values > 0) else values
    index = np.minimum(np.searchsorted(values, usage - 1e-12), len(values) - 1)
    zero = usage <= 0
    index = np.where(zero, 0, index)
    return values, index


def choose_slots(reference: np.ndarray, level_index: np.ndarray, levels: np.ndarray, budget: np.ndarray,
                 capacity: np.ndarray) -> np.ndarray:
    """(C, V) counts ``a[c, v]`` = slots of size >= ``levels[v]`` for each client.

    Starts from the levels the reference holds; while over budget the largest slot steps down a
    level (or goes if it is the smallest); spare budget adds slots of the largest fitting level
    while below capacity, then lifts slots a level at a time, largest first.
    """
    C = reference.shape[0]
    V = len(levels)
    held = [np.sort(level_index[c, reference[c]])[::-1].tolist() for c in range(C)]
    counts = np.zeros((C, V), dtype=np.int64)
    for c in range(C):
        s = held[c]
        cost = float(sum(levels[v] for v in s))
        while s and cost > budget[c] + 1e-9:
            cost -= levels[s[0]]
            if s[0] > 0:
                s[0] -= 1
                cost += levels[s[0]]
            else:
                s.pop(0)
            s.sort(reverse=True)
        spare = budget[c] - cost
        while len(s) < capacity[c] and spare + 1e-9 >= levels[0]:
            v = int(np.searchsorted(levels, spare + 1e-9, side="right") - 1)
            s.append(v)
            spare -= levels[v]
        s.sort(reverse=True)
        lifted = True
        while lifted:
            lifted = False
            for i in range(len(s)):
                if s[i] + 1 < V and levels[s[i] + 1] - levels[s[i]] <= spare + 1e-9:
                    spare -= levels[s[i] + 1] - levels[s[i]]
                    s[i] += 1
                    lifted = True
        for v in s:
            counts[c, :v + 1] += 1
    return counts


def cover_demand(counts: np.ndarray, levels: np.ndarray, budget: np.ndarray, low: np.ndarray,
                 capacity: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """Trade small slots for large ones until every level has enough slots for the band.

    ``demand[v]`` is the least number of slots of size >= ``levels[v]`` the load band needs
    (sum of the lower loads of experts at that level or above).  From the top level down, while
    short, a client lifts one slot to level ``v``, paying from its spare budget and, if needed,
    by dropping its smallest other slots (never below its minimum); then, from the bottom level
    up, clients with spare budget and capacity add slots where counts are still short.
    """
    counts = counts.copy()
    C, V = counts.shape
    for v in range(V - 1, -1, -1):
        short = int(demand[v] - counts[:, v].sum())
        if short <= 0:
            continue
        slots = [_slots(counts[c]) for c in range(C)]
        spare = budget - np.array([sum(levels[x] for x in sl) for sl in slots])
        for c in np.argsort(-spare, kind="stable"):
            if short <= 0:
                break
            sl = slots[c]
            below = [i for i, x in enumerate(sl) if x < v]
            if not below:
                continue
            i = below[0]                                   # the largest slot under level v
            need = levels[v] - levels[sl[i]]
            rest = sorted((j for j in range(len(sl)) if j != i), key=lambda j: sl[j])
            freed, drop = spare[c], []
            for j in rest:
                if freed + 1e-9 >= need or len(sl) - len(drop) - 1 < max(int(low[c]), 1):
                    break
                if sl[j] < v:
                    drop.append(j)
                    freed += levels[sl[j]]
            if freed + 1e-9 < need:
                continue
            new = [x for j, x in enumerate(sl) if j not in drop]
            new[new.index(sl[i])] = v
            counts[c] = 0
            for x in new:
                counts[c, :x + 1] += 1
            short -= 1
    for v in range(V):
        short = int(demand[v] - counts[:, v].sum())
        if short <= 0:
            continue
        used = np.array([sum(levels[x] for x in _slots(counts[c])) for c in range(C)])
        able = np.flatnonzero((budget - used + 1e-9 >= levels[v]) & (counts[:, 0] < capacity))
        for c in able[np.argsort(-(budget - used)[able], kind="stable")][:short]:
            counts[c, :v + 1] += 1
    return counts


def _slots(row: np.ndarray) -> list[int]:
    """Slot levels (largest first) from a row of nested counts."""
    out = []
    for v in range(len(row) - 1, -1, -1):
        out += [v] * int(row[v] - (row[v + 1] if v + 1 < len(row) else 0))
    return out


def chain_arcs(G: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], level_index: np.ndarray, counts: np.ndarray,
               low: np.ndarray, L: np.ndarray, U: np.ndarray, penalty: float):
    """Arc arrays of the slot network (tails, heads, caps, costs to minimise, supplies, pair slice)."""
    C, V = counts.shape
    E = G.shape[1]
    ci, ei = pairs
    CV = C * V
    S, T = CV + E, CV + E + 1
    chain = np.arange(C) * V
    big = int(counts[:, 0].sum()) + 1
    low = np.minimum(low, counts[:, 0])
    tails = [np.full(C, S)] + [chain + v - 1 for v in range(1, V)]
    heads = [chain] + [chain + v for v in range(1, V)]
    caps = [counts[:, 0] - low] + [counts[:, v] for v in range(1, V)]
    costs = [np.zeros(C)] + [np.zeros(C) for _ in range(1, V)]
    first = sum(len(t) for t in tails)
    tails.append(chain[ci] + level_index[ci, ei])
    heads.append(CV + ei)
    caps.append(np.ones(len(ci), np.int64))
    costs.append(-G[ci, ei])
    experts = CV + np.arange(E)
    tails += [experts, experts, experts, np.array([T])]
    heads += [np.full(E, T), np.full(E, T), np.full(E, T), np.array([S])]
    caps += [L, np.maximum(U - L, 0), np.full(E, big), np.array([big])]
    costs += [np.full(E, -penalty), np.zeros(E), np.full(E, penalty), np.zeros(1)]
    supplies = np.zeros(T + 1, np.int64)
    supplies[chain] = low
    supplies[S] = -int(low.sum())
    return (np.concatenate(tails).astype(np.int64), np.concatenate(heads).astype(np.int64),
            np.concatenate(caps).astype(np.int64), np.concatenate(costs), supplies, slice(first, first + len(ci)))
