"""What a solve is asked to do, as every backend and the search receive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    from .problem import AlignmentProblem
    from .result import AlignmentResult


@dataclass(frozen=True)
class SolveRequest:
    """Options common to every backend, already validated by :func:`~alignment_solver.solve`."""

    time_limit: Optional[float]
    seed: int
    soft: bool
    soft_penalty: float              # price per unit of band violation (also used in hard mode)
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific, validated
    deadline: Optional[float] = None  # time.perf_counter() by which the backend should have returned
    #: called with each improving feasible assignment found before the end, and a valid upper
    #: bound (or None); the caller keeps the last one in case the backend is stopped.
    report: Optional[Callable[[np.ndarray, Optional[float]], None]] = None


#: a backend's ``solve`` as the search calls it for sub-problems
Solver = Callable[["AlignmentProblem", SolveRequest], "AlignmentResult"]

__all__ = ["SolveRequest", "Solver"]
