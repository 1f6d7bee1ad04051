"""Any alignment problem as a backend-neutral 0-1 linear program.

One binary ``x_j`` per allowed (client, expert) pair ``j``; in soft mode two continuous slack
variables per expert (shortfall below and excess above its load band) priced at
``soft_penalty`` in the objective.  Rows come in four kinds: client counts
``min_experts <= sum x <= capacity``, expert loads ``L <= sum w x (+ short - excess) <= U``,
and, when present, budgets ``sum usage x <= budget`` and per-group client counts
``group_min_experts[c, l] <= sum_{e in l} x <= group_capacity[c, l]`` (kind ``"group"``, index
``c * L + l``).  A privacy floor (``expert_min_group``) adds one binary ``y_e`` per expert
whose floor ``m_e`` is above 1 (:meth:`LinearModel.floors`): ``m_e y_e <= sum_c x <= n_e y_e``
with ``n_e`` the expert's allowed pairs (no trainer, or at least ``m_e``).  Backends (CP-SAT,
PuLP) read the groups and the floors;
``matrices()`` gives the whole model as sparse matrices for LP bounds and independent oracles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from alignment_solver.problem import AlignmentProblem


@dataclass
class Row:
    """One linear row ``lo <= sum coef * var <= hi`` over pair variables (and optional slacks)."""

    kind: str            # "client", "load", "budget" or "group"
    index: int           # client or expert index (c * L + l for a group row)
    pairs: np.ndarray    # indices into the pair variables
    coef: np.ndarray
    lo: float
    hi: float            # may be inf


@dataclass
class LinearModel:
    C: int
    E: int
    ci: np.ndarray               # (n,) client of each pair variable
    ei: np.ndarray               # (n,) expert of each pair variable
    obj: np.ndarray              # (n,) objective coefficient, maximised
    client_lo: np.ndarray
    client_hi: np.ndarray
    weight: np.ndarray           # (n,) load weight of each pair
    load_lo: np.ndarray
    load_hi: np.ndarray
    usage: Optional[np.ndarray]  # (n,) or None
    budget: Optional[np.ndarray]
    soft_penalty: Optional[float]
    group: Optional[np.ndarray] = None      # (n,) group of each pair's expert, when group rows exist
    group_lo: Optional[np.ndarray] = None   # (C, L)
    group_hi: Optional[np.ndarray] = None   # (C, L)
    min_group: Optional[np.ndarray] = None  # (E,) privacy floor, when some expert's is above 1

    @classmethod
    def from_problem(cls, problem: AlignmentProblem, soft_penalty: Optional[float] = None,
                     mask: Optional[np.ndarray] = None) -> "LinearModel":
        """The model over the allowed pairs (only those in ``mask``, if given: a restriction)."""
        ci, ei = np.nonzero(problem.allowed_matrix if mask is None else problem.allowed_matrix & mask)
        w = problem.weight_matrix
        usage = problem.usage_matrix
        return cls(C=problem.n_clients, E=problem.n_experts, ci=ci, ei=ei,
                   obj=np.asarray(problem.objective_matrix[ci, ei], dtype=float),
                   client_lo=problem.min_experts_array.astype(float),
                   client_hi=problem.capacity_array.astype(float),
                   weight=np.ones(len(ci)) if w is None else np.asarray(w[ci, ei], dtype=float),
                   load_lo=problem.min_load_array.astype(float), load_hi=problem.max_load_array.astype(float),
                   usage=None if usage is None else np.asarray(usage[ci, ei], dtype=float),
                   budget=None if problem.budget is None else problem.budget.astype(float),
                   soft_penalty=soft_penalty,
                   group=problem.group_array[ei] if problem.has_groups else None,
                   group_lo=problem.group_min_matrix.astype(float) if problem.has_groups else None,
                   group_hi=problem.group_capacity_matrix.astype(float) if problem.has_groups else None,
                   min_group=problem.min_group_array if problem.has_min_group else None)

    @property
    def n(self) -> int:
        return len(self.ci)

    @property
    def soft(self) -> bool:
        return self.soft_penalty is not None

    def _groups(self, key: np.ndarray, count: int) -> list[np.ndarray]:
        order = np.argsort(key, kind="stable")
        bounds = np.searchsorted(key[order], np.arange(count + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(count)]

    def rows(self) -> Iterator[Row]:
        """Every row; load rows get the expert's slack variables in soft mode."""
        for c, idx in enumerate(self._groups(self.ci, self.C)):
            yield Row("client", c, idx, np.ones(len(idx)), self.client_lo[c], self.client_hi[c])
        for e, idx in enumerate(self._groups(self.ei, self.E)):
            yield Row("load", e, idx, self.weight[idx], self.load_lo[e], self.load_hi[e])
        if self.usage is not None:
            for c, idx in enumerate(self._groups(self.ci, self.C)):
                yield Row("budget", c, idx, self.usage[idx], -np.inf, self.budget[c])
        if self.group is not None:
            L = self.group_lo.shape[1]
            for i, idx in enumerate(self._groups(self.ci * L + self.group, self.C * L)):
                c, g = divmod(i, L)
                if self.group_lo[c, g] > 0 or self.group_hi[c, g] < len(idx):
                    yield Row("group", i, idx, np.ones(len(idx)), self.group_lo[c, g],
                              min(self.group_hi[c, g], len(idx)))

    def floors(self) -> Iterator[tuple[int, np.ndarray, int]]:
        """``(expert, its pair variables, floor)`` for every expert whose floor is above 1."""
        if self.min_group is None:
            return
        for e, idx in enumerate(self._groups(self.ei, self.E)):
            if self.min_group[e] > 1:
                yield e, idx, int(self.min_group[e])

    def assignment(self, values: np.ndarray) -> np.ndarray:
        x = np.zeros((self.C, self.E), dtype=bool)
        on = np.asarray(values) > 0.5
        x[self.ci[on], self.ei[on]] = True
        return x

    def matrices(self):
        """``(c, A, row_lo, row_hi, var_hi, integrality)`` for ``max c @ v``; v = pairs, then slacks,
        then the floors' binaries.

        Slack columns (soft mode) are ``[short_0..short_{E-1}, excess_0..excess_{E-1}]``; each floor
        adds a column ``y_e`` and the rows ``sum x - m_e y_e >= 0`` and ``sum x - n_e y_e <= 0``.
        """
        from scipy.sparse import coo_matrix

        n, ns = self.n, (2 * self.E if self.soft else 0)
        floors = list(self.floors())
        rows, cols, vals, lo, hi = [], [], [], [], []
        for r, row in enumerate(self.rows()):
            rows.append(np.full(len(row.pairs), r))
            cols.append(row.pairs)
            vals.append(row.coef)
            lo.append(row.lo)
            hi.append(row.hi)
            if self.soft and row.kind == "load":
                rows.append(np.array([r, r]))
                cols.append(np.array([n + row.index, n + self.E + row.index]))
                vals.append(np.array([1.0, -1.0]))
        for i, (_, idx, m) in enumerate(floors):
            y = n + ns + i
            for bound, (row_lo, row_hi) in ((m, (0.0, np.inf)), (len(idx), (-np.inf, 0.0))):
                r = len(lo)
                rows.append(np.full(len(idx) + 1, r))
                cols.append(np.r_[idx, y])
                vals.append(np.r_[np.ones(len(idx)), -float(bound)])
                lo.append(row_lo)
                hi.append(row_hi)
        nf = len(floors)
        A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(len(lo), n + ns + nf)).tocsr()
        c = np.concatenate([self.obj, np.full(ns, -(self.soft_penalty or 0.0)), np.zeros(nf)])
        var_hi = np.concatenate([np.ones(n), np.full(ns, np.inf), np.ones(nf)])
        integrality = np.concatenate([np.ones(n), np.zeros(ns), np.ones(nf)])
        return c, A, np.array(lo), np.array(hi), var_hi, integrality
