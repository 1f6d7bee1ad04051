"""``cpsat``: OR-Tools CP-SAT on the general 0-1 model (weighted loads, budgets, anything).

CP-SAT needs integers.  A row whose numbers share a common denominator ``q <= 10**6`` (1/3,
0.1, 2.5, ...) is multiplied by ``q``: the same 0-1 solutions, so OPTIMAL and INFEASIBLE stay
proofs (``stats["exact_rows"]``).  Otherwise the row is rounded against its bound (a
restriction): answers still satisfy the original row, but the status is at best FEASIBLE, never
INFEASIBLE, and no bound is claimed.  The objective is rounded at a power-of-two scale; the
reported ``bound`` adds the worst-case rounding error (``stats["objective_tolerance"]``), and
OPTIMAL means a relative gap <= ``OPTIMAL_GAP``.  Soft-mode slack is integer in scaled row
units.  Workers: 1 by default (deterministic without a time limit, or when optimality is
proven before it), ``LIMITED_WORKERS`` under a time limit (not deterministic);
``stats["deterministic"]`` says which.

Warm starts (:mod:`._lagrangian`; ``warm_start="none"`` turns them off, ``"lagrangian"`` forces
one), whose bound is reported as ``bound`` and whose plan is the hint and the answer of last resort:

- ``flow``: budgeted count-load problems (hard or soft band) with at least ``WARM_ARCS``
  allowed pairs, or ``WARM_ARCS_LIMITED`` under a time limit (CP-SAT alone finds nothing in a
  minute at 10,000 x 64).  Band prices over exact client knapsacks (:mod:`._knapsack`, where
  usage has a small common denominator and the table fits; the band repair of :mod:`._rebalance`
  or else the slot flow turns the clients' sets into the plan), else budget prices with each
  relaxed answer exact by min-cost flow; the slot flow around the relaxed answer is the plan.
- ``rows``: every other problem under a time limit from ``ROW_ARCS`` allowed pairs (weighted
  loads, OR-Library GAP).  Prices on load and budget rows, one independent choice per client,
  the greedy repair of the relaxed answer as the plan.  After the local search, CP-SAT probes the
  full model (up to ``PROBE_ARCS`` pairs, until ``PROBE_SHARE`` of the limit) and its answer is
  returned when proven optimal; else the expert-subset search of :mod:`._expert_lns` improves the
  better plan until ``POLISH_SHARE`` of the limit is left, and the local search polishes it.

The warm start takes ``BAND_SHARE`` (band prices), ``WARM_SHARE`` (budget prices) or
``ROW_SHARE`` of the time limit; the local search of :mod:`._local` then polishes its plan
(until no move gains, or ``LOCAL_SHARE`` of the limit).  After a ``flow`` warm start under a
time limit, the sub-MIP search of :mod:`._submip` (CBC, option ``sub_mip``) goes on until
``LOCAL_SHARE`` of the limit; CP-SAT then searches the rest but ``POLISH_SHARE`` from that plan:
every pair (``rows`` without a time limit, up to ``FULL_MODEL_ARCS``) or each client's best
``candidates`` pairs by priced fitness plus the plan's own; the local search polishes a FEASIBLE
answer in what is left.  Without a time limit the polished plan is returned as it is
(deterministic), FEASIBLE unless the bound closes the gap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ..result import OPTIMAL_GAP, AlignmentResult, SolveStatus
from . import _expert_lns, _knapsack, _lagrangian, _local, _submip
from .base import Backend, SolveRequest

MAX_DENOMINATOR = 10 ** 6   # rows are exact when all their numbers share a denominator up to this
MAX_FRACTIONS = 4096        # distinct fractional values examined per row before giving up on exactness
MAX_ACTIVITY = 2.0 ** 50    # largest integer row activity handed to CP-SAT
MAX_OBJECTIVE = 2.0 ** 56   # largest integer objective activity handed to CP-SAT
WARM_ARCS = 50_000
WARM_ARCS_LIMITED = 10_000  # under a time limit (measured: 1,000 x 32 budgeted, 2 s: no plan alone, 1.2 % below LP warm)
WARM_SHARE = 0.3        # share of the time limit the flow warm start may use (budget prices)
BAND_SHARE = 0.5        # the same with band prices (measured on budgeted 5,000 x 64 seeds 1-4, 10,000 x 64 seeds 1-2)
ROW_ARCS = 1_000        # the row warm start runs under a time limit from this many allowed pairs (d10100, e10100: beat plain CP-SAT)
ROW_SHARE = 0.5         # share of the time limit the row warm start may use
ROW_ITERATIONS = 2000   # its subgradient steps at most (the only limit without a time limit)
FULL_MODEL_ARCS = 200_000   # up to here CP-SAT searches every pair after a row warm start, else candidates
LOCAL_SHARE = 0.85      # the local search on the warm start's plan may run until this share of the limit
POLISH_SHARE = 0.05      # the share of the limit kept to polish CP-SAT's answer by the local search
PROBE_ARCS = 60_000     # after a row warm start, CP-SAT probes the full model up to this many pairs
PROBE_SHARE = 0.25      # until this share of the limit (measured on OR-Library d20100 ... e801600, 30 s)
MIN_SEARCH = 0.3        # seconds CP-SAT needs at least to be worth starting after a warm start
LIMITED_WORKERS = 4     # CP-SAT workers under a time limit (measured best of 1-16 on OR-Library d20100)


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
        kind = self._warm_kind(problem, request, limit is not None)
        if kind is None:
            lm = LinearModel.from_problem(problem, request.soft_penalty if request.soft else None)
            return self._run(problem, lm, request, t0, request.options.get("hint"), request.time_limit)
        share = ROW_SHARE if kind == "rows" else BAND_SHARE if _knapsack.integer_budget(problem) is not None \
            else WARM_SHARE
        deadline = t0 + share * limit if limit is not None else np.inf
        if request.deadline is not None:
            deadline = min(deadline, request.deadline)
        penalty = request.soft_penalty if request.soft else None
        if kind == "flow":
            ws = _lagrangian.lagrangian(problem, deadline=deadline, seed=request.seed, soft_penalty=penalty,
                                        primal_deadline=np.inf if request.deadline is None else request.deadline)
            ranking = problem.objective_matrix - ws.prices[:, None] * problem.usage_matrix
        else:
            ws = _lagrangian.row_lagrangian(problem, deadline=deadline, soft_penalty=penalty,
                                            max_iterations=ROW_ITERATIONS, primal_deadline=request.deadline)
            ranking = _lagrangian.priced(problem, ws.stats["load_prices"], ws.prices)
        stats = {"warm_start": {"kind": kind, "bound": ws.bound, "value": ws.value,
                                **{k: v for k, v in ws.stats.items() if k != "load_prices"}}}
        if ws.x is not None:
            until = t0 + LOCAL_SHARE * limit if limit is not None else np.inf
            ws.x, ws.value, stats["local_search"] = self._polish(problem, ws.x, penalty, until, request.deadline)
        bound = float(ws.bound) if np.isfinite(ws.bound) else None
        if request.report is not None and ws.x is not None:
            request.report(ws.x, bound)
        if ws.x is not None and kind == "flow" and limit is not None and request.options.get("sub_mip", True):
            if _submip.available():
                end = until if request.deadline is None else min(until, request.deadline)
                report = None if request.report is None else (lambda y: request.report(y, bound))
                ws.x, stats["sub_mip"] = _submip.improve(problem, ws.x, deadline=end, seed=request.seed,
                                                         soft_penalty=penalty, report=report)
                ws.value = _lagrangian.plan_value(problem, ws.x, penalty)
            else:
                stats["sub_mip"] = {"skipped": "PuLP is not installed (pip install 'alignment-solver[pulp]')"}
        if kind == "rows" and limit is not None and ws.x is not None:
            return self._rows_search(problem, request, ws, ranking, stats, t0, limit)
        remaining = None if limit is None else limit - (time.perf_counter() - t0)
        hint = ws.x if ws.x is not None else ws.reference
        if remaining is not None and remaining > MIN_SEARCH:
            arcs = int(problem.allowed_matrix.sum())
            full = ws.x is None or arcs <= FULL_MODEL_ARCS
            mask = None
            if not full:
                m = min(request.options.get("candidates", 8), problem.n_experts)
                top = np.argpartition(-np.where(problem.allowed_matrix, ranking, -np.inf), m - 1, axis=1)[:, :m]
                mask = ws.x.copy()
                np.put_along_axis(mask, top, True, axis=1)
            lm = LinearModel.from_problem(problem, penalty, mask=mask)
            result = self._run(problem, lm, request, t0, hint, remaining - POLISH_SHARE * limit)
            if result.has_solution and result.status is SolveStatus.FEASIBLE:
                started = time.perf_counter()
                x, _, info = self._polish(problem, result.assignment, penalty, t0 + limit, request.deadline)
                if info["gain"] > 0:
                    result = AlignmentResult(problem, SolveStatus.FEASIBLE, self.name, assignment=x, bound=result.bound,
                                             solve_seconds=result.solve_seconds + time.perf_counter() - started,
                                             build_seconds=result.build_seconds, soft=result.soft,
                                             soft_penalty=result.soft_penalty, stats={**result.stats, "polished": info})
            if result.has_solution and result.objective >= ws.value:
                result.stats.update(stats, restricted_to=None if full else int(mask.sum()))
                return self._bounded(result, ws.bound, full)
            if ws.x is None:
                result.stats.update(stats)
                return self._bounded(result, ws.bound, full) if result.has_solution else result
        if ws.x is None:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name,
                                   solve_seconds=time.perf_counter() - t0,
                                   explanation="the Lagrangian warm start found no assignment that fits every hard row",
                                   stats=stats)
        result = AlignmentResult(problem, SolveStatus.FEASIBLE, self.name, assignment=ws.x,
                                 solve_seconds=time.perf_counter() - t0, soft=request.soft, soft_penalty=penalty,
                                 stats={**stats, "deterministic": limit is None, "source": "warm start"})
        return self._bounded(result, ws.bound, False)

    def _rows_search(self, problem: AlignmentProblem, request: SolveRequest, ws: _lagrangian.WarmStart,
                     ranking: np.ndarray, stats: dict, t0: float, limit: float) -> AlignmentResult:
        """After a row warm start under a time limit: a CP-SAT probe on the full model (up to
        ``PROBE_ARCS`` pairs, until ``PROBE_SHARE`` of the limit), returned when it proves its plan
        optimal; else the expert-subset search of :mod:`._expert_lns` from the better plan, and the
        local search in the last ``POLISH_SHARE``."""
        penalty = request.soft_penalty if request.soft else None
        x, value, bound = ws.x, ws.value, ws.bound
        probe_time = PROBE_SHARE * limit - (time.perf_counter() - t0)
        if int(problem.allowed_matrix.sum()) <= PROBE_ARCS and probe_time > MIN_SEARCH:
            probe = self._run(problem, LinearModel.from_problem(problem, penalty), request, time.perf_counter(),
                              ws.x, probe_time)
            stats["probe"] = {"status": probe.status.value, "objective": probe.objective, "bound": probe.bound}
            if probe.has_solution:
                probe = self._bounded(probe, ws.bound, True)
                if probe.status is SolveStatus.OPTIMAL and probe.objective >= ws.value:
                    probe.stats.update(stats)
                    return probe
                bound = probe.bound
                if probe.objective > value:
                    x, value = probe.assignment, probe.objective
        end = t0 + (1 - POLISH_SHARE) * limit
        if request.deadline is not None:
            end = min(end, request.deadline)
        reported = float(bound) if np.isfinite(bound) else None
        report = None if request.report is None else (lambda y: request.report(y, reported))
        x, stats["expert_search"] = _expert_lns.improve(problem, x, deadline=end, seed=request.seed, score=ranking,
                                                        soft_penalty=penalty, bound=bound, report=report)
        x, _, stats["polished"] = self._polish(problem, x, penalty, t0 + limit, request.deadline)
        result = AlignmentResult(problem, SolveStatus.FEASIBLE, self.name, assignment=x,
                                 solve_seconds=time.perf_counter() - t0, soft=request.soft, soft_penalty=penalty,
                                 stats={**stats, "deterministic": False, "source": "expert search"})
        return self._bounded(result, bound, False)

    @staticmethod
    def _polish(problem: AlignmentProblem, x: np.ndarray, penalty: Optional[float], until: float,
                deadline: Optional[float]) -> tuple[np.ndarray, float, dict]:
        """The plan after the local search until ``until`` (or ``deadline``), its value, and
        ``{"gain", "seconds"}``; the gain is NaN when ``x`` breaks a hard row."""
        started = time.perf_counter()
        better = _local.improve(problem, x, deadline=until if deadline is None else min(until, deadline),
                                soft_penalty=penalty)
        value = _lagrangian.plan_value(problem, better, penalty)
        with np.errstate(invalid="ignore"):
            gain = value - _lagrangian.plan_value(problem, x, penalty)
        return better, value, {"gain": gain, "seconds": time.perf_counter() - started}

    @staticmethod
    def _warm_kind(problem: AlignmentProblem, request: SolveRequest, limited: bool) -> Optional[str]:
        """Which warm start runs: "flow" (budgets on count loads), "rows" (anything else, under a
        time limit or when asked for) or None (always None with per-group rows)."""
        mode = request.options.get("warm_start", "auto")
        if mode == "none" or problem.has_groups:     # the warm starts know no per-group rows
            return None
        arcs = int(problem.allowed_matrix.sum())
        if _lagrangian.applies(problem):
            if mode == "lagrangian" or arcs >= (WARM_ARCS_LIMITED if limited else WARM_ARCS):
                return "flow"
            return None
        if mode == "lagrangian" or (limited and arcs >= ROW_ARCS):
            return "rows"
        return None

    @staticmethod
    def _bounded(result: AlignmentResult, bound: float, full: bool) -> AlignmentResult:
        """Attach the Lagrangian bound (valid for the full problem) and promote a closed gap; an
        OPTIMAL from a restricted model (``full`` False) is optimal only for its pairs."""
        own = result.bound if full and result.bound is not None else np.inf
        result.bound = max(min(float(bound), own), result.objective)
        if result.gap is not None and result.gap <= 1e-9:
            result.status = SolveStatus.OPTIMAL
        elif result.status is SolveStatus.OPTIMAL and not full:
            result.status = SolveStatus.FEASIBLE
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


def _denominator(values: np.ndarray, limit: int = MAX_DENOMINATOR) -> Optional[int]:
    """Smallest common denominator ``q <= limit`` making every value an integer, or None."""
    q = 1
    frac = values[values != np.round(values)]
    uniq = np.unique(frac)
    if len(uniq) > MAX_FRACTIONS:
        return None
    for v in uniq:
        f = Fraction(float(v)).limit_denominator(limit)
        if abs(float(f) - v) > 1e-12 * max(1.0, abs(v)):
            return None
        q = q * f.denominator // math.gcd(q, f.denominator)
        if q > limit:
            return None
    return q


def _pow2_scale(limit: float, activity: float) -> float:
    """Largest power of two (at most 2**900) that keeps ``activity * scale <= limit``; 1 for no activity."""
    if activity <= 0:
        return 1.0
    return 2.0 ** min(math.floor(math.log2(limit) - math.log2(activity)), 900)


def integer_row(coef: np.ndarray, lo: float, hi: float) -> IntegerRow:
    """The row ``lo <= coef . x <= hi`` (x in {0,1}) with integer coefficients (see IntegerRow)."""
    coef = np.asarray(coef, dtype=float)
    bounds = np.array([b for b in (lo, hi) if np.isfinite(b)])
    q = _denominator(np.concatenate([coef, bounds]))
    activity = float(np.abs(coef).sum()) + float(np.abs(bounds).sum())
    if q is not None and activity * q <= MAX_ACTIVITY:
        ic = np.rint(coef * q).astype(np.int64)
        return IntegerRow(ic, ic, int(round(lo * q)) if np.isfinite(lo) else None,
                          int(round(hi * q)) if np.isfinite(hi) else None, float(q), True)
    scale = _pow2_scale(MAX_ACTIVITY, activity)
    scaled = coef * scale
    return IntegerRow(np.floor(scaled).astype(np.int64) if np.isfinite(lo) else None,
                      np.ceil(scaled).astype(np.int64) if np.isfinite(hi) else None,
                      int(math.ceil(lo * scale)) if np.isfinite(lo) else None,
                      int(math.floor(hi * scale)) if np.isfinite(hi) else None, scale, False)


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
