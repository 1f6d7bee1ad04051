"""Alignment strategies end to end: accuracy, rounds to target, load CV, bytes, solve time.

Every strategy on the same data, partition, clients and seed; mean +- std over seeds.

    python benchmarks/strategies.py                      # digits (50 x 8, 5 seeds) and synthetic
    python benchmarks/strategies.py --only digits --seeds 5

Synthetic runs (1,000 clients x 32 experts) are long on 2 cores; ``--synthetic-seeds`` and
``--synthetic-rounds`` set their size, and ``aligned_budget`` there gets a per-round CP-SAT
limit (``--budget-limit``), so its plans are not deterministic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown, publish  # noqa: E402

from alignment_solver.progress import Progress  # noqa: E402
from alignment_solver.training.simulate import SimConfig, simulate  # noqa: E402
from alignment_solver.training.strategies import STRATEGIES  # noqa: E402

PARTITIONS = {"IID": dict(partition="iid"), "Dirichlet 0.3": dict(partition="dirichlet", alpha=0.3),
              "Dirichlet 0.8": dict(partition="dirichlet", alpha=0.8),
              "2 classes/client": dict(partition="classes", classes_per_client=2)}


def fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def run_suite(label: str, base: dict, seeds: int, bar: Progress) -> tuple[str, list]:
    rows, raw = [], []
    for pname, pfields in PARTITIONS.items():
        per = {s: [] for s in STRATEGIES}
        for seed in range(seeds):
            bar.step(f"{label} {pname} seed {seed}")
            cfg = SimConfig(**{**base, **pfields, "seed": seed, "strategies": list(STRATEGIES)})
            out = simulate(cfg, write=False, show_progress=False)
            for s, v in out["summary"].items():
                per[s].append(v)
        for s in STRATEGIES:
            vs = per[s]
            reach = [v["rounds_to_target"] for v in vs]
            rows.append([pname, s, fmt([v["final_accuracy"] for v in vs]),
                         fmt([float(r) for r in reach if r is not None], 1) + f" ({sum(r is None for r in reach)} never)",
                         fmt([v["mean_load_cv"] for v in vs]), fmt([v["mb_moved"] for v in vs], 1),
                         fmt([v["solve_ms_per_round"] for v in vs], 1)])
            raw.append((pname, s, vs))
    return markdown(["partition", "strategy", "final accuracy", "rounds to target", "load CV (mean over rounds)",
                     "MB moved", "solve ms / round"], rows), raw


def verdicts(raw: list) -> list[str]:
    """aligned against greedy on the non-IID partitions, per the goal in the issue."""
    out = []
    by = {(p, s): vs for p, s, vs in raw}
    for p in PARTITIONS:
        if p == "IID":
            continue
        g, a = by[(p, "greedy")], by[(p, "aligned")]
        acc = statistics.mean(v["final_accuracy"] for v in a) - statistics.mean(v["final_accuracy"] for v in g)
        cva, cvg = (statistics.mean(v["mean_load_cv"] for v in x) for x in (a, g))
        ra = [v["rounds_to_target"] for v in a]
        rg = [v["rounds_to_target"] for v in g]
        if None in ra or None in rg:
            rounds = f"rounds to target: aligned {ra}, greedy {rg}"
        else:
            cut = 1 - statistics.mean(ra) / statistics.mean(rg)
            word = "fewer" if cut >= 0 else "more"
            rounds = (f"rounds to target: {abs(cut):.0%} {word} than greedy ({statistics.mean(ra):.1f} vs "
                      f"{statistics.mean(rg):.1f}; goal: at least 25 % fewer)")
        out.append(f"- {p}: load CV {cva:.3f} vs greedy {cvg:.3f} (goal <= 0.05 where greedy >= 0.25); "
                   f"final accuracy {100 * acc:+.1f} points (goal >= +2); {rounds}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "synthetic"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--synthetic-seeds", type=int, default=2)
    parser.add_argument("--synthetic-rounds", type=int, default=20)
    parser.add_argument("--budget-limit", type=float, default=2.0)
    parser.add_argument("--out", help="default: benchmarks/results/strategies[_digits|_synthetic].md")
    args = parser.parse_args()
    suffix = f"_{args.only}" if args.only else ""
    args.out = args.out or str(Path(__file__).parent / "results" / f"strategies{suffix}.md")
    suites = []
    if args.only in (None, "digits"):
        suites.append(("digits", dict(dataset="digits", clients=50, experts=8, rounds=30), args.seeds))
    if args.only in (None, "synthetic"):
        suites.append(("synthetic", dict(dataset="synthetic", clients=1000, experts=32, rounds=args.synthetic_rounds,
                                         synthetic_samples=40000, target_accuracy=0.4,
                                         solver_time_limit=args.budget_limit), args.synthetic_seeds))
    bar = Progress(sum(len(PARTITIONS) * n for _, _, n in suites))
    parts = []
    for label, base, seeds in suites:
        table, raw = run_suite(label, base, seeds, bar)
        cfg = SimConfig(**base)
        parts.append(f"## {label}: {cfg.clients} clients x {cfg.experts} experts, {cfg.rounds} rounds, {seeds} seeds, "
                     f"target accuracy {cfg.target_accuracy:g}\n\n{table}\n\naligned vs greedy:\n\n" + "\n".join(verdicts(raw)))
    bar.close()
    text = (f"# Strategy comparison\n\nMachine: {machine()}. Command: `python benchmarks/strategies.py "
            f"{' '.join(sys.argv[1:])}`. Mean +- std over seeds; softmax-regression experts, top-2 routing, "
            f"capacity 1..3, 2 local epochs, lr 0.5, tolerance 0.1.\n\n" + "\n\n".join(parts) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
