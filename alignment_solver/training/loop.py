"""The round loop of the simulation: one strategy trains the MoE for ``cfg.rounds`` rounds.

One round, top to bottom (:meth:`StrategyRun.round`):

1. ``available``: which clients take part this round (``cfg.participation``; the same clients for
   every strategy of a seed, as are dropouts and data order: :class:`~.world.World`).
2. ``plan``: the strategy plans through ``AlignmentCoordinator.plan_round``; each available
   client's status carries its capacity, device speed and bandwidth, memory and routing histogram.
3. ``train``: each planned client downloads the gate and its experts (and the experts it probes),
   scores them on its held-out split before training (``fitness="heldout"``), then trains its
   experts and a router locally (:func:`~alignment_solver.training.client.local_train`).  Its
   simulated time comes from the device clock (:mod:`~alignment_solver.training.clock`); a client
   past the deadline is reported unfinished and its update discarded; one that drops out
   (``cfg.dropout``) sends nothing.  ``dense`` clients score nothing and train every expert and
   the global gate.
4. ``aggregate``: per-expert weighted averaging over the clients that trained each expert; the
   global gate over the clients that sent it.  ``observe_round`` gets the reports.
5. ``evaluate``: global test accuracy (global gate, experts trained so far) and personalised
   accuracy (each client's held-out split, its last experts and its router): one metrics row.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..coordinator import AlignmentCoordinator, CoordinatorConfig
from ..rounds import RoundPlan
from ..load_monitor import cv
from ..progress import Progress
from ..search.floor import below_floor
from .client import GATE, local_train, nbytes, routing_histogram
from .clock import RoundClock, client_time
from .config import SimConfig
from .metrics import fallback, routing_nmi
from .model import MoE, Params, average_by_owner, expert_keys, expert_of, init_params
from .strategies import FITNESS_DRIVEN, STRATEGIES, make_assign
from .world import World


@dataclass
class RoundOutcome:
    """What the planned clients did in one round."""

    updates: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    late: int = 0
    seconds: float = 0.0
    dropped: list = field(default_factory=list)
    held_back: int = 0          # expert updates the privacy floor kept out of the model


class StrategyRun:
    """One strategy's training run: the global model, its coordinator and its random stream."""

    def __init__(self, cfg: SimConfig, world: World, strategy: str) -> None:
        self.cfg, self.world, self.strategy = cfg, world, strategy
        self.dense = strategy == "dense"
        rng = np.random.default_rng([cfg.seed, 1, STRATEGIES.index(strategy)])      # the random strategy's draws
        data = world.data
        self.model = MoE(cfg.experts, hidden=cfg.hidden, top_k=cfg.top_k)
        self.params = init_params(data.dim, data.classes, cfg.experts, cfg.hidden, np.random.default_rng(cfg.seed))
        self.expert_bytes = nbytes(self.params, expert_keys(0, cfg.hidden))
        self.gate_bytes = nbytes(self.params, GATE)
        probes = int(cfg.knob("probes", strategy)) if strategy in FITNESS_DRIVEN else 0
        budgeted = strategy == "aligned_budget"
        self.coord = AlignmentCoordinator(cfg.experts, config=CoordinatorConfig(
            tolerance=cfg.tolerance, seed=cfg.seed, time_limit=cfg.solver_time_limit, expert_cost=cfg.expert_cost,
            probes=probes, scorer={"mode": cfg.fitness_mode, "exploration": cfg.exploration},
            capacity={"max_capacity": cfg.max_capacity, "default_capacity": cfg.min_capacity,
                      "expert_bytes": self.expert_bytes},
            expert_memory=world.expert_memory.tolist() if budgeted else None, band=cfg.band,
            switch_penalty=cfg.knob("switch_penalty", strategy), min_group=cfg.min_group,
            over_provision=cfg.over_provision))
        self.assign = make_assign(strategy, rng, world.domains)
        self.routers: dict[int, Params] = {}
        self.last_experts: dict[int, list[int]] = {}
        self.trained_ever = np.zeros(cfg.experts, dtype=bool)
        self.clock = 0.0

    def round(self, r: int) -> dict[str, Any]:
        """Run round ``r``; its metrics row."""
        available = self.world.available(r)
        plan = self.plan(r, available)
        outcome = self.train(r, plan)
        trained = self.aggregate(r, outcome)
        row = self.evaluate(r, plan, outcome, trained)
        row.update(available=available.tolist(), planned=[int(pc.client_id) for pc in plan.clients if pc.experts],
                   dropped=outcome.dropped)
        return row

    def plan(self, r: int, available: np.ndarray) -> RoundPlan:
        cfg, world, data = self.cfg, self.world, self.world.data
        status = [{"client_id": int(c), "max_experts": int(world.capacity[c]),
                   "samples": int(cfg.local_epochs * len(world.train[c])), "throughput": float(world.speed[c]),
                   "bandwidth": float(world.bandwidth[c]), "memory": float(world.memory[c]),
                   "routing": routing_histogram(self.model, self.params, data.x_train[world.train[c]])}
                  for c in available]
        return self.coord.plan_round(r, status, assign=self.assign, deadline=cfg.deadline)

    def train(self, r: int, plan: RoundPlan) -> RoundOutcome:
        """Every planned client's local round, on the device clock."""
        cfg, world, data, model, params = self.cfg, self.world, self.world.data, self.model, self.params
        out = RoundOutcome()
        clock = RoundClock(cfg.deadline)
        drops = world.drops(r)
        own_router = cfg.router == "local" and not self.dense
        for pc in plan.clients:
            c, experts = int(pc.client_id), pc.experts
            if not experts:
                continue
            if drops[c]:
                clock.dropped()
                out.dropped.append(c)
                continue
            idx, val = world.train[c], world.val[c]
            x, y = data.x_train[idx], data.y_train[idx]
            fetched = self.gate_bytes + self.expert_bytes * (len(experts) + len(pc.probe))
            scored = [] if self.dense else \
                model.expert_scores(params, data.x_train[val], data.y_train[val], experts + pc.probe)
            if own_router and c not in self.routers:
                self.routers[c] = {k: params[k].copy() for k in GATE}
            local, rep = local_train(model, params, x, y, experts, cfg, world.local_rng(r, c),
                                     self.routers.get(c) if own_router else None)
            sent = nbytes(params, local)
            t = client_time(world.speed[c], world.bandwidth[c], fetched=fetched, sent=sent,
                            samples=cfg.local_epochs * len(idx) * len(experts) + len(val) * len(scored))
            finished = clock.finish(t)
            out.bytes_down += fetched
            if cfg.fitness == "heldout" and scored:
                for e, s in zip(rep["experts"], scored):
                    e.update(mean_loss=s["mean_loss"], accuracy=s["accuracy"])
            out.reports.append({"client_id": c, "finished": finished, "train_seconds": t.train,
                                "download_seconds": t.transfer, "bytes_down": fetched,
                                "bytes_up": sent if finished else 0, "experts": rep["experts"],
                                "probes": scored[len(experts):], "routing": routing_histogram(model, params, x)})
            if not finished:
                out.late += 1
                continue
            out.bytes_up += sent
            weights = {e: float(len(idx)) for e in experts} if self.dense else \
                {e["expert"]: e["samples"] for e in rep["experts"]}          # dense: plain FedAvg weights
            out.updates.append((local, float(len(idx)), weights))
            self.last_experts[c] = experts
        out.seconds = clock.seconds
        return out

    def aggregate(self, r: int, out: RoundOutcome) -> np.ndarray:
        """Average the finished updates into the global model (under a privacy floor, an expert
        that fewer than ``min_group`` finished updates reached keeps its arrays, and so does the
        gate when fewer than that finished); clients per expert this round."""
        updates, out.held_back = floor_filter(out.updates, self.cfg.min_group)
        self.params, _ = average_by_owner(self.params, updates)
        summary = self.coord.observe_round(r, out.reports)
        trained = np.array(summary.expert_clients)
        self.trained_ever |= trained > 0
        self.clock += out.seconds
        return trained

    def evaluate(self, r: int, plan: RoundPlan, out: RoundOutcome, trained: np.ndarray) -> dict[str, Any]:
        cfg, data, model, params = self.cfg, self.world.data, self.model, self.params
        mask = self.trained_ever if self.trained_ever.any() else None
        acc = float((model.predict(params, data.x_test, mask) == data.y_test).mean())
        personal = []
        for c, e in self.last_experts.items():
            view = {**params, **self.routers[c]} if c in self.routers else params
            val = self.world.val[c]
            personal.append(float((model.predict(view, data.x_train[val], _mask(cfg.experts, e)) ==
                                   data.y_train[val]).mean()))
        return {"strategy": self.strategy, "round": r, "accuracy": acc,
                "personalised_accuracy": float(np.mean(personal)) if personal else math.nan,
                "load_cv": cv(trained), "planned_cv": plan.planned_cv, "solve_ms": 1000 * plan.solve_seconds,
                "fallback": self.assign is None and fallback(plan),
                "bytes_down": out.bytes_down, "bytes_up": out.bytes_up, "clients": len(out.updates),
                "late": out.late, "held_back": out.held_back,
                "experts_per_client": float(np.mean([len(pc.experts) for pc in plan.clients]))
                if plan.clients else 0.0,
                "round_seconds": out.seconds, "sim_seconds": self.clock,
                "nmi": routing_nmi(model, params, data, self.trained_ever),
                "untrained": int((~self.trained_ever).sum()), "load": trained.astype(int).tolist()}


def run_strategy(cfg: SimConfig, world: World, strategy: str, progress: Optional[Progress] = None) -> list[dict]:
    """Train with one strategy; one metrics row per round."""
    run = StrategyRun(cfg, world, strategy)
    rows = []
    for r in range(cfg.rounds):
        if progress:
            progress.step(f"{strategy} round {r + 1}/{cfg.rounds}")
        rows.append(run.round(r))
    return rows


def floor_filter(updates: list[tuple[Params, float, dict[int, float]]], m: int):
    """The updates without the arrays of experts fewer than ``m`` of them trained (and without the
    shared arrays when fewer than ``m`` finished); and how many expert updates were dropped."""
    few, shared = below_floor(Counter(j for _, _, per in updates for j in per), len(updates), m)
    if not few and not shared:
        return updates, 0
    kept = [({k: v for k, v in arrays.items()
              if not ((expert_of(k) is None and shared) or expert_of(k) in few)}, w, per)
            for arrays, w, per in updates]
    return kept, sum(few.values())


def _mask(E: int, experts: list[int]) -> np.ndarray:
    m = np.zeros(E, dtype=bool)
    m[experts] = True
    return m
