"""The answer of :func:`~alignment_solver.solve`: a status, maybe an assignment, and proof figures.

Infeasible or out of time is a *status*, not an exception.  Reading ``assignment`` (or anything
derived from it) on a result that has none raises :class:`~alignment_solver.errors.NoSolutionError`.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Optional

import numpy as np

from .errors import NoSolutionError
from .problem import AlignmentProblem, Label


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"                      # proven optimal (within the reported gap)
    FEASIBLE = "feasible"                    # satisfies every constraint; optimality not proven
    INFEASIBLE = "infeasible"                # proven: no assignment satisfies the constraints
    NO_SOLUTION_FOUND = "no_solution_found"  # stopped (time limit, heuristic failed) without one

    @property
    def has_solution(self) -> bool:
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


#: OPTIMAL is said only with a bound within this relative gap, (bound - objective) / max(1, |objective|).
OPTIMAL_GAP = 1e-6


class AlignmentResult:
    """Outcome of one solve.

    Attributes: ``status``, ``backend``, ``objective`` (value of the model solved: sum of
    ``objective_matrix * x``, minus ``soft_penalty`` times the band violation in soft mode),
    ``bound`` (proven upper bound on that value, or None), ``gap`` (relative, or None),
    ``solve_seconds``, ``build_seconds``, ``explanation`` (why infeasible / why stopped, in words),
    ``load_shortfall`` / ``load_excess`` (E,) band misses in soft mode, ``stats`` (backend
    figures: iterations, mode, whether deterministic, ...).
    """

    def __init__(self, problem: AlignmentProblem, status: SolveStatus, backend: str, *,
                 assignment: Optional[np.ndarray] = None, objective: Optional[float] = None,
                 bound: Optional[float] = None, solve_seconds: float = 0.0, build_seconds: float = 0.0,
                 explanation: Optional[str] = None, soft: bool = False, soft_penalty: Optional[float] = None,
                 stats: Optional[dict[str, Any]] = None) -> None:
        if status.has_solution and assignment is None:
            raise ValueError(f"status {status.value} needs an assignment")
        self.problem = problem
        self.status = status
        self.backend = backend
        self._x = None if assignment is None or not status.has_solution else np.asarray(assignment, dtype=bool)
        if self._x is not None:
            self._x.setflags(write=False)
        self.soft = soft
        self.soft_penalty = soft_penalty
        self.objective = objective
        self.bound = bound
        self.solve_seconds = float(solve_seconds)
        self.build_seconds = float(build_seconds)
        self.explanation = explanation
        self.stats = dict(stats or {})
        if self._x is not None and self.objective is None:
            self.objective = self.penalised_objective()

    # ---- the solution -------------------------------------------------------------------------
    @property
    def has_solution(self) -> bool:
        return self._x is not None

    @property
    def assignment(self) -> np.ndarray:
        """(C, E) read-only bool array; raises NoSolutionError when there is no solution."""
        if self._x is None:
            reason = f": {self.explanation}" if self.explanation else ""
            raise NoSolutionError(f"no assignment: status is {self.status.value}{reason}")
        return self._x

    @property
    def expert_load(self) -> np.ndarray:
        """(E,) load of each expert, ``sum_c w[c, e] x[c, e]`` (count of clients when w = 1)."""
        x = self.assignment
        w = self.problem.weight_matrix
        return x.sum(axis=0).astype(float) if w is None else (w * x).sum(axis=0)

    @property
    def load_shortfall(self) -> np.ndarray:
        return np.maximum(self.problem.min_load_array - self.expert_load, 0.0)

    @property
    def load_excess(self) -> np.ndarray:
        return np.maximum(self.expert_load - self.problem.max_load_array, 0.0)

    @property
    def fitness_total(self) -> float:
        return float(self.problem.fitness[self.assignment].sum())

    def penalised_objective(self) -> float:
        value = self.problem.objective_value(self.assignment)
        if self.soft:
            value -= float(self.soft_penalty or 0.0) * float(self.load_shortfall.sum() + self.load_excess.sum())
        return value

    @property
    def gap(self) -> Optional[float]:
        """(bound - objective) / max(1, |objective|), or None without a bound."""
        if self.bound is None or self.objective is None:
            return None
        return max(0.0, self.bound - self.objective) / max(1.0, abs(self.objective))

    @property
    def proven_optimal(self) -> bool:
        return self.status is SolveStatus.OPTIMAL

    def experts_of(self, client_id: Label) -> list[Label]:
        """Labels of the experts the client with this label trains."""
        row = self.assignment[self.problem.client_index(client_id)]
        return [self.problem.expert_label(int(e)) for e in np.flatnonzero(row)]

    def violations(self, *, band: bool = True) -> list[str]:
        """Every constraint of the problem that the assignment breaks, checked from scratch.

        Empty for a feasible answer.  Counts are compared exactly; weighted load and budget rows
        with a slack relative to each row's magnitude (``problem.load_tolerance``,
        ``budget_tolerance``: 1e-9 of its largest bound or coefficient), so a row of tiny
        numbers is checked as strictly as a row of large ones.  In soft mode the load band may
        appear here by design; ``band=False`` leaves it out (the hard constraints only).
        """
        p, x = self.problem, self.assignment
        out: list[str] = []
        if x.shape != p.fitness.shape:
            return [f"assignment has shape {x.shape}, expected {p.fitness.shape}"]
        count = x.sum(axis=1)
        for c in np.flatnonzero(count > p.capacity_array):
            out.append(f"client {p.client_label(int(c))!r} trains {count[c]} experts > capacity {p.capacity_array[c]}")
        for c in np.flatnonzero(count < p.min_experts_array):
            out.append(f"client {p.client_label(int(c))!r} trains {count[c]} experts < min_experts "
                       f"{p.min_experts_array[c]}")
        if band:
            load = self.expert_load
            tol = p.load_tolerance
            for e in np.flatnonzero(load < p.min_load_array - tol):
                out.append(f"expert {p.expert_label(int(e))!r} has load {load[e]:g} < expert_min_load "
                           f"{p.min_load_array[e]:g}")
            for e in np.flatnonzero(load > p.max_load_array + tol):
                out.append(f"expert {p.expert_label(int(e))!r} has load {load[e]:g} > expert_max_load "
                           f"{p.max_load_array[e]:g}")
        if p.has_min_group:
            trainers = x.sum(axis=0)
            for e in p.floor_breaks(x)[:20]:
                out.append(f"expert {p.expert_label(int(e))!r} is trained by {trainers[e]} clients, fewer than its "
                           f"expert_min_group {p.min_group_array[e]} (it needs 0 or at least that many)")
        if p.has_groups:
            per = p.group_counts(x)
            for c, g in np.argwhere(per > p.group_capacity_matrix)[:20]:
                out.append(f"client {p.client_label(int(c))!r} trains {per[c, g]} experts of group {g} > "
                           f"group_capacity {p.group_capacity_matrix[c, g]}")
            for c, g in np.argwhere(per < p.group_min_matrix)[:20]:
                out.append(f"client {p.client_label(int(c))!r} trains {per[c, g]} experts of group {g} < "
                           f"group_min_experts {p.group_min_matrix[c, g]}")
        if p.has_budget:
            used = (p.usage_matrix * x).sum(axis=1)
            for c in np.flatnonzero(used > p.budget + p.budget_tolerance):
                out.append(f"client {p.client_label(int(c))!r} uses {used[c]:g} > budget {p.budget[c]:g}")
        if p.allowed is None:           # every pair allowed: nothing to check (and 12.8M cells at 100,000 x 128)
            return out
        bad = x & ~p.allowed_matrix
        for c, e in np.argwhere(bad)[:20]:
            out.append(f"client {p.client_label(int(c))!r} trains expert {p.expert_label(int(e))!r}, which is not allowed")
        return out

    # ---- reporting ----------------------------------------------------------------------------
    def summary(self) -> str:
        parts = [f"status={self.status.value}", f"backend={self.backend}"]
        if self.objective is not None:
            parts.append(f"objective={self.objective:.6g}")
        if self.gap is not None:
            parts.append(f"gap={self.gap:.2e}")
        if self.has_solution:
            load = self.expert_load
            parts.append(f"load={load.min():g}..{load.max():g}")
            if self.soft:
                parts.append(f"band_miss={self.load_shortfall.sum() + self.load_excess.sum():g}")
        parts.append(f"time={self.build_seconds + self.solve_seconds:.3f}s")
        line = " ".join(parts)
        return f"{line}\n{self.explanation}" if self.explanation else line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``experts`` maps each client label to the labels it trains."""
        out: dict[str, Any] = {
            "status": self.status.value, "backend": self.backend, "objective": self.objective,
            "bound": self.bound, "gap": self.gap, "solve_seconds": self.solve_seconds,
            "build_seconds": self.build_seconds, "explanation": self.explanation, "soft": self.soft,
            "soft_penalty": self.soft_penalty, "stats": self.stats,
        }
        if self.has_solution:
            x, p = self.assignment, self.problem
            out["assignment"] = [np.flatnonzero(row).tolist() for row in x]
            out["experts"] = {str(p.client_label(c)): self.experts_of(p.client_label(c)) for c in range(p.n_clients)}
            out["expert_load"] = self.expert_load.tolist()
            if self.soft:
                out["load_shortfall"] = self.load_shortfall.tolist()
                out["load_excess"] = self.load_excess.tolist()
        return out

    def model_dump_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    @classmethod
    def model_validate_json(cls, text: str, problem: AlignmentProblem) -> "AlignmentResult":
        """Rebuild a result from its JSON form and the problem it answers."""
        data = json.loads(text)
        x = None
        if data.get("assignment") is not None:
            x = np.zeros(problem.fitness.shape, dtype=bool)
            for c, experts in enumerate(data["assignment"]):
                x[c, experts] = True
        return cls(problem, SolveStatus(data["status"]), data["backend"], assignment=x,
                   objective=data.get("objective"), bound=data.get("bound"),
                   solve_seconds=data.get("solve_seconds", 0.0), build_seconds=data.get("build_seconds", 0.0),
                   explanation=data.get("explanation"), soft=data.get("soft", False),
                   soft_penalty=data.get("soft_penalty"), stats=data.get("stats"))

    def __repr__(self) -> str:
        return f"AlignmentResult({self.summary()!r})"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
