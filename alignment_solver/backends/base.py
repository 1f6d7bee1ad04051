"""What every backend implements, and the request it receives."""

from __future__ import annotations

from typing import Any, Optional

from ..problem import AlignmentProblem
from ..request import SolveRequest
from ..result import AlignmentResult


class Backend:
    """A solver backend.

    Contract: ``solve`` returns an :class:`AlignmentResult` for *this* problem and never raises
    for infeasibility or time limits (they are statuses).  In hard mode a result with a solution
    satisfies every constraint; in soft mode it may miss the load band, by the least amount it
    found.  ``unsupported_reason`` says in words why the backend cannot express a problem, or
    returns None.  ``requires`` lists the modules probed (without importing) for availability.
    ``isolation``: when :func:`~alignment_solver.solve` runs the backend in a killable worker
    (:mod:`alignment_solver.deadline`): ``"time_limit"`` (when a limit is set), ``"always"``,
    ``"helper"`` (when a limit is set and the worker would come from the helper process: the
    caller's threads would take the backend's share of the GIL) or ``"never"``;
    ``child_processes`` says whether it starts solver processes of its own.
    """

    name: str = ""
    requires: tuple[str, ...] = ()
    isolation: str = "time_limit"
    child_processes: bool = False
    #: proofs rest on floating-point tolerances (CBC, HiGHS): :func:`~alignment_solver.solve.confirmed`
    #: re-tests its OPTIMAL and INFEASIBLE on the original data
    floating_point: bool = False
    #: backend options: name -> (default, description); values are checked by ``check_option``.
    options: dict[str, tuple[Any, str]] = {}

    def unsupported_reason(self, problem: AlignmentProblem, soft: bool = False) -> Optional[str]:
        """Why this backend cannot solve ``problem`` (in soft mode when ``soft``), or None."""
        return None

    def check_option(self, name: str, value: Any) -> Any:
        """Return the validated value, or raise ValueError describing what is allowed."""
        return value

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        raise NotImplementedError
