"""alignment-solver: which clients train which experts, each round of federated MoE training.

    from alignment_solver import AlignmentProblem, solve
    result = solve(AlignmentProblem.balanced(fitness, capacity=2, tolerance=0.1))
    result.status, result.assignment, result.experts_of(0)
"""

from .backends import available_backends
from .errors import (AlignmentError, BackendUnavailableError, InvalidOptionError, NoSolutionError,
                     UnknownBackendError, UnsupportedProblemError)
from .problem import AlignmentProblem
from .result import AlignmentResult, SolveStatus
from .solve import solve

__version__ = "0.1.0"

__all__ = [
    "AlignmentProblem", "AlignmentResult", "SolveStatus", "solve", "available_backends",
    "AlignmentError", "BackendUnavailableError", "InvalidOptionError", "NoSolutionError",
    "UnknownBackendError", "UnsupportedProblemError",
]
