"""Alignment strategies on one federated MoE loop: accuracy, time and bytes to target, specialisation.

Every strategy (random, greedy, round_robin, aligned, aligned_budget, and the bounds oracle and
single-expert fedavg; greedy_sticky and dense are compared in ``regimes.py``) runs on the same
loop (``LOOP``: per-client routers, held-out fitness with one probe per round, demand-sized
plans, simulated device clock with a 5 s deadline) with the same data, clients and seed.  Factors::

    task          shift-1 (shifted digits, 4 domains, one per client), shift-2 (6 unequal domains,
                  1-2 per client), synth-1 (synthetic, 4 unequal domains, one per client),
                  digits (plain digits, Dirichlet 0.3: the no-harm check)
    capacity      1, 1-2, 1-3, 4 (experts a client can hold, of 8)
    participation full, or 30 % of clients per round with 20 % of them dropping out
    devices       none (identical) or strong (speed and bandwidth lognormal(0, 1))

``--design full`` runs all 64 cells; ``--design half`` (default) the half fraction in which
(capacity index + participation + devices) is even, so every level of every factor and every
pair of factors appears, for each task.  Seeds 0..n-1 are reported; the loop settings were chosen
on seeds 100-102 only.  Target of a cell and seed: 90 % of the oracle's final global accuracy
(digits: of fedavg's).  Paired differences aligned - greedy with 95 % t intervals.

    python benchmarks/strategies.py                       # half fraction, 5 seeds (about 20 min)
    python benchmarks/strategies.py --design full --seeds 5
    python benchmarks/strategies.py --replot              # page and plots again from strategies.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown, publish  # noqa: E402

from alignment_solver.progress import Progress  # noqa: E402
from alignment_solver.training.compare import interval  # noqa: E402
from alignment_solver.training.metrics import reach  # noqa: E402
from alignment_solver.training.simulate import SimConfig, simulate  # noqa: E402
from alignment_solver.training.strategies import STRATEGIES  # noqa: E402

LOOP = dict(clients=50, experts=8, rounds=20, router="local", fitness="heldout", probes=1, route_weight=0.5,
            gate_average="updated", expert_cost=0.3, tolerance=0.3, deadline=5.0, solver_time_limit=1.0)
TASKS = {
    "shift-1": dict(dataset="shifted_digits", shifted_domains=4, partition="domains", domains_per_client=1),
    "shift-2": dict(dataset="shifted_digits", shifted_domains=6, domain_sizes="unequal", partition="domains",
                    domains_per_client=2),
    "synth-1": dict(dataset="synthetic", synthetic_samples=4000, synthetic_domains=4, domain_sizes="unequal",
                    partition="domains", domains_per_client=1),
    "digits": dict(dataset="digits", partition="dirichlet", alpha=0.3),
}
CAPACITY = {"1": (1, 1), "1-2": (1, 2), "1-3": (1, 3), "4": (4, 4)}
PARTICIPATION = {"full": (1.0, 0.0), "30%+drop": (0.3, 0.2)}
DEVICES = ("none", "strong")
WHY = """## Why aligned does not clear the targets (likely reasons, not separately tested)

- greedy runs on the same improved loop: the same held-out fitness, the same probe per round and
  the same expert cost. Once fitness measures the right thing, each client's top expert is
  already the one trained on its domain, so greedy also specialises (its NMI is within 0.03 of
  aligned's on every domain task). The load band's remaining job is to stop many clients piling
  onto one expert, and with 8 experts for 4-6 domains that rarely costs greedy much.
- The band also splits a domain's clients over several experts (aligned trains all 8 experts,
  the oracle 4-6), so each of aligned's experts sees fewer samples of its domain, which would
  explain why its personalised accuracy does not gain.
- Time: every strategy gets the same capacities from the same profiler and deadline, so rounds
  last about as long for greedy as for aligned; simulated time to target differs mostly through
  rounds to target, and on average those differ by 0.1-2.5 rounds per task.
- Plain digits has no concept shift: one expert trained by every client (fedavg) sees all the
  data, while any mixture of 8 splits it. That is the cost of the MoE itself (random and greedy
  pay it too), not of alignment.
