"""Run the example twice in Flower's simulation, aligned and Flower's FedAvg on the full model, and
compare them: accuracy per round and MB moved, as a markdown table (and a plot).

    python examples/flower_torch/run.py --rounds 10 --nodes 8 --out runs/flower_torch

Each strategy runs in its own process (Ray is started once per simulation); both see the same
nodes, data, seed and local training.
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def simulate(strategy: str, rounds: int, nodes: int, out: Path, units: str) -> dict:
    result = out / f"{strategy}.json"
    config = {"strategy": strategy, "units": units, "num-server-rounds": rounds, "local-epochs": 2, "lr": 0.1,
              "tolerance": 0.2, "seed": 0, "out": str(result)}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from flwr.simulation import run_simulation
        from flower_torch.client_app import app as client
        from flower_torch.server_app import app as server
        run_simulation(server_app=server, client_app=client, num_supernodes={nodes},
                       backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}})
    """)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "FLOWER_TORCH_CONFIG": json.dumps(config)}
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"the {strategy} simulation failed (exit {proc.returncode})")
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        if line.startswith(f"[{strategy}]"):
            print(line, flush=True)
    data = json.loads(result.read_text())
    data["wall_seconds"] = time.time() - started
    return data


def table(runs: dict[str, dict], rounds: int) -> str:
    lines = ["| round | " + " | ".join(f"{s} accuracy" for s in runs) + " | "
             + " | ".join(f"{s} MB (cumulative)" for s in runs) + " |",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--units", choices=["expert", "layer"], default="expert")
    ap.add_argument("--out", default="runs/flower_torch")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {s: simulate(s, args.rounds, args.nodes, out, args.units) for s in ("aligned", "fedavg")}
    text = (f"{args.nodes} nodes (one shifted-digits domain each), {args.rounds} rounds, two MoE blocks (top-2 of 8 "
            f"experts), units={args.units}; central accuracy on the held-out test set after each round; MB = "
            f"array bytes sent to and received from the nodes.\n\n{table(runs, args.rounds)}\n\n"
            f"{equal_bytes(runs, args.rounds)}\n")
    (out / "results.md").write_text(text)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
        for s, data in runs.items():
            rs = list(range(1, args.rounds + 1))
            acc = [data["history"][str(r)]["central_accuracy"] for r in rs]
            mb, total = [], 0.0
            for r in rs:
                total += (data["history"][str(r)]["bytes_down"] + data["history"][str(r)]["bytes_up"]) / 1e6
                mb.append(total)
            ax.plot(rs, acc, marker="o", label=s)
            bx.plot(mb, acc, marker="o", label=s)
        ax.set_xlabel("round")
        ax.set_ylabel("central test accuracy")
        bx.set_xlabel("MB moved (cumulative)")
        ax.legend()
        bx.legend()
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
