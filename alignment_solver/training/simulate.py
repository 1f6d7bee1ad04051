"""The light federated MoE training loop, run once per strategy on identical data and clients.

One round: the strategy plans through ``AlignmentCoordinator.plan_round`` -> each planned client
trains its assigned experts and the gate locally (unassigned experts masked) -> reports samples,
loss and accuracy per expert, its routing histogram, seconds and bytes -> per-expert weighted
averaging over the clients that trained each expert (an expert trained by nobody keeps its
weights), the gate averaged over all reporting clients -> ``observe_round`` -> evaluation
(global test accuracy with every expert; personalised accuracy on each client's held-out share
with the experts it last trained).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..coordinator import AlignmentCoordinator, CoordinatorConfig
from ..load_monitor import cv
from ..progress import Progress
from .data import Dataset, load_digits, load_npz, load_shifted_digits, make_synthetic, partition
from .model import MoE, Params, average_by_owner, expert_keys, init_params
from .strategies import STRATEGIES, make_assign

Strategy = Literal["random", "greedy", "round_robin", "aligned", "aligned_budget"]


class SimConfig(BaseModel):
    """Every option of ``alignment-solver simulate``; the defaults are the ``make run`` demo."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["digits", "shifted_digits", "synthetic", "npz"] = "digits"
    npz_path: Optional[str] = None
    synthetic_samples: int = Field(20000, ge=100)
    synthetic_domains: int = Field(4, ge=1)
    shifted_domains: int = Field(4, ge=1, le=6, description="domains of shifted_digits")
    domain_sizes: Literal["equal", "unequal"] = Field("equal", description="domain shares: equal or 1, 1/2, 1/3...")
    domains_per_client: int = Field(2, ge=1, description="partition 'domains': each client owns 1..this many")
    partition: Literal["iid", "dirichlet", "classes", "domains"] = "dirichlet"
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration")
    classes_per_client: int = Field(2, ge=1)
    clients: int = Field(50, ge=1)
    experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    hidden: int = Field(0, ge=0, description="expert MLP hidden units; 0 = softmax regression")
    min_capacity: int = Field(1, ge=1)
    max_capacity: int = Field(3, ge=1)
    participation: float = Field(1.0, gt=0, le=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    rounds: int = Field(30, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.5, gt=0)
    route_weight: float = Field(0.0, ge=0, description="routing loss weight: single-expert clients teach the gate")
    gate_average: Literal["all", "updated"] = Field(
        "all", description="average the gate over every trained client, or only those whose gate had a gradient")
    tolerance: float = Field(0.1, ge=0)
    solver_time_limit: Optional[float] = Field(None, gt=0, description="per-round solve limit (CP-SAT for budgets)")
    target_accuracy: float = Field(0.9, gt=0, le=1)
    strategies: list[Strategy] = Field(default_factory=lambda: ["greedy", "aligned"], min_length=1)
    seed: int = Field(0, ge=0, le=2 ** 30)
    output: str = "runs"
    name: Optional[str] = Field(None, description="run folder inside output: one plain name, no path")

    @model_validator(mode="after")
    def _check(self) -> "SimConfig":
        if self.max_capacity > self.experts:
            raise ValueError(f"max_capacity ({self.max_capacity}) must be <= experts ({self.experts}): "
                             f"a client cannot train more experts than exist")
        if self.min_capacity > self.max_capacity:
            raise ValueError(f"min_capacity ({self.min_capacity}) must be <= max_capacity ({self.max_capacity})")
        if self.partition == "domains" and self.dataset not in ("synthetic", "shifted_digits"):
            raise ValueError(f"partition 'domains' needs a dataset with domains (synthetic or shifted_digits); "
                             f"got dataset {self.dataset!r}")
        if self.dataset == "npz" and not self.npz_path:
            raise ValueError("dataset 'npz' needs npz_path")
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name or "\0" in self.name):
            raise ValueError(f"name must be one folder name inside output (no '/', '\\', '.' or '..'); "
                             f"got {self.name!r}")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be unique; got {self.strategies}")
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}-{self.partition}-{self.clients}x{self.experts}-seed{self.seed}"


def load_data(cfg: SimConfig, rng: np.random.Generator) -> Dataset:
    if cfg.dataset == "digits":
        return load_digits(rng)
    if cfg.dataset == "npz":
        return load_npz(cfg.npz_path, rng)
    if cfg.dataset == "shifted_digits":
        return load_shifted_digits(rng, domains=cfg.shifted_domains, sizes=cfg.domain_sizes)
    return make_synthetic(cfg.synthetic_samples, rng, domains=cfg.synthetic_domains, sizes=cfg.domain_sizes)


