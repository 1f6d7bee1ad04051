"""``cpsat``: OR-Tools CP-SAT on the general 0-1 model (weighted loads, budgets, anything).

CP-SAT needs integers.  A row whose numbers share a common denominator ``q <= 10**6`` (1/3,
0.1, 2.5, ...) is multiplied by ``q``: the same 0-1 solutions, so OPTIMAL and INFEASIBLE stay
proofs (``stats["exact_rows"]``).  Otherwise the row is rounded against its bounds, widened
first by half the slack every answer is checked with (``ROW_SLACK`` of the row's magnitude, so
a plan exactly at a bound survives the rounding): answers still satisfy the original row within
that check, but the status is at best FEASIBLE, never INFEASIBLE, and no bound is claimed.
When such a model has no answer, the greedy plan is tried on the problem as given and returned
(FEASIBLE) if it holds (``stats["rounded_rows_fallback"]``).  The objective is rounded at a power-of-two scale; the
reported ``bound`` adds the worst-case rounding error (``stats["objective_tolerance"]``), and
OPTIMAL means a relative gap <= ``OPTIMAL_GAP``.  Soft-mode slack is integer in scaled row
units.  Workers: 1 by default (deterministic without a time limit, or when optimality is
proven before it), ``LIMITED_WORKERS`` under a time limit (not deterministic);
``stats["deterministic"]`` says which.

Problems with budgets or weighted loads at scale, or under a time limit, go through the search
of :mod:`alignment_solver.search.pipeline` (warm starts, local search, sub-MIP, expert-subset
search), which calls back into this backend for every CP-SAT model (``warm_start="none"`` turns
it off, ``"lagrangian"`` forces it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..numeric import common_denominator
from ..problem import ROW_RTOL, AlignmentProblem
from ..result import OPTIMAL_GAP, AlignmentResult, SolveStatus
from ..search import pipeline
from .base import Backend, SolveRequest

MAX_ACTIVITY = 2.0 ** 50    # largest integer row activity handed to CP-SAT
MAX_OBJECTIVE = 2.0 ** 56   # largest integer objective activity handed to CP-SAT
LIMITED_WORKERS = 4     # CP-SAT workers under a time limit (measured best of 1-16 on OR-Library d20100)
#: a rounded row's bounds are widened by this share of its magnitude (half the slack every answer
#: is checked with, ``problem.ROW_RTOL``): a plan exactly at a bound survives the rounding
ROW_SLACK = ROW_RTOL / 2


class CpSatBackend(Backend):
    name = "cpsat"
    requires = ("ortools",)
    child_processes = True      # the sub-MIP search of budgeted rounds runs CBC
    options = {
        "workers": (None, f"CP-SAT search workers (default 1, or {LIMITED_WORKERS} under a time limit); "
                          "1 without a time limit is deterministic"),
        "hint": (None, "optional (C, E) bool assignment to start from"),
        "log": (False, "print CP-SAT's search log"),
        "warm_start": ("auto", "'auto', 'lagrangian' or 'none' (see the module docstring)"),
        "candidates": (8, "pairs per client CP-SAT searches after a warm start"),
        "sub_mip": (True, "budgeted rounds under a time limit: CBC re-plans sets of clients after the local search "
                          "(needs PuLP; skipped without it, see stats['sub_mip'])"),
    }

    def check_option(self, name: str, value: Any) -> Any:
        if name in ("workers", "candidates"):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"option {name!r} of backend 'cpsat' must be an integer >= 1; got {value!r}")
            return int(value)
        if name in ("log", "sub_mip"):
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} of backend 'cpsat' must be True or False; got {value!r}")
            return value
        if name == "warm_start":
            if value not in ("auto", "lagrangian", "none"):
                raise ValueError(f"option 'warm_start' of backend 'cpsat' must be one of "
                                 f"['auto', 'lagrangian', 'none']; got {value!r}")
            return value
        return None if value is None else np.asarray(value, dtype=bool)

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        t0 = time.perf_counter()
        limit = request.time_limit
        if limit is None and request.deadline is not None:
            limit = request.deadline - t0
        kind = pipeline.warm_kind(problem, request, limit is not None)
        if kind is None:
            lm = LinearModel.from_problem(problem, request.soft_penalty if request.soft else None)
            result = self._run(problem, lm, request, t0, request.options.get("hint"), request.time_limit)
        else:
            solvers = pipeline.Solvers(model=self._run, flow=_flow_solve, mip=_cbc_solve)
            result = pipeline.search(problem, request, kind, solvers, t0=t0, limit=limit, name=self.name)
        if result.status is SolveStatus.NO_SOLUTION_FOUND and result.stats.get("exact_rows") is False:
            return _greedy_instead(result, request)
        return result

    def _run(self, problem: AlignmentProblem, lm: LinearModel, request: SolveRequest, t0: float,
             hint: Optional[np.ndarray], time_limit: Optional[float]) -> AlignmentResult:
        from ortools.sat.python import cp_model

        started = time.perf_counter()
        model = cp_model.CpModel()
        x = [model.new_bool_var(f"x{j}") for j in range(lm.n)]
        slacks: list[tuple[Any, float, int]] = []     # (slack variable, row units per integer unit, upper bound)
        exact = True
        for row in lm.rows():
            if request.deadline is not None and time.perf_counter() > request.deadline:
                return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name,
                                       build_seconds=time.perf_counter() - t0,
                                       explanation="the time limit ran out while building the CP-SAT model",
                                       stats={"deterministic": False})
            ir = integer_row(row.coef, row.lo, row.hi)
            exact &= ir.exact
            if lm.soft and row.kind == "load":
                ic = ir.coef_hi if ir.coef_hi is not None else ir.coef_lo
                lo_i = max(ir.lo or 0, 0)
                top = int(np.abs(ic).sum()) + lo_i + 1
                short = model.new_int_var(0, lo_i, f"short{row.index}")
                over = model.new_int_var(0, top, f"over{row.index}")
                expr = cp_model.LinearExpr.weighted_sum([x[j] for j in row.pairs], ic.tolist()) + short - over
                if ir.lo is not None:
                    model.add(expr >= ir.lo)
                if ir.hi is not None:
                    model.add(expr <= ir.hi)
                slacks += [(short, 1.0 / ir.scale, lo_i), (over, 1.0 / ir.scale, top)]
                continue
            if ir.hi is not None:
                model.add(cp_model.LinearExpr.weighted_sum([x[j] for j in row.pairs], ir.coef_hi.tolist()) <= ir.hi)
            if ir.lo is not None:
                model.add(cp_model.LinearExpr.weighted_sum([x[j] for j in row.pairs], ir.coef_lo.tolist()) >= ir.lo)
        for e, idx, m in lm.floors():             # no trainer, or at least m
            on = model.new_bool_var(f"floor{e}")
            trainers = cp_model.LinearExpr.sum([x[j] for j in idx])
            model.add(trainers >= m).only_enforce_if(on)
            model.add(trainers == 0).only_enforce_if(~on)
        obj = IntegerObjective(lm, slacks)
        objective = cp_model.LinearExpr.weighted_sum(x, obj.pair_coef.tolist())
        if slacks:
            objective = objective - cp_model.LinearExpr.weighted_sum([v for v, _, _ in slacks], obj.slack_coef.tolist())
        model.maximize(objective)
        if hint is not None and hint.shape == (lm.C, lm.E):
            for j in range(lm.n):
                model.add_hint(x[j], bool(hint[lm.ci[j], lm.ei[j]]))
        solver = cp_model.CpSolver()
        workers = request.options.get("workers")
        if workers is None:
            workers = 1 if time_limit is None and request.deadline is None else LIMITED_WORKERS
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = request.seed
        solver.parameters.log_search_progress = bool(request.options.get("log", False))
        if time_limit is not None:
            solver.parameters.max_time_in_seconds = max(time_limit - (time.perf_counter() - started), 0.05)
        if request.deadline is not None:
            left = max(request.deadline - time.perf_counter(), 0.05)
            solver.parameters.max_time_in_seconds = min(solver.parameters.max_time_in_seconds, left)
        build = time.perf_counter() - t0
        code = solver.solve(model)
        seconds = time.perf_counter() - t0 - build
        stats = {"workers": workers, "cp_sat_status": solver.status_name(code), "exact_rows": exact,
                 "objective_tolerance": obj.error,
                 "deterministic": workers == 1 and (time_limit is None or code == cp_model.OPTIMAL),
                 "branches": solver.num_branches}
        explanation: Optional[str] = None
        if code == cp_model.MODEL_INVALID:
            explanation = f"CP-SAT rejected the model: {model.validate() or 'no reason given'}"
        if code == cp_model.INFEASIBLE:
            if exact:
                return AlignmentResult(problem, SolveStatus.INFEASIBLE, self.name, solve_seconds=seconds,
                                       build_seconds=build, stats=stats)
            explanation = ("CP-SAT found no assignment of the integer-rounded model, a restriction of the problem "
                           "(its weights have no small common denominator); the problem itself may be feasible")
        if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=seconds,
                                   build_seconds=build, explanation=explanation, stats=stats)
        values = np.array([solver.boolean_value(v) for v in x], dtype=bool)
        result = AlignmentResult(problem, SolveStatus.FEASIBLE, self.name, assignment=lm.assignment(values),
                                 solve_seconds=seconds, build_seconds=build, soft=request.soft,
                                 soft_penalty=request.soft_penalty if request.soft else None, stats=stats)
        if exact:
            result.bound = max(obj.to_original(solver.best_objective_bound) + obj.error, result.objective)
            if code == cp_model.OPTIMAL and result.gap is not None and result.gap <= OPTIMAL_GAP:
                result.status = SolveStatus.OPTIMAL
        return result


@dataclass
class IntegerRow:
    """``lo <= coef_lo . x`` and ``coef_hi . x <= hi`` in integers; ``scale`` maps back (value = int / scale).

    ``exact``: the integer rows have the same 0-1 solutions as the float row (a common
    denominator exists); otherwise they are a restriction (coefficients rounded against the
    bound), so every integer solution satisfies the original row but some original solutions
    may be lost.  When exact, ``coef_lo is coef_hi``.
    """

    coef_lo: Optional[np.ndarray]
    coef_hi: Optional[np.ndarray]
    lo: Optional[int]
    hi: Optional[int]
    scale: float
    exact: bool


def _pow2_scale(limit: float, activity: float) -> float:
    """Largest power of two (at most 2**900) that keeps ``activity * scale <= limit``; 1 for no activity."""
    if activity <= 0:
        return 1.0
    return 2.0 ** min(math.floor(math.log2(limit) - math.log2(activity)), 900)


def integer_row(coef: np.ndarray, lo: float, hi: float) -> IntegerRow:
    """The row ``lo <= coef . x <= hi`` (x in {0,1}) with integer coefficients (see IntegerRow)."""
    coef = np.asarray(coef, dtype=float)
    bounds = np.array([b for b in (lo, hi) if np.isfinite(b)])
    q = common_denominator(np.concatenate([coef, bounds]))
    activity = float(np.abs(coef).sum()) + float(np.abs(bounds).sum())
    if q is not None and activity * q <= MAX_ACTIVITY:
        ic = np.rint(coef * q).astype(np.int64)
        return IntegerRow(ic, ic, int(round(lo * q)) if np.isfinite(lo) else None,
                          int(round(hi * q)) if np.isfinite(hi) else None, float(q), True)
    scale = _pow2_scale(MAX_ACTIVITY, activity)
    scaled = coef * scale
    slack = ROW_SLACK * max(float(np.abs(coef).max(initial=0.0)), float(np.abs(bounds).max(initial=0.0)))
    return IntegerRow(np.floor(scaled).astype(np.int64) if np.isfinite(lo) else None,
                      np.ceil(scaled).astype(np.int64) if np.isfinite(hi) else None,
                      int(math.ceil((lo - slack) * scale)) if np.isfinite(lo) else None,
                      int(math.floor((hi + slack) * scale)) if np.isfinite(hi) else None, scale, False)


class IntegerObjective:
    """The objective (pair values, minus slack prices) rounded to integers at a power-of-two scale.

    Any assignment's integer objective / ``scale`` is within ``error`` of its true value, so the
    true optimum is at most ``bound / scale + error``.
    """

    def __init__(self, lm: LinearModel, slacks: list[tuple[Any, float, int]]) -> None:
        penalty = lm.soft_penalty or 0.0
        slack_price = np.array([penalty * unit for _, unit, _ in slacks])
        slack_max = np.array([float(top) for _, _, top in slacks])
        activity = float(np.abs(lm.obj).sum() + (slack_price * slack_max).sum())
        self.scale = _pow2_scale(MAX_OBJECTIVE, activity)
        self.pair_coef = np.rint(lm.obj * self.scale).astype(np.int64)
        self.slack_coef = np.rint(slack_price * self.scale).astype(np.int64)
        pairs = float(min(lm.n, lm.client_hi.sum()))
        pair_off = float(np.abs(self.pair_coef - lm.obj * self.scale).max(initial=0.0))
        slack_off = np.abs(self.slack_coef - slack_price * self.scale)
        self.error = (pair_off * pairs + float((slack_off * slack_max).sum())) / self.scale

    def to_original(self, value: float) -> float:
        return float(value) / self.scale


def _greedy_instead(result: AlignmentResult, request: SolveRequest) -> AlignmentResult:
    """The greedy plan when it satisfies the problem as given, where the integer-rounded model
    (a restriction) found none; else ``result``."""
    from .greedy import GreedyBackend

    problem = result.problem
    greedy = GreedyBackend().solve(problem, replace(request, report=None))
    if not greedy.has_solution or greedy.violations(band=not request.soft):
        return result
    why = ("CP-SAT found no assignment of its integer-rounded model (rows without a small common denominator "
           "are rounded, a restriction of the problem), but the greedy plan satisfies the problem as given")
    return AlignmentResult(problem, SolveStatus.FEASIBLE, result.backend, assignment=greedy.assignment,
                           solve_seconds=result.solve_seconds + greedy.solve_seconds, build_seconds=result.build_seconds,
                           soft=request.soft, soft_penalty=request.soft_penalty if request.soft else None,
                           explanation=f"{why}; it is returned without a bound",
                           stats={**result.stats, "rounded_rows_fallback": "greedy"})


def _flow_solve(problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
    from .flow import FlowBackend

    return FlowBackend().solve(problem, request)


def _cbc_solve(problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
    from .pulp_cbc import PulpCbcBackend  # imported only when a step runs (PuLP takes a moment)

    return PulpCbcBackend().solve(problem, request)
