"""``greedy``: a fast heuristic baseline for any problem; never proves optimality.

Three vectorised phases, each adding one (client, expert) pair per client per pass while it
fits every upper limit (capacity, per-group capacity, expert max load, budget): first the experts
below their minimum load take their best-fitting free clients, then clients below their minimum
(or below a group's minimum: an expert of that group) take their best expert, then every client
adds its best remaining expert while that raises the objective.  The answer is FEASIBLE when
it satisfies every hard constraint, else NO_SOLUTION_FOUND (in soft mode band misses are
allowed and priced).
"""

from __future__ import annotations

import time

from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from ..search.greedy import complete
from .base import Backend, SolveRequest


class GreedyBackend(Backend):
    name = "greedy"
    isolation = "never"          # it is the fallback itself, and stops its passes at the deadline

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        t0 = time.perf_counter()
        x = complete(problem, deadline=request.deadline)
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