class World:
    """Data, partitions and client traits shared by every strategy of one run."""

    def __init__(self, cfg: SimConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        self.data = load_data(cfg, rng)
        parts = partition(self.data, cfg.clients, cfg.partition, rng, alpha=cfg.alpha,
                          classes_per_client=cfg.classes_per_client, domains_per_client=cfg.domains_per_client)
        self.train, self.val = [], []
        for p in parts:
            p = rng.permutation(p)
            cut = max(1, int(round(0.8 * len(p))))
            self.train.append(p[:cut])
            self.val.append(p[cut:] if cut < len(p) else p[:1])
        self.capacity = rng.integers(cfg.min_capacity, cfg.max_capacity + 1, cfg.clients)
        self.speed = rng.uniform(50.0, 200.0, cfg.clients)            # samples per second
        self.expert_memory = rng.integers(1, 3, cfg.experts).astype(float)
        self.memory = self.capacity * 1.5 + rng.uniform(0.0, 1.0, cfg.clients)


def _nbytes(p: Params, keys: list[str]) -> int:
    return int(sum(p[k].nbytes for k in keys))


def local_train(model: MoE, params: Params, x: np.ndarray, y: np.ndarray, experts: list[int], cfg: SimConfig,
                rng: np.random.Generator) -> tuple[Params, dict[str, Any]]:
    """Train the gate and the assigned experts on one client's data; return them and the report.

    The gate gets a gradient only with two or more experts, or with ``cfg.route_weight`` > 0;
    with ``cfg.gate_average="updated"`` a client whose gate got none does not return it, so the
    gate is averaged over the clients that actually updated it (``"all"``: every client returns it).
    """
    allowed = np.zeros(model.E, dtype=bool)
    allowed[experts] = True
    learns = len(experts) > 1 or cfg.route_weight > 0
    gate = ["gate.W", "gate.b"] if learns or cfg.gate_average == "all" else []
    keys = gate + [k for j in experts for k in expert_keys(j, model.hidden)]
    local = {k: params[k].copy() for k in keys}
    view = {**params, **local}
    train = set(keys)
    for _ in range(cfg.local_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), cfg.batch_size):
            b = order[start:start + cfg.batch_size]
            _, grads, _ = model.loss_and_grad(view, x[b], y[b], allowed, train, route_weight=cfg.route_weight)
            for k, g in grads.items():
                local[k] -= cfg.lr * g
            view.update(local)
    probs, w, q, sel = model.forward(view, x, allowed)[:4]
    per_expert = []
    for j in experts:
        routed = sel[:, j]
        n = int(routed.sum())
        if n:
            qj = q[routed, j]
            loss = float(-np.log(np.maximum(qj[np.arange(n), y[routed]], 1e-12)).mean())
            acc = float((qj.argmax(axis=1) == y[routed]).mean())
        else:
            loss, acc = 0.0, 0.0
        per_expert.append({"expert": int(j), "samples": n, "mean_loss": loss, "accuracy": acc})
    return local, {"experts": per_expert, "samples": len(y)}


def routing_histogram(model: MoE, params: Params, x: np.ndarray) -> list[float]:
    logits = x @ params["gate.W"] + params["gate.b"]
    return np.bincount(logits.argmax(axis=1), minlength=model.E).astype(float).tolist()


def run_strategy(cfg: SimConfig, world: World, strategy: str, progress: Optional[Progress] = None) -> list[dict]:
    """Train with one strategy; one metrics row per round."""
    rng = np.random.default_rng([cfg.seed, STRATEGIES.index(strategy)])
    data = world.data
    model = MoE(cfg.experts, hidden=cfg.hidden, top_k=cfg.top_k)
    params = init_params(data.dim, data.classes, cfg.experts, cfg.hidden, np.random.default_rng(cfg.seed))
    budgeted = strategy == "aligned_budget"
    coord = AlignmentCoordinator(cfg.experts, config=CoordinatorConfig(
        tolerance=cfg.tolerance, seed=cfg.seed, time_limit=cfg.solver_time_limit, capacity={"max_capacity": cfg.max_capacity,
                                                          "default_capacity": cfg.min_capacity},
        expert_memory=world.expert_memory.tolist() if budgeted else None))
    assign = make_assign(strategy, rng)
    last_experts: dict[int, list[int]] = {}
    rows = []
    for r in range(cfg.rounds):
        if progress:
            progress.step(f"{strategy} round {r + 1}/{cfg.rounds}")
        available = np.flatnonzero(rng.random(cfg.clients) < cfg.participation)
        if not len(available):
            available = np.array([int(rng.integers(cfg.clients))])
        status = [{"client_id": int(c), "max_experts": int(world.capacity[c]), "samples": int(len(world.train[c])),
                   "throughput": float(world.speed[c]), "memory": float(world.memory[c]),
                   "routing": routing_histogram(model, params, data.x_train[world.train[c]])}
                  for c in available]
        plan = coord.plan_round(r, status, assign=assign)
        updates = []
        reports = []
        down = up = 0
        for pc in plan.clients:
            c, experts = int(pc.client_id), pc.experts
            if not experts or rng.random() < cfg.dropout:
                continue
            idx = world.train[c]
            local, rep = local_train(model, params, data.x_train[idx], data.y_train[idx], experts, cfg, rng)
            sent = _nbytes(params, list(local))
            down, up = down + sent, up + sent
            updates.append((local, float(len(idx)), {e["expert"]: e["samples"] for e in rep["experts"]}))
            last_experts[c] = experts
            reports.append({"client_id": c, "train_seconds": cfg.local_epochs * len(idx) * len(experts) / world.speed[c],
                            "bytes_down": sent, "bytes_up": sent, "experts": rep["experts"],
                            "routing": routing_histogram(model, params, data.x_train[idx])})
        params, _ = average_by_owner(params, updates)
        summary = coord.observe_round(r, reports)
        trained = np.array(summary.expert_clients)
        acc = float((model.predict(params, data.x_test) == data.y_test).mean())
        personal = [float((model.predict(params, data.x_train[world.val[c]], _mask(cfg.experts, e)) ==
                           data.y_train[world.val[c]]).mean()) for c, e in last_experts.items()]
        rows.append({"strategy": strategy, "round": r, "accuracy": acc,
                     "personalised_accuracy": float(np.mean(personal)) if personal else math.nan,
                     "load_cv": cv(trained), "planned_cv": plan.planned_cv, "solve_ms": 1000 * plan.solve_seconds,
                     "bytes_down": down, "bytes_up": up, "clients": len(reports),
                     "load": trained.astype(int).tolist()})
    return rows


