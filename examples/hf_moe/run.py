"""Run the tiny Mixtral example three ways and compare: ``flwr run`` with AlignedStrategy, ``flwr run``
with Flower's FedAvg on the full model (same nodes, data, seed and local training), and the NVFlare
simulator with AlignedController.  Writes ``results.md`` and ``accuracy.png`` to ``--out``.

    python examples/hf_moe/run.py --rounds 6 --nodes 4 --out runs/hf_moe

Flower: the script writes a Flower configuration (``$FLWR_HOME/config.toml``, in ``--out``) with one
connection, ``hf-moe``, to a local simulation SuperLink, starts ``flower-superlink`` itself (so that
it can stop exactly that process) and submits the app twice with ``flwr run ... --federation-config
"num-supernodes=N"``.
Everything it starts is stopped by its process id (and that process's own group) when it
returns, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # examples/: the helpers shared by the examples' run.py
from flwr_local import Tail, flower_env, follow, run_strategies, start, stop_all, stop_on_sigterm  # noqa: E402


def run_flower(args, out: Path, env: dict, others: tuple[Tail, ...] = ()) -> dict[str, dict]:
    def config(strategy: str, result: Path) -> dict:
        print(f"flwr run {strategy}: {args.nodes} nodes, {args.rounds} rounds", flush=True)
        return {"strategy": strategy, "num-server-rounds": args.rounds, "num-nodes": args.nodes,
                "local-epochs": args.local_epochs, "lr": args.lr, "sequences": args.sequences,
                "fraction-evaluate": args.fraction_evaluate, "seed": args.seed, "out": str(result.resolve())}

    return run_strategies(HERE, "hf-moe", args.strategies.split(","), config, out, env, args.nodes, args.timeout,
                          done=lambda data: "final_model" in data, others=others)


def start_nvflare(args, out: Path, env: dict) -> tuple[subprocess.Popen, Tail, float]:
    workspace, sites_log = out / "nvflare", out / "nvflare-sites"
    for f in sites_log.glob("*.jsonl"):
        f.unlink()
    print(f"NVFlare simulator: {args.nodes} sites, {args.rounds} rounds", flush=True)
    log = out / "nvflare.log"
    proc = start([sys.executable, str(HERE / "nvflare_job.py"), "--simulate", str(workspace), "--sites",
                  str(args.nodes), "--rounds", str(args.rounds), "--epochs", str(args.local_epochs), "--lr",
                  str(args.lr), "--sequences", str(args.sequences), "--log", str(sites_log)], env, log)
    return proc, Tail(log, ": central evaluation", "[nvflare] ", start="round "), time.time()


def finish_nvflare(args, out: Path, proc: subprocess.Popen, tail: Tail, started: float) -> dict:
    code = follow(proc, tail, args.timeout)
    history_file = out / "nvflare" / "server" / "simulate_job" / "aligned_history.json"
    if code != 0 or not history_file.exists():
        text = "\n".join(tail.log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"the NVFlare simulation failed (exit {code}, no {history_file}):\n{text}")
    tasks = [json.loads(line) for f in sorted((out / "nvflare-sites").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    data = {"history": json.loads(history_file.read_text()), "site_tasks": tasks, "wall_seconds": time.time() - started}
    print(f"NVFlare simulator: done in {data['wall_seconds']:.0f} s", flush=True)
    return data


# ---- the report -------------------------------------------------------------------------------
def flower_round(data: dict, r: int) -> dict:
    """Round ``r`` of a Flower run: central and nodes'-view accuracy, training and evaluation bytes (measured)."""
    h = data["history"].get(str(r), {})
    m = h.get("measured", {})
    return {"accuracy": h.get("central_accuracy", float("nan")), "view": h.get("node_view_accuracy"),
            "federated": m.get("federated", {}).get("accuracy"),
            "train": m.get("train_down", 0) + m.get("train_up", 0), "eval": m.get("eval_down", 0) + m.get("eval_up", 0)}


def nvflare_round(data: dict, r: int) -> dict:
    """NVFlare round ``r`` (0-based; reported as ``r + 1``): central accuracy and the sites' own byte counts."""
    h = data["history"].get(str(r), {})
    tasks = [t for t in data["site_tasks"] if t["round"] == r]
    return {"accuracy": h.get("central", {}).get("accuracy", float("nan")), "view": None,
            "federated": h.get("evaluate", {}).get("accuracy"),
            "train": sum(t["bytes_down"] + t["bytes_up"] for t in tasks if t["task"] == "train"),
            "eval": sum(t["bytes_down"] + t["bytes_up"] for t in tasks if t["task"] == "evaluate")}


