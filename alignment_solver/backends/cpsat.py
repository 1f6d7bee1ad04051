"""``cpsat``: OR-Tools CP-SAT on the general 0-1 model (weighted loads, budgets, anything).

Rows must have integer coefficients: a row whose coefficients or bounds are not integers is
multiplied by ``ROW_SCALE`` and rounded (bounds rounded inwards, so answers stay feasible); the
result's ``violations()`` re-checks with the original numbers.  Soft-mode slack is integer (in
row units).  Deterministic with ``workers=1`` (the default) and no time limit, or when it
proves optimality before the limit; ``stats["deterministic"]`` says which.

Budgeted count-load problems with at least ``WARM_ARCS`` allowed pairs (where CP-SAT alone
finds nothing in a minute at 10,000 x 64) start from the Lagrangian warm start of
:mod:`._lagrangian`: its bound is the reported ``bound``, its slot-flow answer the hint; CP-SAT
then searches each client's best ``candidates`` pairs (by fitness minus budget price) for the
rest of the time limit (the full model, if the warm start found nothing).  Without a time limit the warm start's answer is returned as it is
(deterministic), FEASIBLE unless the bound closes the gap.  ``warm_start="none"`` turns it off.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from ..errors import UnsupportedProblemError
from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from . import _lagrangian
from .base import Backend, SolveRequest

ROW_SCALE = 10 ** 6
WARM_ARCS = 50_000
WARM_SHARE = 0.5        # share of the time limit the warm start may use


def _integral(*arrays: Any) -> bool:
    return all(np.all(np.asarray(a)[np.isfinite(a)] == np.round(np.asarray(a)[np.isfinite(a)])) for a in arrays)


class CpSatBackend(Backend):
    name = "cpsat"
    requires = ("ortools",)
    options = {
        "workers": (1, "CP-SAT search workers; 1 is deterministic"),
        "hint": (None, "optional (C, E) bool assignment to start from"),
        "log": (False, "print CP-SAT's search log"),
        "warm_start": ("auto", "'auto', 'lagrangian' or 'none' (see the module docstring)"),
        "candidates": (8, "pairs per client CP-SAT searches after a warm start"),
    }

    def check_option(self, name: str, value: Any) -> Any:
        if name in ("workers", "candidates"):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"option {name!r} of backend 'cpsat' must be an integer >= 1; got {value!r}")
            return int(value)
        if name == "log":
            if not isinstance(value, bool):
                raise ValueError(f"option 'log' of backend 'cpsat' must be True or False; got {value!r}")
            return value
        if name == "warm_start":
            if value not in ("auto", "lagrangian", "none"):
                raise ValueError(f"option 'warm_start' of backend 'cpsat' must be one of "
                                 f"['auto', 'lagrangian', 'none']; got {value!r}")
            return value
        return None if value is None else np.asarray(value, dtype=bool)

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        t0 = time.perf_counter()
        mode = request.options.get("warm_start", "auto")
        if mode == "lagrangian" and (not _lagrangian.applies(problem) or request.soft):
            raise UnsupportedProblemError("warm_start='lagrangian' needs budget rows, count loads and soft=False")
        warm = mode == "lagrangian" or (mode == "auto" and _lagrangian.applies(problem) and not request.soft
                                        and int(problem.allowed_matrix.sum()) >= WARM_ARCS)
        if not warm:
            lm = LinearModel.from_problem(problem, request.soft_penalty if request.soft else None)
            return self._run(problem, lm, request, t0, request.options.get("hint"), request.time_limit)
        limit = request.time_limit
        deadline = t0 + WARM_SHARE * limit if limit is not None else np.inf
        ws = _lagrangian.lagrangian(problem, deadline=deadline, seed=request.seed)
        stats = {"warm_start": {"bound": ws.bound, "value": ws.value, **ws.stats}}
        remaining = None if limit is None else limit - (time.perf_counter() - t0)
        if ws.x is not None and remaining is not None and remaining > 1.0:
            score = problem.objective_matrix - ws.prices[:, None] * problem.usage_matrix
            m = min(request.options.get("candidates", 8), problem.n_experts)
            top = np.argpartition(-np.where(problem.allowed_matrix, score, -np.inf), m - 1, axis=1)[:, :m]
            mask = ws.x.copy()
            np.put_along_axis(mask, top, True, axis=1)
            lm = LinearModel.from_problem(problem, None, mask=mask)
            result = self._run(problem, lm, request, t0, ws.x, remaining)
            if result.has_solution and result.objective >= ws.value:
                result.stats.update(stats, restricted_to=int(mask.sum()))
                return self._bounded(result, ws.bound)
        if ws.x is None and remaining is not None and remaining > 1.0:
            lm = LinearModel.from_problem(problem)
            result = self._run(problem, lm, request, t0, None, remaining)
            result.stats.update(stats)
            return self._bounded(result, ws.bound) if result.has_solution else result
        if ws.x is None:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name,
                                   solve_seconds=time.perf_counter() - t0,
                                   explanation="the Lagrangian warm start found no assignment that fits the budgets",
                                   stats=stats)
        result = AlignmentResult(problem, SolveStatus.FEASIBLE, self.name, assignment=ws.x,
                                 solve_seconds=time.perf_counter() - t0,
                                 stats={**stats, "deterministic": True, "source": "warm start"})
        return self._bounded(result, ws.bound)

    @staticmethod
    def _bounded(result: AlignmentResult, bound: float) -> AlignmentResult:
        """Attach the Lagrangian bound (valid for the full problem) and promote a closed gap."""
        result.bound = max(float(bound), result.objective)
        if result.gap is not None and result.gap <= 1e-9:
            result.status = SolveStatus.OPTIMAL
        elif result.status is SolveStatus.OPTIMAL:
            result.status = SolveStatus.FEASIBLE       # optimal only for the restricted pairs
        return result

    def _run(self, problem: AlignmentProblem, lm: LinearModel, request: SolveRequest, t0: float,
             hint: Optional[np.ndarray], time_limit: Optional[float]) -> AlignmentResult:
        from ortools.sat.python import cp_model

        started = time.perf_counter()
        model = cp_model.CpModel()
        x = [model.new_bool_var(f"x{j}") for j in range(lm.n)]
        slack_terms: list[Any] = []
        for row in lm.rows():
            coef, lo, hi = row.coef, row.lo, row.hi
            scale = 1 if _integral(coef, lo, hi) else ROW_SCALE
            ic = np.rint(coef * scale).astype(np.int64).tolist()
            expr = cp_model.LinearExpr.weighted_sum([x[j] for j in row.pairs], ic)
            lo_i = int(np.ceil(lo * scale - 1e-9)) if np.isfinite(lo) else None
            hi_i = int(np.floor(hi * scale + 1e-9)) if np.isfinite(hi) else None
            if lm.soft and row.kind == "load":
                top = int(np.ceil(sum(abs(c) for c in ic))) + (lo_i or 0) + 1
                short = model.new_int_var(0, max(lo_i or 0, 0), f"short{row.index}")
                over = model.new_int_var(0, top, f"over{row.index}")
                expr = expr + short - over
                slack_terms += [(short, scale), (over, scale)]
            if lo_i is not None and hi_i is not None:
                model.add_linear_constraint(expr, lo_i, hi_i)
            elif hi_i is not None:
                model.add(expr <= hi_i)
            elif lo_i is not None:
                model.add(expr >= lo_i)
        objective = cp_model.LinearExpr.weighted_sum(x, lm.obj.tolist())
        if slack_terms:
            objective = objective - sum(var * (lm.soft_penalty / scale) for var, scale in slack_terms)
        model.maximize(objective)
        if hint is not None and hint.shape == (lm.C, lm.E):
            for j in range(lm.n):
                model.add_hint(x[j], bool(hint[lm.ci[j], lm.ei[j]]))
        solver = cp_model.CpSolver()
        workers = request.options.get("workers", 1)
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = request.seed
        solver.parameters.log_search_progress = bool(request.options.get("log", False))
        if time_limit is not None:
            solver.parameters.max_time_in_seconds = max(time_limit - (time.perf_counter() - started), 0.05)
        build = time.perf_counter() - t0
        code = solver.solve(model)
        seconds = time.perf_counter() - t0 - build
        status = {cp_model.OPTIMAL: SolveStatus.OPTIMAL, cp_model.FEASIBLE: SolveStatus.FEASIBLE,
                  cp_model.INFEASIBLE: SolveStatus.INFEASIBLE}.get(code, SolveStatus.NO_SOLUTION_FOUND)
        stats = {"workers": workers, "cp_sat_status": solver.status_name(code),
                 "deterministic": workers == 1 and (time_limit is None or code == cp_model.OPTIMAL),
                 "branches": solver.num_branches}
        explanation: Optional[str] = None
        if code == cp_model.MODEL_INVALID:
            explanation = f"CP-SAT rejected the model: {model.validate()}"
        if not status.has_solution:
            return AlignmentResult(problem, status, self.name, solve_seconds=seconds, build_seconds=build,
                                   explanation=explanation, stats=stats)
        values = np.array([solver.boolean_value(v) for v in x], dtype=bool)
        result = AlignmentResult(problem, status, self.name, assignment=lm.assignment(values), solve_seconds=seconds,
                                 build_seconds=build, soft=request.soft,
                                 soft_penalty=request.soft_penalty if request.soft else None, stats=stats)
        result.bound = max(float(solver.best_objective_bound), result.objective)
        return result