def _mask(E: int, experts: list[int]) -> np.ndarray:
    m = np.zeros(E, dtype=bool)
    m[experts] = True
    return m


def summarise(cfg: SimConfig, rows: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in cfg.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        reach = next((r["round"] + 1 for r in mine if r["accuracy"] >= cfg.target_accuracy), None)
        out[s] = {"final_accuracy": mine[-1]["accuracy"], "best_accuracy": max(r["accuracy"] for r in mine),
                  "final_personalised_accuracy": mine[-1]["personalised_accuracy"],
                  "rounds_to_target": reach, "mean_load_cv": float(np.mean([r["load_cv"] for r in mine])),
                  "solve_ms_per_round": float(np.mean([r["solve_ms"] for r in mine])),
                  "mb_moved": sum(r["bytes_down"] + r["bytes_up"] for r in mine) / 1e6}
    return out


def table(cfg: SimConfig, summary: dict[str, dict[str, Any]]) -> str:
    head = (f"{'strategy':16}{'final acc':>10}{'best acc':>10}{'rounds to ' + format(cfg.target_accuracy, '.0%'):>16}"
            f"{'load CV':>9}{'solve ms':>10}{'MB moved':>10}")
    lines = [head, "-" * len(head)]
    for s, v in summary.items():
        reach = v["rounds_to_target"] if v["rounds_to_target"] is not None else "-"
        lines.append(f"{s:16}{v['final_accuracy']:>10.3f}{v['best_accuracy']:>10.3f}{reach!s:>16}"
                     f"{v['mean_load_cv']:>9.3f}{v['solve_ms_per_round']:>10.1f}{v['mb_moved']:>10.2f}")
    return "\n".join(lines)


def plot(cfg: SimConfig, rows: list[dict], folder: Path) -> list[Path]:
    """``accuracy.png`` (test accuracy per round) and ``load_heatmap.png`` (clients per expert and
    round, one colour scale shared by every strategy).  Rounds are numbered from 1 in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in cfg.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        ax.plot([r["round"] + 1 for r in mine], [r["accuracy"] for r in mine], marker="o", markersize=3, label=s)
    ax.axhline(cfg.target_accuracy, color="grey", linestyle=":", label=f"target {cfg.target_accuracy:.0%}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, cfg.rounds + 0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg.dataset}, {cfg.partition}, {cfg.clients} clients x {cfg.experts} experts")
    ax.grid(alpha=0.3)
    ax.legend()
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


def simulate(cfg: SimConfig, *, write: bool = True, show_progress: bool = True) -> dict[str, Any]:
    """Run every strategy of ``cfg``; write ``metrics.csv``, ``summary.json`` and plots when ``write``."""
    started = time.perf_counter()
    world = World(cfg)
    progress = Progress(cfg.rounds * len(cfg.strategies)) if show_progress else None
    rows = [row for s in cfg.strategies for row in run_strategy(cfg, world, s, progress)]
    if progress:
        progress.close()
    summary = summarise(cfg, rows)
    result: dict[str, Any] = {"config": cfg.model_dump(), "summary": summary, "rows": rows,
                              "seconds": time.perf_counter() - started}
    if write:
        folder = Path(cfg.output) / cfg.run_name
        folder.mkdir(parents=True, exist_ok=True)
        fields = [k for k in rows[0] if k != "load"] + [f"load_e{j}" for j in range(cfg.experts)]
        with open(folder / "metrics.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(fields)
            for r in rows:
                writer.writerow([r[k] for k in fields if not k.startswith("load_e")] + r["load"])
        (folder / "summary.json").write_text(json.dumps({"config": result["config"], "summary": summary,
                                                         "seconds": result["seconds"]}, indent=2))
        try:
            result["plots"] = [str(p) for p in plot(cfg, rows, folder)]
        except ImportError:
            result["plots"] = []
            result["note"] = "plots skipped: matplotlib is not installed (pip install 'alignment-solver[train]')"
        result["folder"] = str(folder)
    return result
