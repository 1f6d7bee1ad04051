"""The light federated MoE training loop, run once per strategy on identical data and clients.

One round, on a simulated system clock:

1. The strategy plans through ``AlignmentCoordinator.plan_round`` (capacity from the profiler,
   which sees each device's reported speed and bandwidth and its observed round times).
2. Each planned client downloads the gate and its experts (and the experts it is asked to probe),
   scores them on its held-out split before training (``fitness="heldout"``), then trains its
   experts and a router locally (unassigned experts masked).  With ``router="local"`` it keeps its
   own router (never averaged) and teaches the global gate only a routing loss toward its experts.
3. Its simulated time is download + training + upload from its device profile; a client past
   the ``deadline`` is dropped (reported unfinished, its update discarded).  The round lasts as
   long as its slowest planned client (at most the deadline).  Its report's ``download_seconds``
   is its transfer time both ways, so the capacity profiler sees its whole round.
4. Per-expert weighted averaging over the clients that trained each expert; the global gate over
   the clients that sent it.  ``observe_round`` gets the reports.
5. Evaluation: global test accuracy (global gate, experts trained so far) and personalised
   accuracy (each client's held-out split, its last experts and its router).
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
from .strategies import FITNESS_DRIVEN, STRATEGIES, make_assign

Strategy = Literal["random", "greedy", "round_robin", "aligned", "aligned_budget", "oracle", "fedavg"]
GATE = ("gate.W", "gate.b")
#: Device profile of the population: samples per second and bytes per second (median device).
BASE_SPEED, BASE_BANDWIDTH = 100.0, 20_000.0


class SimConfig(BaseModel):
    """Every option of ``alignment-solver simulate``; the defaults are the ``make run`` demo and the
    loop of ``benchmarks/strategies.py``: concept-shifted digits, one domain per client, capacity
    1-2 of 8, local routers, held-out fitness with one probe, demand-sized plans, strongly
    heterogeneous devices with a 5 s deadline, greedy against aligned."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["digits", "shifted_digits", "synthetic", "npz"] = "shifted_digits"
    npz_path: Optional[str] = None
    synthetic_samples: int = Field(20000, ge=100)
    synthetic_domains: int = Field(4, ge=1)
    shifted_domains: int = Field(4, ge=1, le=6, description="domains of shifted_digits")
    domain_sizes: Literal["equal", "unequal"] = Field("equal", description="domain shares: equal or 1, 1/2, 1/3...")
    domains_per_client: int = Field(1, ge=1, description="partition 'domains': each client owns 1..this many")
    partition: Optional[Literal["iid", "dirichlet", "classes", "domains"]] = Field(
        None, description="default: domains for shifted_digits and synthetic, dirichlet otherwise")
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration")
    classes_per_client: int = Field(2, ge=1)
    clients: int = Field(50, ge=1)
    experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    hidden: int = Field(0, ge=0, description="expert MLP hidden units; 0 = softmax regression")
    min_capacity: int = Field(1, ge=1)
    max_capacity: int = Field(2, ge=1)
    participation: float = Field(1.0, gt=0, le=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.5, gt=0)
    route_weight: float = Field(0.5, ge=0, description="routing loss weight: single-expert clients teach the gate")
    gate_average: Literal["all", "updated"] = Field(
        "updated", description="average the gate over every trained client, or only those whose gate had a gradient")
    router: Literal["global", "local"] = Field(
        "local", description="global: one averaged gate; local: each client keeps its own router (FLEX-MoE)")
    fitness: Literal["train", "heldout"] = Field(
        "heldout", description="score each expert on the training samples after training, or held-out before it")
    fitness_mode: Literal["accuracy", "loss"] = Field("accuracy", description="fitness from accuracy or exp(-loss)")
    probes: int = Field(1, ge=0, description="untried experts each fitness-driven client scores per round")
    exploration: float = Field(0.05, ge=0, description="UCB exploration coefficient of the fitness scorer")
    expert_cost: float = Field(0.3, ge=0, description="fitness an extra expert must beat (demand-sized plans)")
    devices: Literal["none", "strong"] = Field(
        "strong", description="device heterogeneity: identical devices, or speed and bandwidth lognormal(0, 1)")
    deadline: Optional[float] = Field(5.0, gt=0, description="simulated seconds per round; later clients drop")
    tolerance: float = Field(0.3, ge=0)
    solver_time_limit: Optional[float] = Field(None, gt=0, description="per-round solve limit (CP-SAT for budgets)")
    target_accuracy: float = Field(0.75, gt=0, le=1)
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
        if self.dataset == "npz" and not self.npz_path:
            raise ValueError("dataset 'npz' needs npz_path")
        if self.partition is None:
            self.partition = "domains" if self.dataset in ("synthetic", "shifted_digits") else "dirichlet"
        if self.partition == "domains" and self.dataset not in ("synthetic", "shifted_digits"):
            raise ValueError(f"partition 'domains' needs a dataset with domains (synthetic or shifted_digits); "
                             f"got dataset {self.dataset!r}")
        if self.dataset == "npz" and not self.npz_path:
            raise ValueError("dataset 'npz' needs npz_path")
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name or "\0" in self.name):
            raise ValueError(f"name must be one folder name inside output (no '/', '\\', '.' or '..'); "
                             f"got {self.name!r}")
        if "oracle" in self.strategies and self.partition != "domains":
            raise ValueError("strategy 'oracle' needs partition 'domains' (the true domains it assigns by)")
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
        rng.uniform(50.0, 200.0, cfg.clients)                     # kept: the draws below stay as they were
        self.expert_memory = rng.integers(1, 3, cfg.experts).astype(float)
        self.memory = self.capacity * 1.5 + rng.uniform(0.0, 1.0, cfg.clients)
        dev = np.random.default_rng([cfg.seed, 1])
        spread = 1.0 if cfg.devices == "strong" else 0.0
        self.speed = BASE_SPEED * np.exp(np.clip(dev.normal(0, spread, cfg.clients), -3, 3))
        self.bandwidth = BASE_BANDWIDTH * np.exp(np.clip(dev.normal(0, spread, cfg.clients), -3, 3))
        self.domains: Optional[dict[int, list[int]]] = None
        if self.data.domain_train is not None and cfg.partition == "domains":
            self.domains = {}
            for c, p in enumerate(parts):
                counts = np.bincount(self.data.domain_train[p])
                self.domains[c] = [int(d) for d in np.argsort(-counts, kind="stable") if counts[d] > 0]


