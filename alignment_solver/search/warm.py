"""Warm starts: the previous round's answer as prices and candidates for the next (issue 38).

Consecutive rounds differ a little (fitness moves by one round's observations, the load band by
a deficit), so the previous optimum's node potentials are near-optimal expert prices for the
next round and its plan a near-optimal candidate set.  :func:`warm_hint` maps a previous
:class:`~alignment_solver.result.AlignmentResult` onto a new problem:

- the experts must be the same: ``n_experts`` and ``expert_ids`` equal, else
  :class:`~alignment_solver.errors.InvalidOptionError` naming ``warm_start`` and the field
  (prices of other experts mean nothing);
- clients are matched by label (``client_ids``; row numbers when both problems have none):
  clients new this round get no candidates from it, clients gone are dropped;
- the prices are the result's ``stats["potentials"]`` (experts, then source and sink), written
  by the ``flow`` backend when it proves an optimum on a working set; a result without them
  gives candidates only, one without a plan prices only, one with neither nothing (None).

A warm start only steers the working set: the answer is still proven by the full-instance
certificate, so it can change the time, never the optimum or the status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import InvalidOptionError, describe
from ..problem import AlignmentProblem


@dataclass(frozen=True)
class WarmHint:
    """The previous round on this problem's rows: ``prices`` (E + 2,) or None, and the previous
    plan's pairs ``(rows, experts)`` of the clients found again (``matched`` of them)."""

    prices: Optional[np.ndarray]
    rows: np.ndarray
    experts: np.ndarray
    matched: int


def warm_hint(previous: Any, problem: AlignmentProblem) -> Optional[WarmHint]:
    """``previous`` (an :class:`AlignmentResult` or None) as a :class:`WarmHint` for ``problem``;
    None when it carries nothing usable.  Raises InvalidOptionError for other experts."""
    from ..result import AlignmentResult

    if previous is None:
        return None
    if not isinstance(previous, AlignmentResult):
        raise InvalidOptionError(f"warm_start must be None or the AlignmentResult of an earlier solve; got "
                                 f"{type(previous).__name__} {describe(previous, 40)}")
    old = previous.problem
    E = problem.n_experts
    if old.n_experts != E:
        raise InvalidOptionError(f"warm_start must come from a problem with the same experts: its n_experts is "
                                 f"{old.n_experts}, this problem's is {E}")
    if list(old.expert_ids or range(E)) != list(problem.expert_ids or range(E)):
        raise InvalidOptionError(f"warm_start must come from a problem with the same experts: its expert_ids "
                                 f"{describe(old.expert_ids, 60)} differ from this problem's "
                                 f"{describe(problem.expert_ids, 60)}")
    prices = previous.stats.get("potentials")
    if prices is not None:
        prices = np.asarray(prices, dtype=float)
        if prices.shape != (E + 2,) or not np.all(np.isfinite(prices)):
            prices = None
    if not previous.has_solution:
        return None if prices is None else WarmHint(prices, np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    rows_old, experts = np.nonzero(previous.assignment)
    C, C_old = problem.n_clients, old.n_clients
    if old.client_ids is None and problem.client_ids is None:
        where = np.arange(C_old)
        where[where >= C] = -1
        matched = min(C, C_old)
    elif old.client_ids == problem.client_ids:
        where, matched = np.arange(C_old), C
    else:
        now = {lab: i for i, lab in enumerate(problem.client_ids or range(C))}
        where = np.array([now.get(lab, -1) for lab in (old.client_ids or range(C_old))], dtype=np.int64)
        matched = int((where >= 0).sum())
    new_rows = where[rows_old]
    keep = new_rows >= 0
    rows, experts = new_rows[keep], experts[keep]
    order = np.lexsort((experts, rows))
    return WarmHint(prices, rows[order], experts[order], matched)
