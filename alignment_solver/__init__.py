"""alignment-solver: which clients train which experts, each round of federated MoE training.

    from alignment_solver import AlignmentProblem, solve
    result = solve(AlignmentProblem.balanced(fitness, capacity=2, tolerance=0.1))
    result.status, result.assignment, result.experts_of(0)

    from alignment_solver import AlignmentCoordinator
    coord = AlignmentCoordinator(num_experts=8)
    plan = coord.plan_round(0, ["a", "b", "c"]); ...; coord.observe_round(0, reports)
"""

from .backends import available_backends
from .coordinator import AlignmentCoordinator, CoordinatorConfig
from .errors import (AlignmentError, BackendUnavailableError, InvalidOptionError, NoSolutionError, ReplyError,
                     ReportError, RoundError, StateError, UnknownBackendError, UnsupportedProblemError)
from .problem import AlignmentProblem
from .result import AlignmentResult, SolveStatus
from .rounds import ClientReport, ClientStatus, ExpertReport, PlannedClient, RoundPlan, RoundSummary
from .solve import solve

__version__ = "0.1.0"

__all__ = [
    "AlignmentProblem", "AlignmentResult", "SolveStatus", "solve", "available_backends",
    "AlignmentCoordinator", "CoordinatorConfig",
    "ClientStatus", "ClientReport", "ExpertReport", "PlannedClient", "RoundPlan", "RoundSummary",
    "AlignmentError", "BackendUnavailableError", "InvalidOptionError", "NoSolutionError", "ReplyError",
    "ReportError", "RoundError", "StateError", "UnknownBackendError", "UnsupportedProblemError",
]
