"""Shared machinery of the PuLP backends: model building and solving.

CBC and HiGHS overrun their own time limits (measured: 1.5x to 3.5x of 60 s), and CBC runs as a
subprocess writing temporary files, so these backends always run in the killable worker of
:mod:`alignment_solver.deadline` (``isolation = "always"``).  The objective and each row are
divided by a power of two (exact in floating point) when their magnitude leaves ``2**+-20``, so
numbers of any supported magnitude reach the solvers in a range their tolerances are made for.
An "Infeasible" reported near the time limit is read as "nothing found", since CBC has been seen
to mislabel feasible models that way when time runs out.  The solvers are asked for a relative
gap of ``GAP`` (1e-9); the bound of an OPTIMAL answer starts from the solver's own optimum.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from .base import Backend, SolveRequest

GAP = 1e-9           # relative MIP gap asked of the solvers (their defaults go up to 1e-4)

def _pow2(value: float) -> float:
    """Divisor bringing ``value`` into the range solvers are tuned for: 1 inside ``2**+-20`` (CBC
    was seen to mislabel c1030_5-min as optimal at 489, not 488, with the objective divided by 32),
    else the power of two at or above it, so dividing is exact in floating point."""
    if value == 0 or 2.0 ** -20 <= value <= 2.0 ** 20:
        return 1.0
    return 2.0 ** math.ceil(math.log2(value))


def build_pulp(lm: LinearModel):
    """The PuLP model of ``lm`` and its pair variables."""
    import pulp

    prob = pulp.LpProblem("alignment", pulp.LpMaximize)
    x = [prob.add_variable(f"x{j}", cat=pulp.LpBinary) for j in range(lm.n)]
    objective = pulp.LpAffineExpression(list(zip(x, lm.obj.tolist())))
    for row in lm.rows():
        f = _pow2(float(np.abs(row.coef).max(initial=0.0)))       # exact rescaling of the row
        coef, lo, hi = row.coef / f, row.lo / f, row.hi / f
        expr = pulp.LpAffineExpression(list(zip((x[j] for j in row.pairs), coef.tolist())))
        if lm.soft and row.kind == "load":
            short = prob.add_variable(f"short{row.index}", lowBound=0)
            over = prob.add_variable(f"over{row.index}", lowBound=0)
            expr = expr + short - over
            objective = objective - (lm.soft_penalty * f) * (short + over)
        name = f"{row.kind}{row.index}"
        if np.isfinite(lo) and np.isfinite(hi) and lo == hi:
            prob += (expr == lo), name
            continue
        if np.isfinite(lo):
            prob += (expr >= lo), name + "_lo"
        if np.isfinite(hi):
            prob += (expr <= hi), name + "_hi"
    for e, idx, m in lm.floors():                 # no trainer, or at least m
        on = prob.add_variable(f"floor{e}", cat=pulp.LpBinary)
        trainers = pulp.lpSum(x[j] for j in idx)
        prob += (trainers - m * on >= 0), f"floor{e}_lo"
        prob += (trainers - len(idx) * on <= 0), f"floor{e}_hi"
    prob += objective
    return prob, x


class PulpBackend(Backend):
    """Base of the PuLP backends; subclasses give the solver factory."""

    requires: tuple[str, ...] = ("pulp",)
    isolation = "always"
    floating_point = True

    def make_solvers(self, time_limit: Optional[float], seed: int) -> list:
        """Solver settings to try in order (a later one only if an earlier one fails to run)."""
        raise NotImplementedError

    @staticmethod
    def dual_bound(prob: Any) -> Optional[float]:
        return None

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        import pulp

        lm = LinearModel.from_problem(problem, request.soft_penalty if request.soft else None)
        scale = _pow2(float(np.abs(lm.obj).max(initial=0.0)))
        lm.obj = lm.obj / scale
        if lm.soft:
            lm.soft_penalty = lm.soft_penalty / scale
        t0 = time.perf_counter()
        prob, x = build_pulp(lm)
        build = time.perf_counter() - t0
        remaining = None if request.deadline is None else max(request.deadline - time.perf_counter(), 0.1)
        failures = []
        for solver in self.make_solvers(remaining, request.seed):
            try:
                prob.solve(solver)
                break
            except pulp.PulpSolverError as exc:
                failures.append(str(exc).splitlines()[0])
        else:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, build_seconds=build,
                                   solve_seconds=time.perf_counter() - t0 - build,
                                   explanation=f"{self.name} failed: every solver setting failed: "
                                               + "; ".join(failures), stats={"deterministic": True})
        seconds = time.perf_counter() - t0 - build
        stats: dict[str, Any] = {"deterministic": True, "pulp_status": prob.status, "pulp_sol_status": prob.sol_status,
                                 "retries": len(failures)}
        near_limit = remaining is not None and build + seconds >= 0.9 * remaining
        if prob.sol_status == 1:
            status = SolveStatus.OPTIMAL
        elif prob.sol_status == 2:
            status = SolveStatus.FEASIBLE
        elif prob.status == -1 and not near_limit:
            status = SolveStatus.INFEASIBLE
        else:
            status = SolveStatus.NO_SOLUTION_FOUND
        if not status.has_solution:
            return AlignmentResult(problem, status, self.name, solve_seconds=seconds, build_seconds=build, stats=stats)
        values = np.array([v.varValue or 0.0 for v in x])
        result = AlignmentResult(problem, status, self.name, assignment=lm.assignment(values), solve_seconds=seconds,
                                 build_seconds=build, soft=request.soft,
                                 soft_penalty=request.soft_penalty if request.soft else None, stats=stats)
        bound = self.dual_bound(prob)
        if status is SolveStatus.OPTIMAL:
            # The solver's optimum is for its own (integrality-tolerant) values: start the bound there.
            claimed = max(float(pulp.value(prob.objective) or 0.0) * scale, result.objective)
            result.bound = claimed + GAP * max(1.0, abs(claimed))
        elif bound is not None:
            result.bound = max(float(bound) * scale, result.objective)
        return result
