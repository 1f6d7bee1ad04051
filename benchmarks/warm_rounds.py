"""Cold against warm-started solves over consecutive coordinator rounds (issue 38).

Drift model: the coordinator's own.  ``C`` clients with a fixed true accuracy per pair
(``0.7 U(0,1) + 0.3 popularity[e]``, popularity ~ Beta(2, 5)) report capacity 1..3; every round
``AlignmentCoordinator.plan_round`` builds the round's problem (fitness: the scorer's moving
average of the reported accuracies plus its exploration bonus and fresh 1e-9 tie-break noise;
the load band around the fair share shifted by the monitor's deficits; last round's holdings
with the switch penalty; soft band, the default configuration), and every planned client
reports each of its experts with accuracy ``truth + N(0, 0.05)`` (clipped to [0, 1]), so
fitness moves by one round's observations and the band by a deficit.

Each round's problem is solved twice through ``plan_round(assign=...)``, cold
(``solve(problem)``) and warm (``solve(problem, warm_start=<last round's warm result>)``), in
alternating order (cold first on even rounds), timed around ``solve`` (model building inside
``solve`` included, the problem's construction not); both must be OPTIMAL with the same
objective (each below the other's proven bound: the flow's cost rounding, about 1e-9
relative), and the warm plan is the one observed.  Round 0 has no previous result and is left
out of the table.

    python benchmarks/warm_rounds.py [--rounds 20] [--sizes 10000x64 100000x128] [--seed 0]
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

from alignment_solver import SolveStatus, solve  # noqa: E402
from alignment_solver.coordinator import AlignmentCoordinator  # noqa: E402

TARGETS = {(10000, 64): 0.050, (100000, 128): 0.500}     # warm round targets of issue 38 (seconds)


def reports(plan, truth, rng):
    out = []
    for pc in plan.clients:
        obs = np.clip(truth[pc.client_id, pc.experts] + 0.05 * rng.standard_normal(len(pc.experts)), 0.0, 1.0)
        out.append({"client_id": pc.client_id, "train_seconds": 1.0,
                    "experts": [{"expert": int(e), "samples": 20, "mean_loss": float(1 - a), "accuracy": float(a)}
                                for e, a in zip(pc.experts, obs)]})
    return out


def run(clients: int, experts: int, rounds: int, seed: int, bar: Progress) -> dict:
    rng = np.random.default_rng(seed)
    truth = 0.7 * rng.random((clients, experts)) + 0.3 * rng.beta(2.0, 5.0, experts)[None, :]
    caps = rng.integers(1, 4, size=clients)
    status = [{"client_id": c, "max_experts": int(caps[c])} for c in range(clients)]
    coord = AlignmentCoordinator(experts)
    noise = np.random.default_rng([seed, 1])
    rows, state = [], {"prev": None}

    def assign(problem):
        r = len(rows)
        order = ("cold", "warm") if r % 2 == 0 else ("warm", "cold")
        out, secs = {}, {}
        for kind in order:
            t = time.perf_counter()
            out[kind] = solve(problem, soft=True, seed=coord.config.seed + r,
                              warm_start=state["prev"] if kind == "warm" else None)
            secs[kind] = time.perf_counter() - t
        cold, warm = out["cold"], out["warm"]
        # both proven: each objective lies below the other's bound (the flow's rounding, ~1e-9 relative)
        same = warm.objective <= cold.bound and cold.objective <= warm.bound
        rows.append({"cold": secs["cold"], "warm": secs["warm"], "same": same,
                     "optimal": cold.status is SolveStatus.OPTIMAL and warm.status is SolveStatus.OPTIMAL,
                     "warm_rounds": warm.stats.get("rounds"), "cold_rounds": cold.stats.get("rounds"),
                     "warm_active": warm.stats.get("active_clients")})
        state["prev"] = warm
        return np.asarray(warm.assignment)

    for r in range(rounds + 1):
        bar.step(f"{clients:,} x {experts} round {r}")
        plan = coord.plan_round(r, status, assign=assign)
        coord.observe_round(r, reports(plan, truth, noise))
    return {"rows": rows[1:]}


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", nargs="+", default=["10000x64", "100000x128"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line about the machine's load, printed under the table")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "warm_rounds.md"))
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    bar = Progress(len(sizes) * (args.rounds + 1))
    table, detail = [], []
    for clients, experts in sizes:
        rows = run(clients, experts, args.rounds, args.seed, bar)["rows"]
        cold = [r["cold"] for r in rows]
        warm = [r["warm"] for r in rows]
        ratio = [c / w for c, w in zip(cold, warm)]
        target = TARGETS.get((clients, experts))
        med = statistics.median(warm)
        verdict = "-" if target is None else ("met" if med <= target else f"missed ({med / target:.1f}x)")
        table.append([f"{clients:,} x {experts}", len(rows), round(statistics.median(cold), 3), spread(cold),
                      round(med, 3), spread(warm), round(statistics.median(ratio), 2),
                      f"{min(ratio):.2f}-{max(ratio):.2f}", "-" if target is None else target, verdict,
                      "yes" if all(r["optimal"] for r in rows) else "NO",
                      "yes" if all(r["same"] for r in rows) else "NO"])
        detail.append(f"- {clients:,} x {experts}: working-set rounds cold {sorted(set(r['cold_rounds'] for r in rows))}, "
                      f"warm {sorted(set(r['warm_rounds'] for r in rows))}; warm active clients in the last round "
                      f"median {statistics.median(r['warm_active'] for r in rows):.0f}")
    bar.close()
    head = ["clients x experts", "rounds", "cold s (median)", "cold min-max", "warm s (median)", "warm min-max",
            "cold/warm (median)", "cold/warm min-max", "warm target s", "target", "all OPTIMAL", "objectives agree"]
    command = f"python benchmarks/warm_rounds.py --rounds {args.rounds} --sizes {' '.join(args.sizes)} --seed {args.seed}"
    text = (f"# Warm-started rounds\n\nMachine: {machine()}. {args.note}\nCommand: `{command}`.\n\n"
            f"Drift: the coordinator's own (see the script's docstring): fitness moves by one round's observed "
            f"accuracies (truth + N(0, 0.05)), the band by the monitor's deficits; soft band, default "
            f"configuration.  Per round, cold and warm solves of the same problem, alternating which goes first; "
            f"times are `solve()` wall clock (model building inside it included, the problem's construction not). "
            f"Round 0 (no previous result) left out.\n\n{markdown(head, table)}\n\n" + "\n".join(detail) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
