"""The one entry point: ``solve(problem, ...)`` -> :class:`AlignmentResult`."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Mapping, Optional

import numpy as np

from . import deadline, diagnosis
from .backends import get_backend
from .backends.base import SolveRequest
from .errors import InvalidOptionError, UnsupportedProblemError, describe
from .formulations.flow import penalty_for
from .problem import AlignmentProblem
from .result import OPTIMAL_GAP, AlignmentResult, SolveStatus
from .search.warm import warm_hint

MAX_SEED = 2 ** 31 - 1


def default_soft_penalty(problem: AlignmentProblem) -> float:
    """Price per unit of band violation large enough that (for count loads) the least total
    violation is reached before any fitness is traded; scaled by the smallest positive weight."""
    P = penalty_for(problem.n_experts, problem.max_abs_objective)
    w = problem.weight_matrix
    if w is not None and np.any(w > 0):
        P /= float(w[w > 0].min())
    return P


def choose_backend(problem: AlignmentProblem, soft: bool = False) -> str:
    """``flow`` whenever the structure allows it (count loads, no budget; a privacy floor in hard
    mode only), else ``cpsat``."""
    return "flow" if problem.is_flow and not (soft and problem.has_min_group) else "cpsat"


def solve(problem: AlignmentProblem, *, backend: str = "auto", time_limit: Optional[float] = None, seed: int = 0,
          soft: bool = False, soft_penalty: Optional[float] = None,
          options: Optional[Mapping[str, Any]] = None, warm_start: Optional[AlignmentResult] = None) -> AlignmentResult:
    """Solve one round's alignment problem.

    - ``backend``: ``"auto"``, ``"flow"``, ``"cpsat"``, ``"pulp_cbc"``, ``"pulp_highs"`` or ``"greedy"``.
    - ``time_limit``: seconds (> 0) or None; a limit of ``1e7`` s or more (``inf`` too) is too
      large to matter and means no limit (``deadline.NO_LIMIT``).  The call returns within ``time_limit`` + 0.5 s,
      model building included: the backend runs in a worker process (forked, from the fork
      server when threads run, or a fresh interpreter in a daemonic process;
      ``stats["isolation"]``) killed at the limit, and the answer is then the best plan found so
      far (greedy at worst), FEASIBLE at most (:mod:`alignment_solver.deadline`).  A result cut
      by the limit is not deterministic.
    - ``seed``: integer in ``[0, 2**31 - 1]``; the same problem and seed give the same assignment (CP-SAT: with
      one worker and no time limit, see ``result.stats["deterministic"]``).
    - ``soft``: turn the load band into slack priced at ``soft_penalty`` per unit (default:
      violation is minimised first); the result reports ``load_shortfall`` / ``load_excess``.
    - ``options``: backend-specific settings; unknown names are an error listing the valid ones.
    - ``warm_start``: the previous round's result (same experts; clients matched by label): its
      node potentials as prices and its plan as candidates for ``flow``'s working set (other
      backends ignore it).  It changes the time, never the optimum or the status; a result for
      other experts raises InvalidOptionError (:mod:`alignment_solver.search.warm`).

    Infeasible problems and time limits give a status on the result, never an exception.
    Every answer is re-checked against the problem as given before it is returned
    (:func:`verified`): a plan that breaks a hard constraint is never reported as a solution.
    """
    started = time.perf_counter()
    if isinstance(problem, Mapping):
        problem = AlignmentProblem.model_validate(problem)
    if not isinstance(problem, AlignmentProblem):
        raise TypeError(f"problem must be an AlignmentProblem (or a dict of its fields); got {type(problem).__name__}")
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float, np.integer, np.floating)) or not (
                time_limit > 0):
            raise InvalidOptionError(f"time_limit must be None or a number of seconds > 0 (inf or >= "
                                     f"{deadline.NO_LIMIT:g}: no limit); got {describe(time_limit)}")
        time_limit = deadline.effective_limit(time_limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise InvalidOptionError(f"seed must be an integer in [0, {MAX_SEED}] (the solvers' seed range); "
                                 f"got {describe(seed)}")
    if not isinstance(soft, bool):
        raise InvalidOptionError(f"soft must be True or False; got {describe(soft)}")
    if soft_penalty is not None:
        if not soft:
            raise InvalidOptionError("soft_penalty is only used with soft=True; got soft=False")
        if isinstance(soft_penalty, bool) or not isinstance(soft_penalty, (int, float)) or not (
                math.isfinite(soft_penalty) and soft_penalty > 0):
            raise InvalidOptionError(f"soft_penalty must be a finite number > 0; got {describe(soft_penalty)}")
    name = choose_backend(problem, soft) if backend == "auto" else backend
    impl = get_backend(name)
    reason = impl.unsupported_reason(problem, soft)
    if reason:
        raise UnsupportedProblemError(f"backend {name!r} cannot solve this problem: {reason}")
    checked = {}
    for key, value in dict(options or {}).items():
        if key not in impl.options:
            raise InvalidOptionError(f"unknown option {key!r} for backend {name!r}; valid options: "
                                     f"{sorted(impl.options) or 'none'}")
        try:
            checked[key] = impl.check_option(key, value)
        except ValueError as exc:
            raise InvalidOptionError(str(exc)) from None
    hint = warm_hint(warm_start, problem)
    if hint is not None and name == "flow":
        checked["_warm"] = hint
    request = SolveRequest(time_limit=time_limit, seed=int(seed), soft=soft,
                           soft_penalty=float(soft_penalty) if soft_penalty is not None else default_soft_penalty(problem),
                           options=checked)
    blockers = diagnosis.client_reasons(problem)
    if blockers:
        return AlignmentResult(problem, SolveStatus.INFEASIBLE, name, explanation="; ".join(blockers),
                               solve_seconds=time.perf_counter() - started)
    mode = deadline.isolation()
    isolated = impl.isolation == "always" or (time_limit is not None and (
        impl.isolation == "time_limit" or (impl.isolation == "helper" and mode == "helper")))
    if isolated and mode != "in-process":
        result = deadline.run(impl, problem, request, time_limit, started=started)
    else:
        if time_limit is not None:
            request = replace(request, deadline=started + time_limit)
        result = impl.solve(problem, request)
        result.stats.setdefault("isolation", "in-process")
    result = verified(result, soft)
    if impl.floating_point:
        result = confirmed(result, request)
    if backend == "auto" and name == "cpsat" and result.stats.get("exact_rows") is False and (
            not result.has_solution or "rounded_rows_fallback" in result.stats):
        result = _exact_instead(result, started, time_limit, seed, soft, soft_penalty)
    if result.status is SolveStatus.INFEASIBLE and not result.explanation:
        result.explanation = diagnosis.explain(problem, soft=soft) or (
            "the solver proved that no assignment satisfies every constraint (no single client or expert explains it)")
    elif result.status is SolveStatus.NO_SOLUTION_FOUND and not result.explanation:
        result.explanation = (f"no feasible assignment found within the time limit of {time_limit:g} s"
                              if time_limit is not None else "the backend stopped without a feasible assignment")
    return result


#: the exact backend ``auto`` turns to where CP-SAT's integer-rounded model found no plan
ROUNDED_ROWS_FALLBACK = "pulp_highs"


def _exact_instead(result: AlignmentResult, started: float, time_limit: Optional[float], seed: int, soft: bool,
                   soft_penalty: Optional[float]) -> AlignmentResult:
    """``auto`` after CP-SAT's integer-rounded model (a restriction) found no plan: the problem as
    given on ``ROUNDED_ROWS_FALLBACK`` (floating point, no rounding) in the time left, whose
    answer is returned when it has a plan at least as good; ``stats["auto_fallback"]`` says so."""
    from .backends import available_backends

    left = None if time_limit is None else time_limit - (time.perf_counter() - started)
    problem = result.problem
    if ROUNDED_ROWS_FALLBACK not in available_backends() or (left is not None and left < 0.2):
        return result
    if get_backend(ROUNDED_ROWS_FALLBACK).unsupported_reason(problem, soft):
        return result
    other = solve(problem, backend=ROUNDED_ROWS_FALLBACK, time_limit=left, seed=seed, soft=soft,
                  soft_penalty=soft_penalty)
    if not other.has_solution or (result.has_solution and other.objective < result.objective):
        return result
    note = (f"auto: CP-SAT's integer-rounded model (weighted rows without a small common denominator) found no "
            f"plan, so {ROUNDED_ROWS_FALLBACK} solved the problem as given")
    other.stats["auto_fallback"] = note
    other.explanation = note if not other.explanation else f"{note}; {other.explanation}"
    return other


def verified(result: AlignmentResult, soft: bool) -> AlignmentResult:
    """Check a backend's answer against the original data; downgrade what does not hold.

    A plan that breaks a hard constraint (the load band too, unless ``soft``) becomes
    NO_SOLUTION_FOUND naming the first violation; a bound below the plan's own value is raised to
    it; OPTIMAL needs a bound within the gap ``OPTIMAL_GAP`` of the objective.
    """
    if not result.has_solution:
        return result
    broken = result.violations(band=not soft)
    if broken:
        return AlignmentResult(result.problem, SolveStatus.NO_SOLUTION_FOUND, result.backend,
                               solve_seconds=result.solve_seconds, build_seconds=result.build_seconds,
                               explanation=f"the {result.backend} answer broke {len(broken)} constraint(s) of the "
                                           f"problem as given, e.g. {broken[0]}; it was discarded",
                               stats={**result.stats, "discarded": broken[:5]})
    if result.bound is not None and result.bound < result.objective:
        result.bound = result.objective
    if result.status is SolveStatus.OPTIMAL and (result.gap is None or result.gap > OPTIMAL_GAP):
        result.status = SolveStatus.FEASIBLE
    return result


#: a nonzero number below this, or a row or objective whose nonzero numbers span more than
#: ``SPAN``, is beyond what floating-point MIP solvers' tolerances (1e-6 .. 1e-9) separate
TINY, SPAN, OBJECTIVE_SPAN = 1e-6, 1e6, 1e9


def _span(values: np.ndarray) -> tuple[float, float]:
    nz = np.abs(values[np.isfinite(values) & (values != 0)])
    return (float(nz.min()), float(nz.max())) if len(nz) else (1.0, 1.0)


def ill_conditioned(problem: AlignmentProblem) -> Optional[str]:
    """Why a floating-point MIP solver's proof may not hold for this problem, or None.

    Objective coefficients spanning more than 1e9, load weights or usage spanning more than 1e6,
    or any nonzero weight, usage, budget or load bound below 1e-6.
    """
    allowed = problem.allowed_matrix
    lo, hi = _span(problem.objective_matrix[allowed])
    if hi / lo > OBJECTIVE_SPAN:
        return f"objective coefficients span {lo:.3g} .. {hi:.3g}"
    rows = []
    if problem.weight_matrix is not None:
        rows.append(("load weights", problem.weight_matrix[allowed]))
    if problem.usage_matrix is not None:
        rows += [("usage", problem.usage_matrix[allowed]), ("budget", problem.budget)]
    if problem.weight_matrix is not None:
        rows.append(("load bounds", np.concatenate([problem.min_load_array, problem.max_load_array])))
    for name, values in rows:
        lo, hi = _span(np.asarray(values, dtype=float))
        if lo < TINY:
            return f"{name} as small as {lo:.3g}"
        if hi / lo > SPAN and name in ("load weights", "usage"):
            return f"{name} span {lo:.3g} .. {hi:.3g}"
    return None


def confirmed(result: AlignmentResult, request: SolveRequest) -> AlignmentResult:
    """Test a floating-point MIP backend's OPTIMAL or INFEASIBLE against the original data.

    The greedy plan is computed on the problem as given: if it is feasible where the backend said
    INFEASIBLE, or better than its OPTIMAL, the claim is refuted and the greedy plan returned as
    FEASIBLE (``stats["refuted"]``).  Otherwise, on an ill-conditioned problem
    (:func:`ill_conditioned`) the claim is not confirmed: OPTIMAL becomes FEASIBLE without a bound
    and INFEASIBLE becomes NO_SOLUTION_FOUND (``stats["unconfirmed"]``).
    """
    from .backends.greedy import GreedyBackend

    if result.status not in (SolveStatus.OPTIMAL, SolveStatus.INFEASIBLE):
        return result
    problem, claim = result.problem, result.status.value.upper()
    check = GreedyBackend().solve(problem, replace(request, deadline=None, report=None))
    better = check.has_solution and (result.status is SolveStatus.INFEASIBLE or check.objective > result.objective
                                     + OPTIMAL_GAP * max(1.0, abs(result.objective)))
    if better:
        why = (f"{result.backend} said {claim}" + ("" if result.status is SolveStatus.INFEASIBLE
                                                  else f" at {result.objective:.6g}")
               + f", but the greedy plan satisfies every constraint at {check.objective:.6g}")
        return AlignmentResult(problem, SolveStatus.FEASIBLE, result.backend, assignment=check.assignment,
                               solve_seconds=result.solve_seconds, build_seconds=result.build_seconds,
                               soft=result.soft, soft_penalty=result.soft_penalty,
                               explanation=f"{why}; the claim was refuted and the greedy plan is returned",
                               stats={**result.stats, "refuted": why})
    reason = ill_conditioned(problem)
    if reason is None:
        return result
    note = f"{result.backend}'s {claim} is not confirmed: {reason}, beyond floating-point MIP tolerances"
    result.stats["unconfirmed"] = note
    if result.status is SolveStatus.OPTIMAL:
        result.status, result.bound = SolveStatus.FEASIBLE, None
        return result
    return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, result.backend, solve_seconds=result.solve_seconds,
                           build_seconds=result.build_seconds, explanation=note, stats=result.stats)