def _nbytes(p: Params, keys) -> int:
    return int(sum(p[k].nbytes for k in keys))


def local_train(model: MoE, params: Params, x: np.ndarray, y: np.ndarray, experts: list[int], cfg: SimConfig,
                rng: np.random.Generator, router: Optional[Params] = None) -> tuple[Params, dict[str, Any]]:
    """Train the assigned experts and a router on one client's data; return what to send and the report.

    Without ``router`` the global gate is trained with the mixture loss (plus ``cfg.route_weight``
    times the routing loss); it gets a gradient only with two or more experts or a routing loss,
    and with ``cfg.gate_average="updated"`` a client whose gate got none does not send it.  With
    ``router`` (the client's own gate, updated in place) that router takes the mixture gradient
    and the global gate copy is taught only the routing loss (weight ``max(route_weight, 1)``).
    The report's ``experts`` hold each expert's samples routed, loss and accuracy on the training data.
    """
    allowed = np.zeros(model.E, dtype=bool)
    allowed[experts] = True
    own = router is not None
    if own:
        gate = list(GATE) if not allowed.all() else []
    else:
        learns = len(experts) > 1 or cfg.route_weight > 0
        gate = list(GATE) if learns or cfg.gate_average == "all" else []
    keys = gate + [k for j in experts for k in expert_keys(j, model.hidden)]
    local = {k: params[k].copy() for k in keys}
    mine = {k: router[k] for k in GATE} if own else {}
    view = {**params, **local, **mine}
    train = set(keys) | set(GATE) if own else set(keys)
    for _ in range(cfg.local_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), cfg.batch_size):
            b = order[start:start + cfg.batch_size]
            _, grads, _ = model.loss_and_grad(view, x[b], y[b], allowed, train, route_weight=cfg.route_weight)
            for k, g in grads.items():
                (mine if own and k in GATE else local)[k] -= cfg.lr * g
            if own and gate:
                _, d = model.routing_loss(local, x[b], allowed)
                for k, g in model.gate_grads(x[b], d).items():
                    local[k] -= cfg.lr * max(cfg.route_weight, 1.0) * g
            view.update(local)
            view.update(mine)
    if own:
        router.update(mine)
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


