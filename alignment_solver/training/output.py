"""What a simulation run writes: ``metrics.csv``, ``summary.json`` and the plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .config import SimConfig

#: Row keys that list client ids: written to rounds.jsonl, not to metrics.csv.
TRACE = ("available", "planned", "dropped")


def plot(cfg: SimConfig, rows: list[dict], folder: Path) -> list[Path]:
    """``accuracy.png`` (test accuracy per round and against simulated time) and ``load_heatmap.png`` (clients per expert and
    round, one colour scale shared by every strategy).  Rounds are numbered from 1 in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for s in cfg.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        acc = [r["accuracy"] for r in mine]
        axes[0].plot([r["round"] + 1 for r in mine], acc, marker="o", markersize=3, label=s)
        axes[1].plot([r["sim_seconds"] for r in mine], acc, marker="o", markersize=3, label=s)
    for ax in axes:
        ax.axhline(cfg.target_accuracy, color="grey", linestyle=":", label=f"target {cfg.target_accuracy:.0%}")
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlim(0.5, cfg.rounds + 0.5)
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("global test accuracy")
    axes[1].set_xlabel(f"simulated seconds (devices: {cfg.devices}, deadline: {cfg.deadline or 'none'})")
    axes[1].legend()
    fig.suptitle(f"{cfg.dataset}, {cfg.partition}, {cfg.clients} clients x {cfg.experts} experts")
    fig.tight_layout()
    paths.append(folder / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    loads = {s: np.array([r["load"] for r in rows if r["strategy"] == s], dtype=float).T for s in cfg.strategies}
    top = max(1.0, max(float(v.max()) for v in loads.values() if v.size))
    cols = min(3, len(cfg.strategies))
    nrows = math.ceil(len(cfg.strategies) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 1.2, 3.4 * nrows), squeeze=False,
                             layout="constrained")
    for ax, s in zip(axes.ravel(), cfg.strategies):
        im = ax.imshow(loads[s], aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=top,
                       extent=(0.5, cfg.rounds + 0.5, cfg.experts - 0.5, -0.5))
        ax.set_title(s)
        ax.set_xlabel("round")
        ax.set_ylabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.ravel()[len(cfg.strategies):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="clients training the expert (same scale in every panel)")
    fig.suptitle("expert load per round")
    paths.append(folder / "load_heatmap.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(cfg: SimConfig, result: dict[str, Any]) -> Path:
    """Write ``result`` (from ``simulate``) to ``output/run_name``: ``metrics.csv`` (one row per
    strategy and round, the load as ``load_e{j}`` columns), ``rounds.jsonl`` (per strategy and round
    the client ids ``available``, ``planned`` and ``dropped``, so anyone can check that strategies saw
    the same clients), ``summary.json`` and the plots (skipped,
    with a note in ``result``, without matplotlib).  Fills ``result["plots"]`` and ``result["folder"]``."""
    rows = result["rows"]
    folder = Path(cfg.output) / cfg.run_name
    folder.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if k not in ("load", *TRACE)] + [f"load_e{j}" for j in range(cfg.experts)]
    with open(folder / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for r in rows:
            writer.writerow([r[k] for k in fields if not k.startswith("load_e")] + r["load"])
    with open(folder / "rounds.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"strategy": r["strategy"], "round": r["round"], **{k: r[k] for k in TRACE}}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"config": result["config"], "summary": result["summary"],
                                                     "seconds": result["seconds"]}, indent=2))
    try:
        result["plots"] = [str(p) for p in plot(cfg, rows, folder)]
    except ImportError:
        result["plots"] = []
        result["note"] = "plots skipped: matplotlib is not installed (pip install 'alignment-solver[train]')"
    result["folder"] = str(folder)
    return folder