"""


def cells(design: str) -> list[tuple[str, str, str, str]]:
    out = []
    for task, (ci, cap), (pi, part), (di, dev) in itertools.product(
            TASKS, enumerate(CAPACITY), enumerate(PARTICIPATION), enumerate(DEVICES)):
        if design == "full" or (ci + pi + di) % 2 == 0:
            out.append((task, cap, part, dev))
    return out


def config(cell: tuple[str, str, str, str], seed: int) -> SimConfig:
    task, cap, part, dev = cell
    strategies = [s for s in STRATEGIES if (s != "oracle" or task != "digits") and s not in ("greedy_sticky", "dense")]
    return SimConfig(**LOOP, **TASKS[task], min_capacity=CAPACITY[cap][0], max_capacity=CAPACITY[cap][1],
                     participation=PARTICIPATION[part][0], dropout=PARTICIPATION[part][1], devices=dev,
                     seed=seed, strategies=strategies)


def run(job: tuple[tuple[str, str, str, str], int]) -> dict[str, Any]:
    """One cell and seed: every strategy's metrics, measured against the cell's target."""
    cell, seed = job
    cfg = config(cell, seed)
    out = simulate(cfg, write=False, show_progress=False)
    rows = out["rows"]
    ref = "oracle" if "oracle" in cfg.strategies else "fedavg"
    final_ref = [r for r in rows if r["strategy"] == ref][-1]["accuracy"]
    target = 0.9 * final_ref
    res: dict[str, Any] = {"cell": list(cell), "seed": seed, "target": target, "strategies": {}}
    for s in cfg.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        hit = reach(mine, target)
        res["strategies"][s] = {
            "global": mine[-1]["accuracy"], "personal": mine[-1]["personalised_accuracy"],
            "rounds": hit["round"] + 1 if hit else None, "seconds": hit["sim_seconds"] if hit else None,
            "mb_to_target": hit["mb_to_target"] if hit else None,
            "mb": sum(r["bytes_down"] + r["bytes_up"] for r in mine) / 1e6, "sim_seconds": mine[-1]["sim_seconds"],
            "nmi": mine[-1]["nmi"], "untrained": mine[-1]["untrained"],
            "load_cv": float(np.mean([r["load_cv"] for r in mine])),
            "fallback_rounds": int(sum(r["fallback"] for r in mine)), "planned_rounds": len(mine),
            "curve": [[r["sim_seconds"], r["accuracy"]] for r in mine]}
    return res


def mean(values: list[Optional[float]], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return f"{statistics.mean(vals):.{digits}f}" if vals else "-"


def pairs(results: list[dict], metric: str, a: str = "aligned", b: str = "greedy", where=lambda cell: True):
    return [r["strategies"][a][metric] - r["strategies"][b][metric] for r in results
            if where(r["cell"]) and a in r["strategies"] and b in r["strategies"]]


def strategy_table(results: list[dict], task: str) -> str:
    mine = [r for r in results if r["cell"][0] == task]
    rows = []
    for s in STRATEGIES:
        got = [r["strategies"][s] for r in mine if s in r["strategies"]]
        if not got:
            continue
        never = sum(g["rounds"] is None for g in got)
        rows.append([s, mean([g["global"] for g in got]), mean([g["personal"] for g in got]),
                     f"{mean([g['rounds'] for g in got], 1)} ({never} never)", mean([g["seconds"] for g in got], 0),
                     mean([g["mb_to_target"] for g in got], 2), mean([g["mb"] for g in got], 1),
                     mean([g["nmi"] for g in got], 2), mean([g["untrained"] for g in got], 1),
                     mean([g["load_cv"] for g in got], 2)])
    return markdown(["strategy", "global acc", "personal acc", "rounds to target", "sim s to target",
                     "MB to target", "MB moved", "NMI", "untrained experts", "load CV"], rows)


def time_ratio(results: list[dict], where) -> tuple[str, list[float]]:
    """aligned / greedy simulated seconds to target where both reach it; how many did not."""
    ratios, miss = [], {"aligned": 0, "greedy": 0}
    for r in results:
        if not where(r["cell"]):
            continue
        sa, sg = r["strategies"]["aligned"]["seconds"], r["strategies"]["greedy"]["seconds"]
        for k, v in (("aligned", sa), ("greedy", sg)):
            miss[k] += v is None
        if sa is not None and sg is not None:
            ratios.append(sa / sg)
    return f"never reached: aligned {miss['aligned']}, greedy {miss['greedy']}", ratios


def verdicts(results: list[dict]) -> list[str]:
    domain = lambda c: c[0] != "digits" and c[1] in ("1", "1-2")  # noqa: E731
    out = []
    for metric, word in (("global", "global"), ("personal", "personalised")):
        d = pairs(results, metric, where=domain)
        m, lo, hi = interval(d)
        ok = m >= 0.02 and lo > 0
        out.append(f"- Domain tasks, capacity <= 2 of 8: aligned - greedy, {word} accuracy "
                   f"{100 * m:+.2f} points, 95 % CI [{100 * lo:+.2f}, {100 * hi:+.2f}] over {len(d)} cell-seed pairs "
                   f"(target: >= +2 with the interval above 0): **{'met' if ok else 'missed'}**.")
    strong = lambda c: c[0] != "digits" and c[3] == "strong"  # noqa: E731
    note, ratios = time_ratio(results, strong)
    if ratios:
        logs = [math.log(x) for x in ratios]
        m, lo, hi = interval(logs)
        cut = 1 - math.exp(m)
        out.append(f"- Strong device heterogeneity, domain tasks: aligned's simulated time to target is "
                   f"{math.exp(m):.2f}x greedy's (geometric mean over {len(ratios)} pairs where both reach it, "
                   f"95 % CI [{math.exp(lo):.2f}, {math.exp(hi):.2f}]; {note}); target: at least 30 % less "
                   f"(ratio <= 0.70): **{'met' if cut >= 0.3 else 'missed'}**.")
    digits = [r for r in results if r["cell"][0] == "digits"]
    if digits:
        worst = []
        for s in STRATEGIES:
            if s == "aligned" or s == "oracle":
                continue
            d = pairs(digits, "global", a=s, b="aligned")
            if d:
                worst.append((statistics.mean(d), s, interval(d)))
        m, s, (_, lo, hi) = max(worst)
        out.append(f"- Plain digits (no-harm): the best strategy against aligned is {s}, "
                   f"{100 * m:+.2f} points global accuracy (95 % CI [{100 * lo:+.2f}, {100 * hi:+.2f}]); "
                   f"target: no strategy more than +0.5: **{'met' if m <= 0.005 else 'missed'}**.")
    for s in ("aligned_budget", "aligned"):
        got = [r["strategies"][s] for r in results if s in r["strategies"] and "fallback_rounds" in r["strategies"][s]]
        if got:
            n, total = sum(g["fallback_rounds"] for g in got), sum(g["planned_rounds"] for g in got)
            out.append(f"- {s}: rounds planned by the greedy fallback because the solver returned no plan: "
                       f"{n} of {total}; target: none: **{'met' if n == 0 else 'missed'}**.")
    return out


def cell_table(results: list[dict]) -> str:
    rows = []
    keys = sorted({tuple(r["cell"]) for r in results}, key=lambda c: (list(TASKS).index(c[0]),
                                                                      list(CAPACITY).index(c[1]), c[2], c[3]))
    for cell in keys:
        where = lambda c, cell=cell: tuple(c) == cell  # noqa: E731
        g = interval(pairs(results, "global", where=where))
        p = interval(pairs(results, "personal", where=where))
        mine = [r for r in results if tuple(r["cell"]) == cell]
        rows.append([*cell, mean([r["strategies"]["aligned"]["global"] for r in mine]),
                     mean([r["strategies"]["greedy"]["global"] for r in mine]),
                     f"{100 * g[0]:+.1f} [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]",
                     f"{100 * p[0]:+.1f} [{100 * p[1]:+.1f}, {100 * p[2]:+.1f}]",
                     mean([r["strategies"]["aligned"]["seconds"] for r in mine], 0),
                     mean([r["strategies"]["greedy"]["seconds"] for r in mine], 0)])
    return markdown(["task", "capacity", "participation", "devices", "aligned acc", "greedy acc",
                     "global diff, points [95 % CI]", "personal diff [95 % CI]",
                     "aligned sim s to target (seeds that reach it)", "greedy sim s to target (same)"], rows)


def plots(results: list[dict], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colours = dict(zip(STRATEGIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.8), sharey=False)
    for ax, task in zip(axes, TASKS):
        mine = [r for r in results if r["cell"][0] == task and r["cell"][3] == "strong"]
        for s in ("random", "greedy", "aligned", "oracle", "fedavg"):
            curves = [np.array(r["strategies"][s]["curve"]) for r in mine if s in r["strategies"]]
            if not curves:
                continue
            t = np.mean([c[:, 0] for c in curves], axis=0)
            a = np.mean([c[:, 1] for c in curves], axis=0)
            ax.plot(t, a, label=s, color=colours[s])
        ax.set_title(f"{task} (strong devices)")
        ax.set_xlabel("simulated seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("global accuracy (mean over cells and seeds)")
    axes[0].legend()
    fig.tight_layout()
    paths.append(folder / "strategies_time.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    labels, means, los, his = [], [], [], []
    for task in TASKS:
        for cap in CAPACITY:
            d = pairs(results, "global", where=lambda c, t=task, k=cap: c[0] == t and c[1] == k)
            if len(d) > 1:
                m, lo, hi = interval(d)
                labels.append(f"{task}\ncap {cap}")
                means.append(100 * m)
                los.append(100 * (m - lo))
                his.append(100 * (hi - m))
    ax.errorbar(range(len(means)), means, yerr=[los, his], fmt="o", capsize=3)
    ax.axhline(0, color="grey")
    ax.axhline(2, color="grey", linestyle=":")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("aligned - greedy, global accuracy points (95 % CI)")
    fig.tight_layout()
    paths.append(folder / "strategies_diff.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", choices=["half", "full"], default="half")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "strategies.md"))
    parser.add_argument("--replot", action="store_true",
                        help="rebuild the page and plots from the raw JSON next to --out instead of running")
    args = parser.parse_args()
    raw = Path(args.out).with_suffix(".json")
    if args.replot:
        results = json.loads(raw.read_text())
    else:
        jobs = [(cell, seed) for cell in cells(args.design) for seed in range(args.seeds)]
        bar = Progress(len(jobs))
        results = []
        with ProcessPoolExecutor(args.workers) as pool:
            for res in pool.map(run, jobs):
                bar.step(f"{'/'.join(res['cell'])} seed {res['seed']}")
                results.append(res)
        bar.close()
        raw.write_text(json.dumps(results))
    folder = Path(args.out).parent
    images = plots(results, folder)
    n_cells = len(cells(args.design))
    text = (f"# Strategy comparison on the federated MoE loop\n\nMachine: {machine()}. Command: "
            f"`python benchmarks/strategies.py --design {args.design} --seeds {args.seeds}` "
            f"(page and plots rebuilt from its JSON with `--replot`).\n\n"
            f"Design: {args.design} ({n_cells} cells of 64: task x capacity x participation x devices; "
            f"the half fraction keeps every level and every pair of levels of every factor), "
            f"{args.seeds} paired seeds (0..{args.seeds - 1}) per cell, every strategy on the same data, clients, "
            f"devices and seed. Loop: {json.dumps(LOOP)}. Loop settings were chosen on seeds 100-102, "
            f"never on the reported seeds. aligned_budget plans with CP-SAT under a 1 s limit per round, so its "
            f"plans are not deterministic; every other strategy's are. Target of a cell and seed: 90 % of the "
            f"oracle's final global accuracy (digits: of fedavg's). Raw numbers: `{raw.name}`.\n\n"
            f"## Targets\n\n" + "\n".join(verdicts(results)) + "\n\n" + WHY + "\n"
            + "\n\n".join(f"## {task}: mean over its cells and seeds\n\n{strategy_table(results, task)}"
                          for task in TASKS)
            + "\n\n## aligned - greedy per cell (mean over seeds, 95 % t interval)\n\n" + cell_table(results)
            + "\n\nPlots: " + ", ".join(f"`{Path(p).name}`" for p in images) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
