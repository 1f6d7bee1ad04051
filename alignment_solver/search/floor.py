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
from typing import Any, Callable, Mapping, Optional

import numpy as np

from ..problem import AlignmentProblem

#: relative slack under which a node's bound does not beat the incumbent (far below OPTIMAL_GAP)
PRUNE_RTOL = 1e-12


@dataclass
class NodeAnswer:
    """A relaxation's exact answer: its plan (None: proven infeasible, or no answer when not
    ``proven``), objective and upper bound.

    Optional, for a faster search: ``hint`` (opaque) is handed to the node's children, so the
    caller can warm-start their relaxations from this one; ``on_bound`` / ``off_bound`` (E,) are
    proven upper bounds on the relaxation with each expert forced on (at least ``m_e``
    trainers) / off (none), e.g. from the relaxation's reduced costs (inf: unknown)."""

    x: Optional[np.ndarray]
    value: float = -np.inf
    bound: float = -np.inf
    proven: bool = True
    hint: Any = None
    on_bound: Optional[np.ndarray] = None
    off_bound: Optional[np.ndarray] = None


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


def branch_and_bound(problem: AlignmentProblem, solve_node: Callable[..., NodeAnswer], *,
                     deadline: Optional[float] = None, max_nodes: int = 1000,
                     incumbent: Optional[Callable[[np.ndarray], None]] = None) -> FloorSearch:
    """Exact search over which experts are on; ``solve_node(off, on, hint)`` solves the
    relaxation (``hint``: the parent's :attr:`NodeAnswer.hint`, None at the root);
    ``incumbent(x)`` hears of each better plan that keeps every floor.

    - First incumbent: from the root, every broken expert is decided at once (on when it has at
      least half its floor, else off) and the relaxation solved again, until a plan keeps every
      floor (a few flows instead of a dive of one expert per level).
    - Fixing by bounds: when a node's answer carries ``on_bound``/``off_bound``, an undecided
      expert whose forced-on (off) bound does not beat the incumbent is fixed off (on) in the
      node's subtree without branching; both: the subtree is pruned.  A fix the node's plan
      breaks re-solves the node (one child instead of two).
    """
    m = problem.min_group_array
    on0, off0 = forced(problem)
    counter = itertools.count()
    heap = [(-np.inf, next(counter), off0, on0, None)]
    best_x, best, leaf_bound, unsettled, nodes, stopped = None, -np.inf, -np.inf, -np.inf, 0, False
    rounding, fixed = True, 0

    def beaten(bound: Any) -> Any:
        return np.isfinite(best) & (bound <= best + PRUNE_RTOL * max(1.0, abs(best)))

    def out_of_time() -> bool:
        return nodes >= max_nodes or (deadline is not None and time.perf_counter() > deadline)

    def offer(ans: NodeAnswer, on: np.ndarray, off: np.ndarray) -> np.ndarray:
        """Record ``ans.x`` if it keeps every floor; the broken undecided experts."""
        nonlocal best_x, best
        trainers = ans.x.sum(axis=0)
        broken = np.flatnonzero((trainers > 0) & (trainers < m) & ~on & ~off)
        if not len(broken) and ans.value > best:
            best_x, best = ans.x, ans.value
            if incumbent is not None:
                incumbent(best_x)
        return broken

    def round_up(ans: NodeAnswer, off: np.ndarray, on: np.ndarray) -> None:
        """The first incumbent: decide every broken expert at once, repeatedly."""
        nonlocal nodes
        while ans.x is not None and ans.proven and best_x is None and not out_of_time():
            trainers = ans.x.sum(axis=0)
            broken = (trainers > 0) & (trainers < m) & ~on & ~off
            if not broken.any():
                return
            keep = broken & (2 * trainers >= m)
            off, on = off | (broken & ~keep), on | keep
            nodes += 1
            ans = solve_node(off, on, ans.hint)
            if ans.x is not None:
                offer(ans, on, off)

    dive: list[tuple[float, int, np.ndarray, np.ndarray, Any]] = []     # until the first incumbent: depth first
    while dive or (heap and not beaten(-heap[0][0])):
        if out_of_time():
            stopped = True
            heap += dive
            break
        neg, _, off, on, hint = dive.pop() if dive else heapq.heappop(heap)
        nodes += 1
        ans = solve_node(off, on, hint)
        if not ans.proven:                  # cut short: its parent's bound stands for its subtree
            unsettled = max(unsettled, -neg)
        if ans.x is None:
            continue
        broken = offer(ans, on, off)
        if rounding and ans.proven and len(broken) and best_x is None:
            rounding = False
            round_up(ans, off, on)
        if not ans.proven:
            continue
        if not len(broken) or beaten(ans.bound):
            leaf_bound = max(leaf_bound, ans.bound)
            continue
        if ans.on_bound is not None and ans.off_bound is not None and np.isfinite(best):
            free = ~on & ~off & (m > 1)
            no_on = free & beaten(ans.on_bound)          # forcing it on cannot beat the incumbent: off
            no_off = free & beaten(ans.off_bound)        # forcing it off cannot: on
            if no_on.any() or no_off.any():
                fixed += int(no_on.sum() + no_off.sum())
                leaf_bound = max(leaf_bound, float(np.max(np.where(no_on, ans.on_bound, -np.inf))),
                                 float(np.max(np.where(no_off, ans.off_bound, -np.inf))))
                if (no_on & no_off).any():           # neither way beats it: nothing below does
                    continue
                off, on = off | no_on, on | no_off
                trainers = ans.x.sum(axis=0)
                if (no_on & (trainers > 0)).any() or (no_off & (trainers < m)).any():
                    heapq.heappush(heap, (-ans.bound, next(counter), off, on, ans.hint))   # the plan breaks a fix
                    continue
                broken = broken[~(off | on)[broken]]
                if not len(broken):
                    continue
        trainers = ans.x.sum(axis=0)
        e = int(broken[np.argmax(trainers[broken])])
        with_e = off.copy(), on.copy()
        with_e[1][e] = True
        without_e = off.copy(), on.copy()
        without_e[0][e] = True
        bound_on = ans.bound if ans.on_bound is None else min(ans.bound, float(ans.on_bound[e]))
        bound_off = ans.bound if ans.off_bound is None else min(ans.bound, float(ans.off_bound[e]))
        first, second = ((with_e, bound_on), (without_e, bound_off)) if 2 * trainers[e] >= m[e] else \
            ((without_e, bound_off), (with_e, bound_on))
        for (child, child_bound), stack in ((second, None), (first, dive if best_x is None else None)):
            if beaten(child_bound):                  # the child's own bound: pruned before its flow
                leaf_bound = max(leaf_bound, child_bound)
            elif stack is None:
                heapq.heappush(heap, (-child_bound, next(counter), *child, ans.hint))
            else:
                stack.append((-child_bound, next(counter), *child, ans.hint))
    bound = max(best, leaf_bound, unsettled, max((-item[0] for item in heap), default=-np.inf))
    proven = not stopped and (unsettled == -np.inf or beaten(unsettled))
    return FloorSearch(best_x, best, bound, proven, nodes,
                       {"nodes": nodes, "forced_on": int(on0.sum()), "forced_off": int(off0.sum()),
                        "fixed_by_bounds": fixed, "open_nodes": len(heap)})


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
