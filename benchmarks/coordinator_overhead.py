"""Time of AlignmentCoordinator.plan_round + observe_round per round.

Clients report capacity 1..3 (max_experts) and accuracy drawn from a fixed affinity matrix;
reports arrive as plain dicts (as from JSON), so their validation is part of the time.  After
``--warmup`` rounds, ``--rounds`` rounds are timed; the table gives medians (and the solve time
inside plan_round).  Targets: <= 50 ms at 1,000 x 64 and <= 500 ms at 10,000 x 64.

    python benchmarks/coordinator_overhead.py [--rounds 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, machine, markdown, publish  # noqa: E402

from alignment_solver.coordinator import AlignmentCoordinator  # noqa: E402

TARGETS = {1000: 0.050, 10000: 0.500}


def reports(plan, acc):
    return [{"client_id": pc.client_id, "train_seconds": 1.0, "bytes_down": 1000 * len(pc.experts),
             "experts": [{"expert": e, "samples": 20, "mean_loss": float(1 - acc[pc.client_id, e]),
                          "accuracy": float(acc[pc.client_id, e])} for e in pc.experts]}
            for pc in plan.clients]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "coordinator_overhead.md"))
    args = parser.parse_args()
    rows = []
    sizes = list(TARGETS)
    bar = Progress(len(sizes) * (args.rounds + args.warmup))
    for clients in sizes:
        rng = np.random.default_rng(0)
        acc = rng.random((clients, args.experts))
        caps = rng.integers(1, 4, size=clients)
        status = [{"client_id": c, "max_experts": int(caps[c])} for c in range(clients)]
        coord = AlignmentCoordinator(args.experts)
        plan_t, obs_t, solve_t, cvs = [], [], [], []
        for r in range(args.warmup + args.rounds):
            bar.step(f"{clients} x {args.experts} round {r}")
            t0 = time.perf_counter()
            plan = coord.plan_round(r, status)
            t1 = time.perf_counter()
            reps = reports(plan, acc)
            t2 = time.perf_counter()
            coord.observe_round(r, reps)
            t3 = time.perf_counter()
            if r >= args.warmup:
                plan_t.append(t1 - t0)
                obs_t.append(t3 - t2)
                solve_t.append(plan.solve_seconds)
                cvs.append(plan.planned_cv)
        total = [p + o for p, o in zip(plan_t, obs_t)]
        med = statistics.median(total)
        target = TARGETS[clients]
        rows.append([f"{clients:,} x {args.experts}", round(1000 * statistics.median(plan_t), 1),
                     round(1000 * statistics.median(solve_t), 1), round(1000 * statistics.median(obs_t), 1),
                     round(1000 * med, 1), round(1000 * max(total), 1), round(1000 * target),
                     "met" if med <= target else f"missed ({med / target:.2f}x)", round(max(cvs), 4)])
    bar.close()
    table = markdown(["clients x experts", "plan ms", "of which solve ms", "observe ms", "plan+observe ms (median)",
                      "worst ms", "target ms", "target", "max planned load CV"], rows)
    text = (f"# Coordinator overhead\n\nMachine: {machine()}. Command: `python benchmarks/coordinator_overhead.py "
            f"--rounds {args.rounds} --warmup {args.warmup}`. Median over {args.rounds} rounds after "
            f"{args.warmup} warm-up rounds; flow backend, soft band, tolerance 0.1.\n\n{table}\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
