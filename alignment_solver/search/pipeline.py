"""The search for budgeted and weighted rounds, in the order it runs; ``cpsat`` calls it.

Which warm start (:func:`warm_kind`):

Warm starts (:mod:`.prices`; ``warm_start="none"`` turns them off, ``"lagrangian"`` forces
one), whose bound is reported as ``bound`` and whose plan is the hint and the answer of last resort:

- ``flow``: budgeted count-load problems (hard or soft band) with at least ``WARM_ARCS``
  allowed pairs, or ``WARM_ARCS_LIMITED`` under a time limit (CP-SAT alone finds nothing in a
  minute at 10,000 x 64).  Band prices over exact client knapsacks (:mod:`.knapsack`, where
  usage has a small common denominator and the table fits; the band repair of :mod:`.rebalance`
  or else the slot flow turns the clients' sets into the plan), else budget prices with each
  relaxed answer exact by min-cost flow; the slot flow around the relaxed answer is the plan.
- ``rows``: every other problem under a time limit from ``ROW_ARCS`` allowed pairs (weighted
  loads, OR-Library GAP).  Prices on load and budget rows, one independent choice per client,
  the greedy repair of the relaxed answer as the plan.  After the local search, CP-SAT probes the
  full model (up to ``PROBE_ARCS`` pairs, until ``PROBE_SHARE`` of the limit) and its answer is
  returned when proven optimal; else the expert-subset search of :mod:`.expert_lns` improves the
  better plan until ``POLISH_SHARE`` of the limit is left, and the local search polishes it.

The warm start takes ``BAND_SHARE`` (band prices), ``WARM_SHARE`` (budget prices) or
``ROW_SHARE`` of the time limit; the local search of :mod:`.local` then polishes its plan
(until no move gains, or ``LOCAL_SHARE`` of the limit).  After a ``flow`` warm start under a
time limit, the sub-MIP search of :mod:`.submip` (CBC, option ``sub_mip``) goes on until
``LOCAL_SHARE`` of the limit; CP-SAT then searches the rest but ``POLISH_SHARE`` from that plan:
every pair (``rows`` without a time limit, up to ``FULL_MODEL_ARCS``) or each client's best
``candidates`` pairs by priced fitness plus the plan's own; the local search polishes a FEASIBLE
answer in what is left.  Without a time limit the polished plan is returned as it is
(deterministic), FEASIBLE unless the bound closes the gap.

The search imports no backend: CP-SAT models, exact flows and CBC sub-problems are solved
through the callables in :class:`Solvers`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ..request import Solver, SolveRequest
from ..result import AlignmentResult, SolveStatus
from . import expert_lns, knapsack, local, prices, submip
from .values import plan_value

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

#: CP-SAT on a 0-1 model: ``(problem, model, request, started, hint, time_limit) -> result``
ModelSolver = Callable[[AlignmentProblem, LinearModel, SolveRequest, float, Optional[np.ndarray], Optional[float]],
                       AlignmentResult]


@dataclass(frozen=True)
class Solvers:
    """What the search solves exactly: CP-SAT models, min-cost flows (budget prices) and, when
    PuLP is installed, CBC sub-problems (the sub-MIP search)."""

    model: ModelSolver
    flow: Solver
    mip: Optional[Solver] = None


def search(problem: AlignmentProblem, request: SolveRequest, kind: str, solvers: Solvers, *, t0: float,
           limit: Optional[float], name: str) -> AlignmentResult:
    """The whole search for one problem, in order (``kind`` from :func:`warm_kind`; ``limit``: the
    seconds from ``t0``, or None): warm start, local search, then under a limit the sub-MIP
    search (``flow``) or the probe and expert-subset search (``rows``), then a CP-SAT search from
    the plan and a last polish."""
    share = ROW_SHARE if kind == "rows" else BAND_SHARE if knapsack.integer_budget(problem) is not None \
        else WARM_SHARE
    deadline = t0 + share * limit if limit is not None else np.inf
    if request.deadline is not None:
        deadline = min(deadline, request.deadline)
    penalty = request.soft_penalty if request.soft else None
    if kind == "flow":
        ws = prices.lagrangian(problem, solvers.flow, deadline=deadline, seed=request.seed, soft_penalty=penalty,
                               primal_deadline=np.inf if request.deadline is None else request.deadline)
        ranking = problem.objective_matrix - ws.prices[:, None] * problem.usage_matrix
    else:
        ws = prices.row_lagrangian(problem, deadline=deadline, soft_penalty=penalty,
                                   max_iterations=ROW_ITERATIONS, primal_deadline=request.deadline)
        ranking = prices.priced(problem, ws.stats["load_prices"], ws.prices)
    stats = {"warm_start": {"kind": kind, "bound": ws.bound, "value": ws.value,
                            **{k: v for k, v in ws.stats.items() if k != "load_prices"}}}
    if ws.x is not None:
        until = t0 + LOCAL_SHARE * limit if limit is not None else np.inf
        ws.x, ws.value, stats["local_search"] = polish(problem, ws.x, penalty, until, request.deadline)
    bound = float(ws.bound) if np.isfinite(ws.bound) else None
    if request.report is not None and ws.x is not None:
        request.report(ws.x, bound)
    if ws.x is not None and kind == "flow" and limit is not None and request.options.get("sub_mip", True):
        if solvers.mip is not None and submip.available():
            end = until if request.deadline is None else min(until, request.deadline)
            report = None if request.report is None else (lambda y: request.report(y, bound))
            ws.x, stats["sub_mip"] = submip.improve(problem, ws.x, solvers.mip, deadline=end, seed=request.seed,
                                                    soft_penalty=penalty, report=report)
            ws.value = plan_value(problem, ws.x, penalty)
        else:
            stats["sub_mip"] = {"skipped": "PuLP is not installed (pip install 'alignment-solver[pulp]')"}
    if kind == "rows" and limit is not None and ws.x is not None:
        return rows_search(problem, request, ws, ranking, stats, t0, limit, solvers, name)
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
        result = solvers.model(problem, lm, request, t0, hint, remaining - POLISH_SHARE * limit)
        if result.has_solution and result.status is SolveStatus.FEASIBLE:
            started = time.perf_counter()
            x, _, info = polish(problem, result.assignment, penalty, t0 + limit, request.deadline)
            if info["gain"] > 0:
                result = AlignmentResult(problem, SolveStatus.FEASIBLE, name, assignment=x, bound=result.bound,
                                         solve_seconds=result.solve_seconds + time.perf_counter() - started,
                                         build_seconds=result.build_seconds, soft=result.soft,
                                         soft_penalty=result.soft_penalty, stats={**result.stats, "polished": info})
        if result.has_solution and result.objective >= ws.value:
            result.stats.update(stats, restricted_to=None if full else int(mask.sum()))
            return bounded(result, ws.bound, full)
        if ws.x is None:
            result.stats.update(stats)
            return bounded(result, ws.bound, full) if result.has_solution else result
    if ws.x is None:
        return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, name,
                               solve_seconds=time.perf_counter() - t0,
                               explanation="the Lagrangian warm start found no assignment that fits every hard row",
                               stats=stats)
    result = AlignmentResult(problem, SolveStatus.FEASIBLE, name, assignment=ws.x,
                             solve_seconds=time.perf_counter() - t0, soft=request.soft, soft_penalty=penalty,
                             stats={**stats, "deterministic": limit is None, "source": "warm start"})
    return bounded(result, ws.bound, False)


def rows_search(problem: AlignmentProblem, request: SolveRequest, ws: prices.WarmStart, ranking: np.ndarray,
                stats: dict, t0: float, limit: float, solvers: Solvers, name: str) -> AlignmentResult:
    """After a row warm start under a time limit: a CP-SAT probe on the full model (up to
    ``PROBE_ARCS`` pairs, until ``PROBE_SHARE`` of the limit), returned when it proves its plan
    optimal; else the expert-subset search of :mod:`.expert_lns` from the better plan, and the
    local search in the last ``POLISH_SHARE``."""
    penalty = request.soft_penalty if request.soft else None
    x, value, bound = ws.x, ws.value, ws.bound
    probe_time = PROBE_SHARE * limit - (time.perf_counter() - t0)
    if int(problem.allowed_matrix.sum()) <= PROBE_ARCS and probe_time > MIN_SEARCH:
        probe = solvers.model(problem, LinearModel.from_problem(problem, penalty), request, time.perf_counter(),
                          ws.x, probe_time)
        stats["probe"] = {"status": probe.status.value, "objective": probe.objective, "bound": probe.bound}
        if probe.has_solution:
            probe = bounded(probe, ws.bound, True)
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
    x, stats["expert_search"] = expert_lns.improve(problem, x, sub_solver(solvers.model), deadline=end,
                                                   seed=request.seed, score=ranking, soft_penalty=penalty,
                                                   bound=bound, report=report)
    x, _, stats["polished"] = polish(problem, x, penalty, t0 + limit, request.deadline)
    result = AlignmentResult(problem, SolveStatus.FEASIBLE, name, assignment=x,
                             solve_seconds=time.perf_counter() - t0, soft=request.soft, soft_penalty=penalty,
                             stats={**stats, "deterministic": False, "source": "expert search"})
    return bounded(result, bound, False)


def polish(problem: AlignmentProblem, x: np.ndarray, penalty: Optional[float], until: float,
           deadline: Optional[float]) -> tuple[np.ndarray, float, dict]:
    """The plan after the local search until ``until`` (or ``deadline``), its value, and
    ``{"gain", "seconds"}``; the gain is NaN when ``x`` breaks a hard row."""
    started = time.perf_counter()
    better = local.improve(problem, x, deadline=until if deadline is None else min(until, deadline),
                            soft_penalty=penalty)
    value = plan_value(problem, better, penalty)
    with np.errstate(invalid="ignore"):
        gain = value - plan_value(problem, x, penalty)
    return better, value, {"gain": gain, "seconds": time.perf_counter() - started}


def warm_kind(problem: AlignmentProblem, request: SolveRequest, limited: bool) -> Optional[str]:
    """Which warm start runs: "flow" (budgets on count loads), "rows" (anything else, under a
    time limit or when asked for) or None (always None with per-group rows or a privacy floor)."""
    mode = request.options.get("warm_start", "auto")
    if mode == "none" or problem.has_groups or problem.has_min_group:   # the warm starts know no group rows or floors
        return None
    arcs = int(problem.allowed_matrix.sum())
    if prices.applies(problem):
        if mode == "lagrangian" or arcs >= (WARM_ARCS_LIMITED if limited else WARM_ARCS):
            return "flow"
        return None
    if mode == "lagrangian" or (limited and arcs >= ROW_ARCS):
        return "rows"
    return None


def bounded(result: AlignmentResult, bound: float, full: bool) -> AlignmentResult:
    """Attach the Lagrangian bound (valid for the full problem) and promote a closed gap; an
    OPTIMAL from a restricted model (``full`` False) is optimal only for its pairs."""
    own = result.bound if full and result.bound is not None else np.inf
    result.bound = max(min(float(bound), own), result.objective)
    if result.gap is not None and result.gap <= 1e-9:
        result.status = SolveStatus.OPTIMAL
    elif result.status is SolveStatus.OPTIMAL and not full:
        result.status = SolveStatus.FEASIBLE
    return result


def sub_solver(model: ModelSolver) -> Solver:
    """CP-SAT on a sub-problem's whole model, with the hint the request's options carry."""
    def solve(sub: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        lm = LinearModel.from_problem(sub, request.soft_penalty if request.soft else None)
        return model(sub, lm, request, time.perf_counter(), request.options.get("hint"), request.time_limit)
    return solve


__all__ = ["Solvers", "bounded", "polish", "rows_search", "search", "sub_solver", "warm_kind"]
