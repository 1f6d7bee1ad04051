"""The same rounds through the formulations peers use: a cvxpy boolean program solved by SCIP (as
FedAMoLE writes its expert dispatch) and a plain PuLP model solved by CBC, against ``solve``.

Each instance is ``random_problem(C, E, seed=0)``: maximise fitness over a 0/1 client x expert
matrix with each client's row between ``min_experts`` and ``capacity`` and each expert's column
inside its load band.  The peers are written here the way a user of those libraries would write
them (one boolean variable per pair, row and column sums); the time is build + solve, in a fresh
process each, after a warm-up call on a 20 x 4 round (imports are not timed).  ``same optimum`` compares each objective with the flow's proven optimum
(relative 1e-6: the MIP solvers stop within their own tolerances).

cvxpy and PySCIPOpt are not dependencies of the package, and cvxpy needs a newer highspy than
the package's ``pulp`` extra pins, so they go into an environment of their own:

    python -m venv /tmp/peers && /tmp/peers/bin/pip install -e . pulp -r benchmarks/requirements-peers.txt
    /tmp/peers/bin/python benchmarks/peers.py [--sizes 100x16 1000x64] [--timeout 600]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, isolated, machine, markdown, publish  # noqa: E402

METHODS = ["solve (flow)", "cvxpy + SCIP", "PuLP + CBC"]


def one(method: str, clients: int, experts: int, warm: bool = True) -> dict:
    import numpy as np

    from alignment_solver import solve
    from alignment_solver.instances import random_problem

    if warm:                                  # imports and first-call set-up on a small round, not timed
        one(method, 20, 4, warm=False)
    problem = random_problem(clients, experts, seed=0)
    G = problem.objective_matrix
    lo, k = problem.min_experts_array, problem.capacity_array
    L, U = problem.min_load_array, np.minimum(problem.max_load_array, clients)
    started = time.perf_counter()
    if method == "solve (flow)":
        result = solve(problem, backend="flow")
        return {"seconds": time.perf_counter() - started, "objective": result.objective, "status": result.status.value}
    if method == "cvxpy + SCIP":
        import cvxpy as cp

        x = cp.Variable((clients, experts), boolean=True)
        model = cp.Problem(cp.Maximize(cp.sum(cp.multiply(G, x))),
                           [cp.sum(x, axis=1) >= lo, cp.sum(x, axis=1) <= k,
                            cp.sum(x, axis=0) >= L, cp.sum(x, axis=0) <= U])
        model.solve(solver=cp.SCIP)
        objective = float((G * np.rint(x.value)).sum()) if x.value is not None else None
        return {"seconds": time.perf_counter() - started, "objective": objective, "status": str(model.status)}
    import pulp

    model = pulp.LpProblem("alignment", pulp.LpMaximize)
    x = [[pulp.LpVariable(f"x_{c}_{e}", cat="Binary") for e in range(experts)] for c in range(clients)]
    model += pulp.lpSum(float(G[c, e]) * x[c][e] for c in range(clients) for e in range(experts))
    for c in range(clients):
        row = pulp.lpSum(x[c])
        model += row >= int(lo[c])
        model += row <= int(k[c])
    for e in range(experts):
        col = pulp.lpSum(x[c][e] for c in range(clients))
        model += col >= float(L[e])
        model += col <= float(U[e])
    model.solve(pulp.PULP_CBC_CMD(msg=False))
    value = np.array([[v.value() or 0.0 for v in row] for row in x])
    return {"seconds": time.perf_counter() - started, "objective": float((G * np.rint(value)).sum()),
            "status": pulp.LpStatus[model.status]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["100x16", "1000x64"])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "peers.md"))
    args = parser.parse_args()
    try:
        import cvxpy  # noqa: F401
        import pyscipopt  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"{exc.name} is missing: pip install -r benchmarks/requirements-peers.txt") from None
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    bar = Progress(len(sizes) * len(METHODS))
    rows = []
    for C, E in sizes:
        runs = {}
        for m in METHODS:
            bar.step(f"{C:,} x {E}: {m}")
            runs[m] = isolated(one, m, C, E, timeout=args.timeout)
        best = runs["solve (flow)"].get("objective")
        base = runs["solve (flow)"].get("seconds")
        for m in METHODS:
            r = runs[m]
            if "error" in r:
                rows.append([f"{C:,} x {E}", m, r["error"], "-", "-", "-", "-"])
                continue
            same = (r["objective"] is not None and best is not None
                    and abs(r["objective"] - best) <= 1e-6 * max(1.0, abs(best)))
            rows.append([f"{C:,} x {E}", m, r["status"], f"{r['seconds']:.3g} s",
                         f"{r['seconds'] / base:.0f}x" if m != METHODS[0] else "1x",
                         "-" if r["objective"] is None else f"{r['objective']:.6f}", "yes" if same else "NO"])
    bar.close()
    table = markdown(["clients x experts", "method", "status", "build + solve", "x solve's time", "objective",
                      "same optimum"], rows)
    text = (f"# Peers' formulations on the same rounds\n\nMachine: {machine()}. Command: `python benchmarks/peers.py"
            f"{' --sizes ' + ' '.join(args.sizes) if args.sizes != ['100x16', '1000x64'] else ''}` (cvxpy and "
            "PySCIPOpt from `benchmarks/requirements-peers.txt`). One fresh process per cell.\n\n"
            f"{table}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
