"""The privacy floor (``expert_min_group``): each expert has no trainer or at least ``m_e``.

The floor is an on/off choice per expert, which breaks the flow's total unimodularity.  Two
ways through it, both on any problem without knowing a backend:

- :func:`branch_and_bound`, exact: a node fixes some experts off (no trainer) and some on (at
  least ``m_e`` trainers: for count loads a raised lower load bound) and leaves the floor of the
  rest out, a relaxation solved exactly by the caller (one min-cost flow).  A node whose
  optimum keeps every floor is feasible; otherwise it branches on the broken expert with the
  most trainers (on first when it has at least half its floor).  Depth first (the preferred
  child) until the first plan that keeps every floor, best bound first after; the answer is
  proven optimal when no open node's bound (its parent's) beats the incumbent.  Experts whose
  lower load bound is positive start on (they must have a trainer), experts fewer clients may
  train than their floor start off.
- :func:`below_floor`, the aggregation side (Flower, NVFlare and the training loop): which
  experts, and whether the shared arrays, too few updates reached this round.
- :func:`repair`, the greedy baseline: drop the broken expert with the fewest trainers (nobody
  trains it), let the greedy completion re-place its clients among the rest, until no floor is
  broken.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np

from ..problem import AlignmentProblem

#: relative slack under which a node's bound does not beat the incumbent (far below OPTIMAL_GAP)
PRUNE_RTOL = 1e-12


@dataclass
class NodeAnswer:
    """A relaxation's exact answer: its plan (None: proven infeasible, or no answer when not
    ``proven``), objective and upper bound."""

    x: Optional[np.ndarray]
    value: float = -np.inf
    bound: float = -np.inf
    proven: bool = True


@dataclass
class FloorSearch:
    """The outcome of :func:`branch_and_bound`."""

    x: Optional[np.ndarray]
    value: float
    bound: float               # upper bound on the floor-constrained optimum (-inf: proven infeasible; inf: none)
    proven: bool               # ``x`` is optimal within the pruning tolerance, or no plan exists
    nodes: int
    stats: dict = field(default_factory=dict)


def forced(problem: AlignmentProblem, soft: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Experts that must be on (a positive lower load bound with count loads) and those that
    cannot reach their floor (fewer clients with capacity may train them than ``m_e``, or a lower
    load cap).  With ``soft`` the load band binds nothing: only the clients count."""
    m = problem.min_group_array
    floor = m > 1
    reach = (problem.allowed_matrix & (problem.capacity_array > 0)[:, None]).sum(axis=0)
    count = problem.weight_matrix is None and not soft
    on = floor & (problem.min_load_array > 0) & count
    off = floor & ((reach < m) | (count & (problem.max_load_array < m)))
    return on, off


def branch_and_bound(problem: AlignmentProblem, solve_node: Callable[[np.ndarray, np.ndarray], NodeAnswer], *,
                     deadline: Optional[float] = None, max_nodes: int = 1000,
                     incumbent: Optional[Callable[[np.ndarray], None]] = None) -> FloorSearch:
    """Exact search over which experts are on; ``solve_node(off, on)`` solves the relaxation;
    ``incumbent(x)`` hears of each better plan that keeps every floor."""
    m = problem.min_group_array
    on0, off0 = forced(problem)
    counter = itertools.count()
    heap = [(-np.inf, next(counter), off0, on0)]
    best_x, best, leaf_bound, unsettled, nodes, stopped = None, -np.inf, -np.inf, -np.inf, 0, False

    def beaten(bound: float) -> bool:
        return np.isfinite(best) and bound <= best + PRUNE_RTOL * max(1.0, abs(best))

    dive: list[tuple[float, int, np.ndarray, np.ndarray]] = []     # until the first incumbent: depth first
    while dive or (heap and not beaten(-heap[0][0])):
        if nodes >= max_nodes or (deadline is not None and time.perf_counter() > deadline):
            stopped = True
            heap += dive
            break
        neg, _, off, on = dive.pop() if dive else heapq.heappop(heap)
        nodes += 1
        ans = solve_node(off, on)
        if not ans.proven:                  # cut short: its parent's bound stands for its subtree
            unsettled = max(unsettled, -neg)
        if ans.x is None:
            continue
        trainers = ans.x.sum(axis=0)
        broken = np.flatnonzero((trainers > 0) & (trainers < m) & ~on & ~off)
        if not len(broken) and ans.value > best:
            best_x, best = ans.x, ans.value
            if incumbent is not None:
                incumbent(best_x)
        if not ans.proven:
            continue
        if not len(broken) or beaten(ans.bound):
            leaf_bound = max(leaf_bound, ans.bound)
            continue
        e = int(broken[np.argmax(trainers[broken])])
        with_e = off.copy(), on.copy()
        with_e[1][e] = True
        without_e = off.copy(), on.copy()
        without_e[0][e] = True
        first, second = (with_e, without_e) if 2 * trainers[e] >= m[e] else (without_e, with_e)
        heapq.heappush(heap, (-ans.bound, next(counter), *second))
        if best_x is None:
            dive.append((-ans.bound, next(counter), *first))
        else:
            heapq.heappush(heap, (-ans.bound, next(counter), *first))
    bound = max(best, leaf_bound, unsettled, max((-neg for neg, *_ in heap), default=-np.inf))
    proven = not stopped and (unsettled == -np.inf or beaten(unsettled))
    return FloorSearch(best_x, best, bound, proven, nodes,
                       {"nodes": nodes, "forced_on": int(on0.sum()), "forced_off": int(off0.sum()),
                        "open_nodes": len(heap)})


def below_floor(senders: Mapping[int, int], updates: int, m: int) -> tuple[dict[int, int], bool]:
    """The experts fewer than ``m`` updates reached (``senders``: updates per expert) and
    whether the shared arrays are held too (fewer than ``m`` ``updates`` in all); 0 or 1: none."""
    if m <= 1 or not updates:
        return {}, False
    return {int(j): n for j, n in sorted(senders.items()) if n < m}, updates < m


def repair(problem: AlignmentProblem, x: np.ndarray, complete: Callable[..., np.ndarray],
           deadline: Optional[float] = None) -> np.ndarray:
    """Greedy-then-repair: while some expert breaks its floor, nobody trains the one with the
    fewest trainers and ``complete(problem_without_it, start=x)`` re-places its clients."""
    x = np.array(x, dtype=bool)
    off = np.zeros(problem.n_experts, dtype=bool)
    allowed = problem.allowed_matrix
    for _ in range(problem.n_experts):
        broken = problem.floor_breaks(x)
        if not len(broken) or (deadline is not None and time.perf_counter() > deadline):
            break
        trainers = x.sum(axis=0)
        e = int(broken[np.argmin(trainers[broken])])
        off[e] = True
        x[:, e] = False
        x = complete(problem.model_copy(update={"allowed": allowed & ~off[None, :]}), start=x, deadline=deadline)
    return x
