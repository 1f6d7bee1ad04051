"""``cpsat``: OR-Tools CP-SAT on the general 0-1 model (weighted loads, budgets, anything).

Rows must have integer coefficients: a row whose coefficients or bounds are not integers is
multiplied by ``ROW_SCALE`` and rounded (bounds rounded inwards, so answers stay feasible); the
result's ``violations()`` re-checks with the original numbers.  Soft-mode slack is integer (in
row units).  Deterministic with ``workers=1`` (the default) and no time limit, or when it
proves optimality before the limit; ``stats["deterministic"]`` says which.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from .base import Backend, SolveRequest

ROW_SCALE = 10 ** 6


def _integral(*arrays: Any) -> bool:
    return all(np.all(np.asarray(a)[np.isfinite(a)] == np.round(np.asarray(a)[np.isfinite(a)])) for a in arrays)


class CpSatBackend(Backend):
    name = "cpsat"
    requires = ("ortools",)
    options = {
        "workers": (1, "CP-SAT search workers; 1 is deterministic"),
        "hint": (None, "optional (C, E) bool assignment to start from"),
        "log": (False, "print CP-SAT's search log"),
    }

    def check_option(self, name: str, value: Any) -> Any:
        if name == "workers":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"option 'workers' of backend 'cpsat' must be an integer >= 1; got {value!r}")
            return int(value)
        if name == "log":
            if not isinstance(value, bool):
                raise ValueError(f"option 'log' of backend 'cpsat' must be True or False; got {value!r}")
            return value
        return None if value is None else np.asarray(value, dtype=bool)

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        from ortools.sat.python import cp_model

        t0 = time.perf_counter()
        lm = LinearModel.from_problem(problem, request.soft_penalty if request.soft else None)
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
        hint = request.options.get("hint")
        if hint is not None and hint.shape == (lm.C, lm.E):
            for j in range(lm.n):
                model.add_hint(x[j], bool(hint[lm.ci[j], lm.ei[j]]))
        solver = cp_model.CpSolver()
        workers = request.options.get("workers", 1)
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = request.seed
        solver.parameters.log_search_progress = bool(request.options.get("log", False))
        if request.time_limit is not None:
            solver.parameters.max_time_in_seconds = max(request.time_limit - (time.perf_counter() - t0), 0.05)
        build = time.perf_counter() - t0
        code = solver.solve(model)
        seconds = time.perf_counter() - t0 - build
        status = {cp_model.OPTIMAL: SolveStatus.OPTIMAL, cp_model.FEASIBLE: SolveStatus.FEASIBLE,
                  cp_model.INFEASIBLE: SolveStatus.INFEASIBLE}.get(code, SolveStatus.NO_SOLUTION_FOUND)
        stats = {"workers": workers, "cp_sat_status": solver.status_name(code),
                 "deterministic": workers == 1 and (request.time_limit is None or code == cp_model.OPTIMAL),
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