def routing_nmi(model: MoE, params: Params, data: Dataset, trained: np.ndarray) -> float:
    """Normalised mutual information between each training sample's top expert under the global
    gate (among trained experts) and its true domain; NaN without domains."""
    if data.domain_train is None or not trained.any():
        return math.nan
    logits = np.where(trained[None, :], data.x_train @ params["gate.W"] + params["gate.b"], -np.inf)
    return nmi(data.domain_train, logits.argmax(axis=1))


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information ``I(a; b) / mean(H(a), H(b))`` of two labelings (1 if both constant)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    entropy = lambda p: float(-(p[p > 0] * np.log(p[p > 0])).sum())  # noqa: E731
    ha, hb = entropy(pa), entropy(pb)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return 1.0 if ha == hb == 0 else max(0.0, mi / ((ha + hb) / 2))


def run_strategy(cfg: SimConfig, world: World, strategy: str, progress: Optional[Progress] = None) -> list[dict]:
    """Train with one strategy; one metrics row per round."""
    rng = np.random.default_rng([cfg.seed, STRATEGIES.index(strategy)])
    data = world.data
    model = MoE(cfg.experts, hidden=cfg.hidden, top_k=cfg.top_k)
    params = init_params(data.dim, data.classes, cfg.experts, cfg.hidden, np.random.default_rng(cfg.seed))
    budgeted = strategy == "aligned_budget"
    probes = cfg.probes if strategy in FITNESS_DRIVEN else 0
    expert_bytes = _nbytes(params, expert_keys(0, cfg.hidden))
    gate_bytes = _nbytes(params, GATE)
    coord = AlignmentCoordinator(cfg.experts, config=CoordinatorConfig(
        tolerance=cfg.tolerance, seed=cfg.seed, time_limit=cfg.solver_time_limit, expert_cost=cfg.expert_cost,
        probes=probes, scorer={"mode": cfg.fitness_mode, "exploration": cfg.exploration},
        capacity={"max_capacity": cfg.max_capacity, "default_capacity": cfg.min_capacity,
                  "expert_bytes": expert_bytes},
        expert_memory=world.expert_memory.tolist() if budgeted else None))
    assign = make_assign(strategy, rng, world.domains)
    routers: dict[int, Params] = {}
    last_experts: dict[int, list[int]] = {}
    trained_ever = np.zeros(cfg.experts, dtype=bool)
    clock = 0.0
    rows = []
    for r in range(cfg.rounds):
        if progress:
            progress.step(f"{strategy} round {r + 1}/{cfg.rounds}")
        available = np.flatnonzero(rng.random(cfg.clients) < cfg.participation)
        if not len(available):
            available = np.array([int(rng.integers(cfg.clients))])
        status = [{"client_id": int(c), "max_experts": int(world.capacity[c]),
                   "samples": int(cfg.local_epochs * len(world.train[c])), "throughput": float(world.speed[c]),
                   "bandwidth": float(world.bandwidth[c]), "memory": float(world.memory[c]),
                   "routing": routing_histogram(model, params, data.x_train[world.train[c]])}
                  for c in available]
        plan = coord.plan_round(r, status, assign=assign, deadline=cfg.deadline)
        updates, reports = [], []
        down = up = late = 0
        round_seconds = 0.0
        for pc in plan.clients:
            c, experts = int(pc.client_id), pc.experts
            if not experts:
                continue
            if rng.random() < cfg.dropout:
                round_seconds = max(round_seconds, cfg.deadline or 0.0)      # the server waits it out
                continue
            idx, val = world.train[c], world.val[c]
            x, y = data.x_train[idx], data.y_train[idx]
            fetched = gate_bytes + expert_bytes * (len(experts) + len(pc.probe))
            scored = model.expert_scores(params, data.x_train[val], data.y_train[val], experts + pc.probe)
            if cfg.router == "local" and c not in routers:
                routers[c] = {k: params[k].copy() for k in GATE}
            local, rep = local_train(model, params, x, y, experts, cfg, rng,
                                     routers.get(c) if cfg.router == "local" else None)
            sent = _nbytes(params, local)
            train_s = (cfg.local_epochs * len(idx) * len(experts) + len(val) * len(scored)) / world.speed[c]
            down_s, up_s = fetched / world.bandwidth[c], sent / world.bandwidth[c]
            seconds = down_s + train_s + up_s
            finished = cfg.deadline is None or seconds <= cfg.deadline
            round_seconds = max(round_seconds, min(seconds, cfg.deadline or seconds))
            down += fetched
            if cfg.fitness == "heldout":
                for e, s in zip(rep["experts"], scored):
                    e.update(mean_loss=s["mean_loss"], accuracy=s["accuracy"])
            reports.append({"client_id": c, "finished": finished, "train_seconds": train_s,
                            "download_seconds": down_s + up_s, "bytes_down": fetched, "bytes_up": sent if finished else 0,
                            "experts": rep["experts"], "probes": scored[len(experts):],
                            "routing": routing_histogram(model, params, x)})
            if not finished:
                late += 1
                continue
            up += sent
            updates.append((local, float(len(idx)), {e["expert"]: e["samples"] for e in rep["experts"]}))
            last_experts[c] = experts
        params, _ = average_by_owner(params, updates)
        summary = coord.observe_round(r, reports)
        trained = np.array(summary.expert_clients)
        trained_ever |= trained > 0
        clock += round_seconds
        mask = trained_ever if trained_ever.any() else None
        acc = float((model.predict(params, data.x_test, mask) == data.y_test).mean())
        personal = []
        for c, e in last_experts.items():
            view = {**params, **routers[c]} if c in routers else params
            personal.append(float((model.predict(view, data.x_train[world.val[c]], _mask(cfg.experts, e)) ==
                                   data.y_train[world.val[c]]).mean()))
        rows.append({"strategy": strategy, "round": r, "accuracy": acc,
                     "personalised_accuracy": float(np.mean(personal)) if personal else math.nan,
                     "load_cv": cv(trained), "planned_cv": plan.planned_cv, "solve_ms": 1000 * plan.solve_seconds,
                     "fallback": assign is None and _fallback(plan),
                     "bytes_down": down, "bytes_up": up, "clients": len(updates), "late": late,
                     "experts_per_client": float(np.mean([len(pc.experts) for pc in plan.clients]))
                     if plan.clients else 0.0,
                     "round_seconds": round_seconds, "sim_seconds": clock,
                     "nmi": routing_nmi(model, params, data, trained_ever),
                     "untrained": int((~trained_ever).sum()), "load": trained.astype(int).tolist()})
    return rows


