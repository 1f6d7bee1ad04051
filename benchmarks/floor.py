"""The privacy floor: the flow's exact search against greedy-then-repair.

On ``skewed_problem(C, E, seed=0, min_group=m)`` (popularity-skewed fitness, no lower load bound,
so unpopular experts end up with a handful of trainers) for m in {5, 20, 60}:

- ``flow``: ``solve(problem, backend="flow", time_limit=...)``, branch and bound over which
  experts train with one exact min-cost flow per node; its bound is proven (the relaxation drops
  the floor of the undecided experts);
- ``greedy + repair``: the greedy plan, then the expert with the fewest trainers below its floor
  dropped and its clients re-placed, until no floor is broken (``backend="greedy"``);
- ``no floor``: the flow optimum without the floor (what the floor costs), and how many experts
  break the floor there.

Gaps are to the flow's proven bound.  Each run in a fresh process.

    python benchmarks/floor.py [--sizes 1000x32 10000x64 100000x128] [--limit 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, isolated, machine, markdown, publish  # noqa: E402

FLOORS = [5, 20, 60]


def one(method: str, clients: int, experts: int, m: int, limit: float) -> dict:
    from alignment_solver import solve
    from alignment_solver.instances import skewed_problem

    problem = skewed_problem(clients, experts, seed=0, min_group=0 if method == "no floor" else m)
    started = time.perf_counter()
    backend = "greedy" if method == "greedy + repair" else "flow"
    result = solve(problem, backend=backend, time_limit=limit if method == "flow" else None)
    out = {"seconds": time.perf_counter() - started, "status": result.status.value,
           "objective": result.objective if result.has_solution else None, "bound": result.bound,
           "nodes": result.stats.get("nodes")}
    if method == "no floor" and result.has_solution:
        out["broken"] = len(problem.model_copy(update={"expert_min_group": m}).floor_breaks(result.assignment))
    return out


def gap(run: dict, bound: float | None) -> str:
    """Relative gap of a run's objective to the proven bound, in percent."""
    if run.get("objective") is None or bound is None:
        return "-"
    return f"{100 * (bound - run['objective']) / max(1.0, abs(bound)):.3f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1000x32", "10000x64", "100000x128"])
    parser.add_argument("--limit", type=float, default=300.0, help="time limit of the flow search, seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "floor.md"))
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    methods = ["no floor", "flow", "greedy + repair"]
    bar = Progress(len(sizes) * len(FLOORS) * len(methods))
    rows = []
    for C, E in sizes:
        for m in FLOORS:
            runs = {}
            for method in methods:
                bar.step(f"{C:,} x {E}, m = {m}: {method}")
                runs[method] = isolated(one, method, C, E, m, args.limit, timeout=args.limit + 600)
            flow, greedy, free = runs["flow"], runs["greedy + repair"], runs["no floor"]
            bound = flow.get("bound")

            rows.append([f"{C:,} x {E}", m, free.get("broken"), f"{free.get('objective', 0):.2f}",
                         flow.get("status", flow.get("error")), f"{flow.get('seconds', 0):.2f}", flow.get("nodes"),
                         "-" if flow.get("objective") is None else f"{flow['objective']:.2f}",
                         "-" if bound is None else f"{bound:.2f}", gap(flow, bound),
                         greedy.get("status", greedy.get("error")), f"{greedy.get('seconds', 0):.2f}",
                         "-" if greedy.get("objective") is None else f"{greedy['objective']:.2f}", gap(greedy, bound)])
    bar.close()
    table = markdown(["clients x experts", "m", "experts below m without the floor", "objective without the floor",
                      "flow status", "flow s", "nodes", "flow objective", "proven bound", "flow gap",
                      "greedy + repair", "greedy s", "greedy objective", "greedy gap"], rows)
    command = "python benchmarks/floor.py" + (f" --sizes {' '.join(args.sizes)}"
                                              if args.sizes != ["1000x32", "10000x64", "100000x128"] else "") + (
        f" --limit {args.limit:g}" if args.limit != 300.0 else "")
    text = (f"# Privacy floor: exact search against greedy-then-repair\n\nMachine: {machine()}. Command: `{command}`. "
            f"One fresh process per cell; the flow search under a {args.limit:g} s time limit (FEASIBLE: stopped "
            "there, with the bound of its open nodes).\n\n" + table + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
