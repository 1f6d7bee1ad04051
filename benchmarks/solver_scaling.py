"""Solver scaling on the benchmark family (see alignment_solver.instances.random_problem).

Every backend on 1,000 x 16, 10,000 x 64 and 100,000 x 128 (count loads, exact flow territory),
each in a fresh process so peak memory is its own; plus the budgeted 10,000 x 64 instance.
Columns: build and solve seconds, objective, relative gap to the best objective of that
instance, whether optimality was proven, peak resident memory, and speed relative to PuLP+CBC.

    python benchmarks/solver_scaling.py [--quick] [--out benchmarks/results/solver_scaling.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, isolated, machine, markdown, publish  # noqa: E402

LIMIT = 60.0            # time limit handed to backends that take one
BUDGET_LIMIT = 8.0      # time limit of the warm-started CP-SAT run on the budgeted instance
HARD_STOP = 300.0       # wall clock after which a run is killed (PuLP+CBC on 10k x 64 needs ~2 min)


def lp_bound(clients: int, experts: int, budget: bool) -> dict:
    """The LP relaxation's optimum (scipy's HiGHS), the yardstick of the budgeted runs."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import vstack

    from alignment_solver.formulations.milp import LinearModel
    from alignment_solver.instances import random_problem

    problem = random_problem(clients, experts, seed=0, budget=budget)
    started = time.perf_counter()
    c, A, lo, hi, _, _ = LinearModel.from_problem(problem).matrices()
    fh, fl = np.isfinite(hi), np.isfinite(lo)
    lp = linprog(-c, A_ub=vstack([A[fh], -A[fl]]), b_ub=np.r_[hi[fh], -lo[fl]], bounds=(0, 1), method="highs")
    return {"bound": -lp.fun if lp.status == 0 else None, "seconds": time.perf_counter() - started}


def run_case(clients: int, experts: int, budget: bool, backend: str, time_limit: float | None) -> dict:
    from alignment_solver import solve
    from alignment_solver.instances import random_problem

    problem = random_problem(clients, experts, seed=0, budget=budget)
    options = {}
    if backend.startswith("cpsat:"):
        backend, options = "cpsat", {"warm_start": backend.split(":")[1]}
    started = time.perf_counter()
    result = solve(problem, backend=backend, time_limit=time_limit, options=options)
    wall = time.perf_counter() - started
    out = {"status": result.status.value, "wall": wall, "build": result.build_seconds,
           "solve": result.solve_seconds, "objective": result.objective, "bound": result.bound,
           "proven": result.status.value == "optimal", "violations": len(result.violations()) if result.has_solution else None}
    if backend == "flow":
        out["rounds"] = result.stats.get("rounds")
    return out


def plan(quick: bool) -> list[tuple[int, int, bool, str, float | None]]:
    sizes = [(1000, 16), (10000, 64), (100000, 128)]
    cases = []
    for clients, experts in sizes:
        big = clients >= 100000
        for backend in ("flow", "greedy", "cpsat", "pulp_highs", "pulp_cbc"):
            if big and backend not in ("flow", "greedy"):
                continue  # 12.8M binaries: model building alone exceeds the limit
            if quick and clients >= 10000 and backend.startswith("pulp"):
                continue
            cases.append((clients, experts, False, backend, None if backend in ("flow", "greedy") else LIMIT))
    cases.append((10000, 64, True, "cpsat", BUDGET_LIMIT))          # auto: Lagrangian warm start + CP-SAT
    cases.append((10000, 64, True, "cpsat", None))                  # warm start only (deterministic)
    if not quick:
        for backend in ("cpsat:none", "pulp_highs", "pulp_cbc"):
            cases.append((10000, 64, True, backend, LIMIT))
    cases.append((10000, 64, True, "greedy", None))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the PuLP runs at 10,000 clients and budgets")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "solver_scaling.md"))
    args = parser.parse_args()
    cases = plan(args.quick)
    bar = Progress(len(cases))
    results = {}
    for case in cases:
        bar.step(f"{case[0]} x {case[1]}{' budget' if case[2] else ''} {case[3]}")
        results[case] = isolated(run_case, *case, timeout=HARD_STOP)
    bar.close()
    lp = isolated(lp_bound, 10000, 64, True, timeout=HARD_STOP)
    rows = []
    for key in dict.fromkeys((c, e, b) for c, e, b, _, _ in cases):
        group = {k: v for k, v in results.items() if k[:3] == key}
        objs = [v["objective"] for v in group.values() if v.get("objective") is not None]
        best = max(objs) if objs else None
        cbc = next((v for k, v in group.items() if k[3] == "pulp_cbc" and "error" not in v), None)
        for (c, e, b, backend, tl), v in group.items():
            if "error" in v:
                rows.append([f"{c:,} x {e}{' + budget' if b else ''}", backend, tl, v["error"], None, None, None,
                             None, None, f"{v.get('peak_mb', 0):.0f}", None])
                continue
            if b and lp.get("bound"):
                best = lp["bound"]                      # budgeted rows: gap to the LP bound
            gap = None if best is None or v["objective"] is None else (best - v["objective"]) / max(1.0, abs(best))
            speed = None if cbc is None or backend == "pulp_cbc" else cbc["wall"] / v["wall"]
            rows.append([f"{c:,} x {e}{' + budget' if b else ''}", backend, tl, v["status"], round(v["build"], 3),
                         round(v["solve"], 3), v["objective"], gap, "yes" if v["proven"] else "no",
                         f"{v['peak_mb']:.0f}", f"{speed:.3g}x" if speed else None])
    table = markdown(["instance", "backend", "limit s", "status", "build s", "solve s", "objective",
                      "gap to best", "proven", "peak MB", "vs PuLP+CBC"], rows)
    text = (f"# Solver scaling\n\nMachine: {machine()}. Command: `python benchmarks/solver_scaling.py"
            f"{' --quick' if args.quick else ''}`.\nEach run in a fresh process (peak MB is the larger of that process's and its children's peak "
            f"resident memory, interpreter and libraries included). CP-SAT runs with 1 worker; with a time limit "
            f"its answer is not deterministic. `gap to best` compares with the best objective found for the "
            f"instance in this run, and for the budgeted instance with its LP bound "
            f"({lp.get('bound')}, scipy HiGHS LP in {lp.get('seconds', 0):.0f} s); `vs PuLP+CBC` is CBC's "
            f"wall time divided by this backend's. `cpsat:none` is CP-SAT without the warm start.\n\n{table}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