def _fallback(plan) -> bool:
    """Whether the coordinator's solver found no plan and the greedy fallback planned the round."""
    r = plan.result
    return "greedy fallback" in (plan.explanation or "") or (r is not None and r.stats.get("source") == "greedy fallback")


def _mask(E: int, experts: list[int]) -> np.ndarray:
    m = np.zeros(E, dtype=bool)
    m[experts] = True
    return m


def reach(rows: list[dict], target: float, key: str = "accuracy") -> Optional[dict]:
    """The first row whose ``key`` reaches ``target``, with the bytes moved up to it (None: never)."""
    moved = 0
    for r in rows:
        moved += r["bytes_down"] + r["bytes_up"]
        if r[key] >= target:
            return {**r, "mb_to_target": moved / 1e6}
    return None


def summarise(cfg: SimConfig, rows: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in cfg.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        hit = reach(mine, cfg.target_accuracy)
        out[s] = {"final_accuracy": mine[-1]["accuracy"], "best_accuracy": max(r["accuracy"] for r in mine),
                  "final_personalised_accuracy": mine[-1]["personalised_accuracy"],
                  "rounds_to_target": hit["round"] + 1 if hit else None,
                  "seconds_to_target": hit["sim_seconds"] if hit else None,
                  "mb_to_target": hit["mb_to_target"] if hit else None,
                  "sim_seconds": mine[-1]["sim_seconds"], "final_nmi": mine[-1]["nmi"],
                  "untrained_experts": mine[-1]["untrained"],
                  "mean_load_cv": float(np.mean([r["load_cv"] for r in mine])),
                  "solve_ms_per_round": float(np.mean([r["solve_ms"] for r in mine])),
                  "fallback_rounds": int(sum(r["fallback"] for r in mine)),
                  "mb_moved": sum(r["bytes_down"] + r["bytes_up"] for r in mine) / 1e6}
    return out


def table(cfg: SimConfig, summary: dict[str, dict[str, Any]]) -> str:
    goal = format(cfg.target_accuracy, ".0%")
    head = (f"{'strategy':16}{'global acc':>11}{'personal acc':>13}{'rounds to ' + goal:>16}{'sim s to ' + goal:>15}"
            f"{'MB moved':>10}{'load CV':>9}{'solve ms':>10}")
    lines = [head, "-" * len(head)]
    for s, v in summary.items():
        rounds = v["rounds_to_target"] if v["rounds_to_target"] is not None else "-"
        secs = format(v["seconds_to_target"], ".0f") if v["seconds_to_target"] is not None else "-"
        lines.append(f"{s:16}{v['final_accuracy']:>11.3f}{v['final_personalised_accuracy']:>13.3f}{rounds!s:>16}"
                     f"{secs:>15}{v['mb_moved']:>10.2f}{v['mean_load_cv']:>9.3f}{v['solve_ms_per_round']:>10.1f}")
    return "\n".join(lines)


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
