"""``greedy``: a fast heuristic baseline for any problem; never proves optimality.

The plan is :func:`alignment_solver.search.greedy.complete` from nothing (with a privacy floor,
then :func:`alignment_solver.search.floor.repair`: greedy-then-repair): FEASIBLE when it
satisfies every hard constraint, else NO_SOLUTION_FOUND (in soft mode band misses are allowed
and priced).
"""

from __future__ import annotations

import time

from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from ..search.floor import repair
from ..search.greedy import complete
from .base import Backend, SolveRequest


class GreedyBackend(Backend):
    name = "greedy"
    isolation = "helper"         # it is the fallback itself and stops its passes at the deadline: isolated
                                 # only where threads in the caller would slow it down

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        t0 = time.perf_counter()
        x = complete(problem, deadline=request.deadline)
        if problem.has_min_group:
            x = repair(problem, x, complete, deadline=request.deadline)
        seconds = time.perf_counter() - t0
        result = AlignmentResult(problem, SolveStatus.FEASIBLE, self.name, assignment=x, solve_seconds=seconds,
                                 soft=request.soft, soft_penalty=request.soft_penalty if request.soft else None,
                                 stats={"deterministic": True})
        broken = result.violations(band=not request.soft)
        if broken:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=seconds,
                                   explanation=f"the greedy heuristic broke {len(broken)} constraints, e.g. {broken[0]}",
                                   stats={"deterministic": True})
        return result