def curves(runs: dict, nvflare: dict | None, rounds: int) -> dict[str, list[dict]]:
    out = {s: [flower_round(d, r) for r in range(0, rounds + 1)] for s, d in runs.items()}
    if nvflare is not None:
        initial = nvflare["history"].get("-1", {}).get("central", {}).get("accuracy", float("nan"))
        out["nvflare aligned"] = [{"accuracy": initial, "view": None, "federated": None, "train": 0, "eval": 0}] + \
                                 [nvflare_round(nvflare, r) for r in range(rounds)]
    return out


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(args, runs: dict, nvflare: dict | None) -> str:
    c = curves(runs, nvflare, args.rounds)
    names = list(c)
    viewed = [s for s in names if any(p["view"] is not None for p in c[s])]
    lines = ["| round | " + " | ".join(f"{s} accuracy" for s in names) + " | "
             + " | ".join(f"{s} nodes' view" for s in viewed) + " | "
             + " | ".join(f"{s} train MB (cum.)" for s in names) + " | "
             + " | ".join(f"{s} eval MB (cum.)" for s in names) + " |",
             "|---|" + "---|" * (3 * len(names) + len(viewed))]
    for r in range(0, args.rounds + 1):
        accs = [_f(c[s][r]["accuracy"]) for s in names]
        views = [_f(c[s][r]["view"]) for s in viewed]
        train = [f"{sum(x['train'] for x in c[s][:r + 1]) / 1e6:.2f}" for s in names]
        ev = [f"{sum(x['eval'] for x in c[s][:r + 1]) / 1e6:.2f}" for s in names]
        lines.append(f"| {r} | " + " | ".join(accs + views + train + ev) + " |")
    totals = {s: (sum(x["train"] for x in c[s]) / 1e6, sum(x["eval"] for x in c[s]) / 1e6) for s in names}
    summary = [f"- **{s}**: global model {c[s][-1]['accuracy']:.3f}"
               + (f", nodes' view {c[s][-1]['view']:.3f}" if c[s][-1]["view"] is not None else "")
               + (f", federated evaluation (each node's own language, full model) {c[s][-1]['federated']:.3f}"
                  if c[s][-1]["federated"] is not None else "")
               + f"; {totals[s][0]:.2f} MB moved for training and {totals[s][1]:.2f} MB for evaluation"
               for s in names]
    a, f = totals.get("aligned"), totals.get("fedavg")
    if a and f and f[0] > 0:
        summary.append(f"- aligned moved {a[0] / f[0]:.0%} of FedAvg's training bytes ({a[0]:.2f} MB against "
                       f"{f[0]:.2f} MB) and {a[1]:.2f} MB against {f[1]:.2f} MB for evaluation (each strategy's "
                       f"default schedule)")
    seconds = {s: d["wall_seconds"] for s, d in runs.items()}
    if nvflare is not None:
        seconds["nvflare aligned"] = nvflare["wall_seconds"]
    return (f"Tiny Mixtral (transformers 5, 2 layers, top-2 of 8 fused experts), {args.nodes} nodes, one synthetic "
            f"language per node, {args.rounds} rounds, {args.local_epochs} local epoch(s) of Adam (lr {args.lr}) on "
            f"{args.sequences} sequences per round, seed {args.seed}.\n\n"
            f"- accuracy: next-token accuracy of the global model after each round on held-out sequences of all "
            f"four languages, routed by its own routers (server side; chance 1/60 = 0.017);\n"
            f"- nodes' view: mean over the nodes of the next-token accuracy on held-out sequences of the node's own "
            f"language of the model the node holds: FedAvg, the global model; aligned, the shared arrays and the "
            f"node's experts with routing restricted to them, as in its training (server side, no traffic);\n"
            f"- MB: array bytes to and from the nodes, training and evaluation counted separately (Flower: "
            f"measured on the server's messages; NVFlare: reported by the sites).\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n\nWall time: "
            + ", ".join(f"{s} {v:.0f} s" for s, v in seconds.items())
            + (" (the NVFlare simulator ran alongside the Flower runs)" if nvflare is not None and not args.sequential
               else "") + "\n")


def plot(args, runs: dict, nvflare: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = curves(runs, nvflare, args.rounds)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (s, points) in enumerate(c.items()):
        color = f"C{i}"
        rs = list(range(len(points)))
        mb, total = [], 0.0
        for p in points:
            total += p["train"] / 1e6
            mb.append(total)
        ax.plot(rs, [p["accuracy"] for p in points], marker="o", color=color, label=f"{s}: global model")
        bx.plot(mb, [p["accuracy"] for p in points], marker="o", color=color, label=f"{s}: global model")
        if any(p["view"] is not None for p in points):
            pts = [(r, m, p["view"]) for r, m, p in zip(rs, mb, points) if p["view"] is not None]
            ax.plot([r for r, _, _ in pts], [v for _, _, v in pts], marker="s", linestyle="--", color=color,
                    label=f"{s}: nodes' view")
            bx.plot([m for _, m, _ in pts], [v for _, _, v in pts], marker="s", linestyle="--", color=color,
                    label=f"{s}: nodes' view")
    for x in (ax, bx):
        x.axhline(1 / 60, color="grey", linestyle=":", label="chance")
        x.set_ylabel("next-token accuracy")
        x.set_ylim(0, 1)
    ax.set_xlabel("round")
    bx.set_xlabel("MB moved for training (cumulative)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--sequences", type=int, default=128, help="training sequences per node per round")
    ap.add_argument("--fraction-evaluate", type=float, default=-1.0,
                    help="fraction of nodes evaluating each round (< 0: each strategy's own default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="aligned,fedavg", help="the Flower runs, comma-separated")
    ap.add_argument("--no-nvflare", action="store_true", help="skip the NVFlare simulator run")
    ap.add_argument("--sequential", action="store_true",
                    help="run the NVFlare simulator after the Flower runs, not alongside them (cleaner wall times)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is stopped")
    ap.add_argument("--out", default="runs/hf_moe")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = flower_env(out, "hf-moe", pythonpath=(HERE,))

    stop_on_sigterm()
    try:
        nvflare = None
        if args.no_nvflare:
            runs = run_flower(args, out, env)
        elif args.sequential:
            runs = run_flower(args, out, env)
            nvflare = finish_nvflare(args, out, *start_nvflare(args, out, env))
        else:                                 # the simulator alongside the Flower runs (both mostly wait)
            proc, tail, started = start_nvflare(args, out, env)
            runs = run_flower(args, out, env, others=(tail,))
            nvflare = finish_nvflare(args, out, proc, tail, started)
    finally:
        stop_all()
    text = report(args, runs, nvflare)
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(curves(runs, nvflare, args.rounds), indent=1))
    print("\n" + text, flush=True)
    try:
        plot(args, runs, nvflare, out / "accuracy.png")
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)


if __name__ == "__main__":
    main()
