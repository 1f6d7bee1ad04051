"""Shared machinery of the PuLP backends: model building, and a child process that can be stopped.

CBC and HiGHS overrun their own time limits (measured: 1.5x to 3.5x of 60 s), so the whole
PuLP build-and-solve runs in a forked child in its own process group; at ``time_limit`` plus a
grace second the group (including CBC's own subprocess) is killed and the status is
NO_SOLUTION_FOUND.  An "Infeasible" reported near the time limit is read as "nothing found",
since CBC has been seen to mislabel feasible models that way when time runs out.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any, Callable, Optional

import numpy as np

from ..formulations.milp import LinearModel
from ..problem import AlignmentProblem
from ..result import AlignmentResult, SolveStatus
from .base import Backend, SolveRequest

GRACE = 1.0


def build_pulp(lm: LinearModel):
    """The PuLP model of ``lm`` and its pair variables."""
    import pulp

    prob = pulp.LpProblem("alignment", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{j}", cat=pulp.LpBinary) for j in range(lm.n)]
    objective = pulp.LpAffineExpression(list(zip(x, lm.obj.tolist())))
    for row in lm.rows():
        expr = pulp.LpAffineExpression(list(zip((x[j] for j in row.pairs), row.coef.tolist())))
        if lm.soft and row.kind == "load":
            short = pulp.LpVariable(f"short{row.index}", lowBound=0)
            over = pulp.LpVariable(f"over{row.index}", lowBound=0)
            expr = expr + short - over
            objective = objective - lm.soft_penalty * (short + over)
        name = f"{row.kind}{row.index}"
        if np.isfinite(row.lo) and np.isfinite(row.hi) and row.lo == row.hi:
            prob += (expr == row.lo), name
            continue
        if np.isfinite(row.lo):
            prob += (expr >= row.lo), name + "_lo"
        if np.isfinite(row.hi):
            prob += (expr <= row.hi), name + "_hi"
    prob += objective
    return prob, x


def _child(conn: Any, lm: LinearModel, make_solvers: Callable[[Optional[float], int], list],
           time_limit: Optional[float], seed: int, dual_bound: Callable[[Any], Optional[float]]) -> None:
    """Build and solve in this (forked) process; each solver setting is tried until one runs."""
    import pulp

    os.setpgrp()
    try:
        t0 = time.perf_counter()
        prob, x = build_pulp(lm)
        build = time.perf_counter() - t0
        remaining = None if time_limit is None else max(time_limit - build, 1.0)
        failures = []
        for solver in make_solvers(remaining, seed):
            try:
                prob.solve(solver)
                break
            except pulp.PulpSolverError as exc:
                failures.append(str(exc).splitlines()[0])
        else:
            raise RuntimeError("every solver setting failed: " + "; ".join(failures))
        values = np.array([v.varValue or 0.0 for v in x])
        conn.send({"status": prob.status, "sol_status": prob.sol_status, "values": values, "build": build,
                   "solve": time.perf_counter() - t0 - build, "bound": dual_bound(prob), "retries": len(failures)})
    except Exception as exc:  # reported to the parent as NO_SOLUTION_FOUND with the reason
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


class PulpBackend(Backend):
    """Base of the PuLP backends; subclasses give the solver factory."""

    requires: tuple[str, ...] = ("pulp",)

    def make_solvers(self, time_limit: Optional[float], seed: int) -> list:
        """Solver settings to try in order (a later one only if an earlier one fails to run)."""
        raise NotImplementedError

    @staticmethod
    def dual_bound(prob: Any) -> Optional[float]:
        return None

    def solve(self, problem: AlignmentProblem, request: SolveRequest) -> AlignmentResult:
        lm = LinearModel.from_problem(problem, request.soft_penalty if request.soft else None)
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        t0 = time.perf_counter()
        proc = ctx.Process(target=_child, args=(child, lm, self.make_solvers, request.time_limit, request.seed,
                                                self.dual_bound), daemon=True)
        proc.start()
        child.close()
        deadline = None if request.time_limit is None else request.time_limit + GRACE
        try:
            reply = parent.recv() if parent.poll(deadline) else None
        except EOFError:
            reply = {"error": "the solver process ended without an answer"}
        elapsed = time.perf_counter() - t0
        if reply is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join()
        stats: dict[str, Any] = {"deterministic": True}
        if reply is not None and "error" in reply:
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=elapsed,
                                   explanation=f"{self.name} failed: {reply['error']}", stats=stats)
        if reply is None:
            why = (f"stopped at the time limit of {request.time_limit:g} s (the solver did not stop by itself)"
                   if request.time_limit is not None else f"the solver process ended without an answer "
                                                          f"(exit code {proc.exitcode})")
            return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, solve_seconds=elapsed,
                                   explanation=why, stats=stats)
        stats.update(pulp_status=reply["status"], pulp_sol_status=reply["sol_status"], retries=reply["retries"])
        near_limit = request.time_limit is not None and reply["build"] + reply["solve"] >= 0.9 * request.time_limit
        sol = reply["sol_status"]
        if sol == 1:
            status = SolveStatus.OPTIMAL
        elif sol == 2:
            status = SolveStatus.FEASIBLE
        elif reply["status"] == -1 and not near_limit:
            status = SolveStatus.INFEASIBLE
        else:
            status = SolveStatus.NO_SOLUTION_FOUND
        if not status.has_solution:
            return AlignmentResult(problem, status, self.name, solve_seconds=reply["solve"],
                                   build_seconds=reply["build"], stats=stats)
        x = lm.assignment(reply["values"])
        result = AlignmentResult(problem, status, self.name, assignment=x, solve_seconds=reply["solve"],
                                 build_seconds=reply["build"], soft=request.soft,
                                 soft_penalty=request.soft_penalty if request.soft else None, stats=stats)
        if status is SolveStatus.OPTIMAL:
            result.bound = result.objective
        elif reply["bound"] is not None:
            result.bound = max(float(reply["bound"]), result.objective)
        return result
