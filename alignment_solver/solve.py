"""The one entry point: ``solve(problem, ...)`` -> :class:`AlignmentResult`."""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import numpy as np

from . import diagnosis
from .backends import get_backend
from .backends.base import SolveRequest
from .errors import InvalidOptionError, UnsupportedProblemError, describe
from .formulations.flow import penalty_for
from .problem import AlignmentProblem
from .result import AlignmentResult, SolveStatus


def default_soft_penalty(problem: AlignmentProblem) -> float:
    """Price per unit of band violation large enough that (for count loads) the least total
    violation is reached before any fitness is traded; scaled by the smallest positive weight."""
    P = penalty_for(problem.n_experts, problem.max_abs_objective)
    w = problem.weight_matrix
    if w is not None and np.any(w > 0):
        P /= float(w[w > 0].min())
    return P


def choose_backend(problem: AlignmentProblem) -> str:
    """``flow`` whenever the structure allows it (count loads, no budget), else ``cpsat``."""
    return "flow" if problem.is_flow else "cpsat"


def solve(problem: AlignmentProblem, *, backend: str = "auto", time_limit: Optional[float] = None, seed: int = 0,
          soft: bool = False, soft_penalty: Optional[float] = None,
          options: Optional[Mapping[str, Any]] = None) -> AlignmentResult:
    """Solve one round's alignment problem.

    - ``backend``: ``"auto"``, ``"flow"``, ``"cpsat"``, ``"pulp_cbc"``, ``"pulp_highs"`` or ``"greedy"``.
    - ``time_limit``: seconds (> 0) or None; every backend stops within about a second of it.
    - ``seed``: integer >= 0; the same problem and seed give the same assignment (CP-SAT: with
      one worker and no time limit, see ``result.stats["deterministic"]``).
    - ``soft``: turn the load band into slack priced at ``soft_penalty`` per unit (default:
      violation is minimised first); the result reports ``load_shortfall`` / ``load_excess``.
    - ``options``: backend-specific settings; unknown names are an error listing the valid ones.

    Infeasible problems and time limits give a status on the result, never an exception.
    """
    if isinstance(problem, Mapping):
        problem = AlignmentProblem.model_validate(problem)
    if not isinstance(problem, AlignmentProblem):
        raise TypeError(f"problem must be an AlignmentProblem (or a dict of its fields); got {type(problem).__name__}")
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not (
                math.isfinite(time_limit) and time_limit > 0):
            raise InvalidOptionError(f"time_limit must be None or a finite number of seconds > 0; got {describe(time_limit)}")
        time_limit = float(time_limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidOptionError(f"seed must be an integer >= 0; got {describe(seed)}")
    if not isinstance(soft, bool):
        raise InvalidOptionError(f"soft must be True or False; got {describe(soft)}")
    if soft_penalty is not None:
        if not soft:
            raise InvalidOptionError("soft_penalty is only used with soft=True; got soft=False")
        if isinstance(soft_penalty, bool) or not isinstance(soft_penalty, (int, float)) or not (
                math.isfinite(soft_penalty) and soft_penalty > 0):
            raise InvalidOptionError(f"soft_penalty must be a finite number > 0; got {describe(soft_penalty)}")
    name = choose_backend(problem) if backend == "auto" else backend
    impl = get_backend(name)
    reason = impl.unsupported_reason(problem)
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
    request = SolveRequest(time_limit=time_limit, seed=int(seed), soft=soft,
                           soft_penalty=float(soft_penalty) if soft_penalty is not None else default_soft_penalty(problem),
                           options=checked)
    started = time.perf_counter()
    blockers = diagnosis.client_reasons(problem)
    if blockers:
        return AlignmentResult(problem, SolveStatus.INFEASIBLE, name, explanation="; ".join(blockers),
                               solve_seconds=time.perf_counter() - started)
    result = impl.solve(problem, request)
    if result.status is SolveStatus.INFEASIBLE and not result.explanation:
        result.explanation = diagnosis.explain(problem, soft=soft) or (
            "the solver proved that no assignment satisfies every constraint (no single client or expert explains it)")
    elif result.status is SolveStatus.NO_SOLUTION_FOUND and not result.explanation:
        result.explanation = (f"no feasible assignment found within the time limit of {time_limit:g} s"
                              if time_limit is not None else "the backend stopped without a feasible assignment")
    return result
