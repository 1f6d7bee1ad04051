"""Run the example twice with ``flwr run`` (Flower's local simulation), aligned and Flower's FedAvg on
the full model, and compare them: accuracy per round and MB moved for training, as a markdown table
(``results.md``) and a plot (``accuracy.png``) in ``--out``.

    python examples/flower_torch/run.py --rounds 10 --nodes 8 --out runs/flower_torch

The script writes a Flower configuration (``$FLWR_HOME/config.toml``, in ``--out``) with one
connection, ``flower-torch``, to a local simulation SuperLink, starts ``flower-superlink`` itself on
free ports and submits the app twice with ``flwr run ... --federation-config "num-supernodes=N"``;
both runs see the same nodes, data, seed and local training.  Everything it starts is stopped by
its process id (and that process's group) when it returns, also on Ctrl-C or an error.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # examples/: the helpers shared by the examples' run.py
from flwr_local import flower_env, run_strategies, stop_all, stop_on_sigterm  # noqa: E402

CONNECTION = "flower-torch"


def run_flower(args, out: Path, env: dict) -> dict[str, dict]:
    def config(strategy: str, result: Path) -> dict:
        print(f"flwr run {strategy}: {args.nodes} nodes, {args.rounds} rounds, units={args.units}", flush=True)
        return {"strategy": strategy, "units": args.units, "num-server-rounds": args.rounds, "num-nodes": args.nodes,
                "local-epochs": 2, "lr": 0.1, "tolerance": 0.2, "seed": 0, "out": str(result)}

    return run_strategies(HERE, CONNECTION, ["aligned", "fedavg"], config, out, env, args.nodes, args.timeout)


def table(runs: dict[str, dict], rounds: int) -> str:
    lines = ["| round | " + " | ".join(f"{s} accuracy" for s in runs) + " | "
             + " | ".join(f"{s} train MB (cumulative)" for s in runs) + " |",
             "|---|" + "---|" * (2 * len(runs))]
    totals = {s: 0.0 for s in runs}
    for r in range(1, rounds + 1):
        accs, mbs = [], []
        for s, data in runs.items():
            h = data["history"].get(str(r), {})
            totals[s] += (h.get("bytes_down", 0) + h.get("bytes_up", 0)) / 1e6
            accs.append(f"{h.get('central_accuracy', float('nan')):.3f}")
            mbs.append(f"{totals[s]:.2f}")
        lines.append(f"| {r} | " + " | ".join(accs) + " | " + " | ".join(mbs) + " |")
    return "\n".join(lines)


def equal_bytes(runs: dict[str, dict], rounds: int) -> str:
    """One sentence: FedAvg's accuracy when it had moved as many MB as aligned did in all rounds."""
    def curve(data):
        total, out = 0.0, []
        for r in range(1, rounds + 1):
            h = data["history"][str(r)]
            total += (h["bytes_down"] + h["bytes_up"]) / 1e6
            out.append((r, total, h["central_accuracy"]))
        return out
    aligned, fedavg = curve(runs["aligned"]), curve(runs["fedavg"])
    budget = aligned[-1][1]
    within = [c for c in fedavg if c[1] <= budget + 1e-9]
    if not within:
        return f"Aligned moved {budget:.2f} MB in {rounds} rounds; FedAvg needs more than that for one round."
    r, mb, acc = within[-1]
    return (f"Aligned moved {budget:.2f} MB in {rounds} rounds for {aligned[-1][2]:.3f}; with no more bytes "
            f"FedAvg completed {r} rounds ({mb:.2f} MB) for {acc:.3f}, and reached {fedavg[-1][2]:.3f} after "
            f"{rounds} rounds with {fedavg[-1][1]:.2f} MB ({fedavg[-1][1] / budget:.1f}x aligned's bytes).")


def plot(runs: dict[str, dict], rounds: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for s, data in runs.items():
        rs = list(range(1, rounds + 1))
        acc = [data["history"][str(r)]["central_accuracy"] for r in rs]
        mb, total = [], 0.0
        for r in rs:
            total += (data["history"][str(r)]["bytes_down"] + data["history"][str(r)]["bytes_up"]) / 1e6
            mb.append(total)
        ax.plot(rs, acc, marker="o", label=s)
        bx.plot(mb, acc, marker="o", label=s)
    ax.set_xlabel("round")
    ax.set_ylabel("central test accuracy")
    bx.set_xlabel("MB moved for training (cumulative)")
    ax.legend()
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--units", choices=["expert", "layer"], default="expert")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is stopped")
    ap.add_argument("--out", default="runs/flower_torch")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = flower_env(out, CONNECTION)
    stop_on_sigterm()
    try:
        runs = run_flower(args, out, env)
    finally:
        stop_all()
    text = (f"{args.nodes} nodes (one shifted-digits domain each), {args.rounds} rounds, two MoE blocks (top-2 of 8 "
            f"experts), units={args.units}; central accuracy on the held-out test set after each round; MB = "
            f"array bytes sent to and received from the nodes for training (federated evaluation is off: the "
            f"server scores the global model itself).\n\n{table(runs, args.rounds)}\n\n"
            f"{equal_bytes(runs, args.rounds)}\n\nWall time: "
            + ", ".join(f"{s} {d['wall_seconds']:.0f} s" for s, d in runs.items()) + "\n")
    (out / "results.md").write_text(text)
    print("\n" + text, flush=True)
    try:
        plot(runs, args.rounds, out / "accuracy.png")
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)


if __name__ == "__main__":
    main()
