"""The privacy floor in the training loop: accuracy and expert updates held back by dropouts.

The ``make run`` loop (digits, 8 experts) with 20 % of planned clients dropping out each round, on
paired seeds 1000-1009 (common random numbers: every variant of a seed sees the same data,
devices, availability and dropouts):

- ``aligned``: no floor;
- ``aligned, floor m, over-provisioned``: plans ``ceil(m / completion rate)`` trainers per trained
  expert, aggregation keeps experts (and the gate) fewer than ``m`` finished updates reached;
- ``aligned, floor m, not over-provisioned``: plans ``m``, same aggregation;
- ``greedy, floor m``: greedy plans (no floor), same aggregation.

Columns: final accuracy, the difference to ``aligned`` without a floor (mean and 95 % paired t
interval, points), expert updates held back per run, MB moved.

    python benchmarks/floor_training.py [--floor 3] [--seeds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, markdown, publish  # noqa: E402

from alignment_solver.training.compare import interval  # noqa: E402
from alignment_solver.training.config import SimConfig  # noqa: E402
from alignment_solver.training.loop import run_strategy  # noqa: E402
from alignment_solver.training.world import World  # noqa: E402

DROPOUT = 0.2


def variants(m: int) -> dict[str, tuple[str, dict]]:
    return {"aligned": ("aligned", {}),
            f"aligned, floor {m}, over-provisioned": ("aligned", {"min_group": m, "over_provision": True}),
            f"aligned, floor {m}, not over-provisioned": ("aligned", {"min_group": m, "over_provision": False}),
            f"greedy, floor {m}": ("greedy", {"min_group": m})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "floor_training.md"))
    args = parser.parse_args()
    seeds = list(range(1000, 1000 + args.seeds))
    runs = variants(args.floor)
    bar = Progress(len(seeds) * len(runs))
    acc: dict[str, list[float]] = {name: [] for name in runs}
    held: dict[str, list[int]] = {name: [] for name in runs}
    mb: dict[str, list[float]] = {name: [] for name in runs}
    for seed in seeds:
        for name, (strategy, extra) in runs.items():
            bar.step(f"seed {seed}: {name}")
            cfg = SimConfig(strategies=[strategy], seed=seed, dropout=DROPOUT, **extra)
            rows = run_strategy(cfg, World(cfg), strategy)
            acc[name].append(rows[-1]["accuracy"])
            held[name].append(sum(r["held_back"] for r in rows))
            mb[name].append(sum(r["bytes_down"] + r["bytes_up"] for r in rows) / 1e6)
    bar.close()
    base = acc["aligned"]
    table = []
    for name in runs:
        diff = "-" if name == "aligned" else "{:+.1f} [{:+.1f}, {:+.1f}]".format(
            *(100 * v for v in interval([a - b for a, b in zip(acc[name], base)])))
        table.append([name, f"{statistics.mean(acc[name]):.3f}", diff, f"{statistics.mean(held[name]):.1f}",
                      f"{min(held[name])}-{max(held[name])}", f"{statistics.mean(mb[name]):.2f}"])
    text = (f"# Privacy floor in the training loop\n\nCommand: `python benchmarks/floor_training.py"
            f"{f' --floor {args.floor}' if args.floor != 3 else ''}{f' --seeds {args.seeds}' if args.seeds != 10 else ''}`. "
            f"The `make run` loop with dropout {DROPOUT:g}, seeds {seeds[0]}-{seeds[-1]} paired.\n\n"
            + markdown(["variant", "final accuracy", "vs aligned without a floor, points", "expert updates held back per run",
                        "range", "MB moved"], table) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
