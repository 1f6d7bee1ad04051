"""Flower plug-in: an aligned strategy on Flower's Message API, and a client-side helper.

Parameters travel as one ``ArrayRecord`` whose keys name their owner: a key
``expert{j}.<name>`` belongs to expert ``j`` (``expert_of`` can be replaced), every other key is
shared.  Each round ``AlignedStrategy`` sends each node only the shared arrays and its own
experts; replies carry back the arrays it trained and a ``MetricRecord`` with these keys:

=====================  =====================================================================
``num-examples``       local training samples (weight of the shared arrays)
``experts``            list of the expert ids it trained (must be the ones it was sent)
``expert-samples``     samples routed to each of those experts (their averaging weights)
``expert-loss``        mean loss on those samples, per expert
``expert-accuracy``    accuracy on those samples, per expert
``train-seconds``      wall time of local training (and ``download-seconds``, optional)
``max-experts``        optional: most experts it will take next round (capacity report)
``routing``            optional: samples its gate routes to each expert (cold-start prior)
=====================  =====================================================================

:func:`train_reply` builds such a reply for the numpy MoE of :mod:`alignment_solver.training`;
a PyTorch ClientApp does the same in a few lines: load the received keys into the model, train
the gate and the experts listed in ``config["experts"]`` (mask the others' gate logits), and
return ``ArrayRecord`` of those keys plus the metrics above.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..coordinator import AlignmentCoordinator, CoordinatorConfig
from ..load_monitor import cv
from ..training.model import average_by_owner, expert_of

def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class AlignedStrategy(Strategy):
    """Client-expert alignment for federated MoE training, as a Flower strategy.

    Contract, per round ``r``:

    - ``configure_train``: the connected nodes (sorted by id, so a seed fixes the plan) are the
      available clients; each node's last capacity report (``max-experts``, ``routing`` from its
      previous reply) is passed on, new nodes get the profiler's safe default.
      ``AlignmentCoordinator.plan_round`` decides; each node with experts gets its own ``TRAIN``
      message: a fresh ``ConfigRecord`` (the round settings plus ``experts``) and an
      ``ArrayRecord`` with the shared arrays and only its experts.
    - ``aggregate_train``: per expert, the weighted average (by ``expert-samples``) over the
      nodes that trained it; an expert nobody trained keeps its arrays; shared arrays are
      averaged over all replies by ``num-examples``.  Replies become ``observe_round`` reports;
      planned nodes that did not reply (or replied with an error) are dropouts, and the round
      completes with the rest.  The coordinator state is checkpointed to ``state_path``.
    - ``configure_evaluate`` / ``aggregate_evaluate``: the full model to every node (or
      ``fraction_evaluate`` of them); ``accuracy`` and ``loss`` averaged by ``num-examples``.

    ``history`` keeps, per round, the plan, what each node said it trained and the aggregate
    metrics; it is written as JSON to ``history_path`` (if given) after every step.
    """

    def __init__(self, *, num_experts: int, config: Optional[CoordinatorConfig] = None,
                 state_path: Optional[str] = None, fraction_evaluate: float = 1.0, min_nodes: int = 1,
                 train_config: Optional[dict[str, Any]] = None, deadline: Optional[float] = None,
                 history_path: Optional[str] = None,
                 expert_of: Callable[[str], Optional[int]] = expert_of) -> None:
        if state_path and Path(state_path).exists():
            self.coordinator = AlignmentCoordinator.load(state_path, num_experts=num_experts)
        else:
            self.coordinator = AlignmentCoordinator(num_experts, config=config)
        self.num_experts = num_experts
        self.state_path = state_path
        self.fraction_evaluate = fraction_evaluate
        self.min_nodes = min_nodes
        self.train_config = dict(train_config or {})
        self.deadline = deadline
        self.expert_of = expert_of
        self.history_path = history_path
        self.reports: dict[int, dict[str, Any]] = {}        # node id -> last capacity report
        self.current: dict[str, np.ndarray] = {}
        self.history: dict[int, dict[str, Any]] = {}

    def summary(self) -> None:
        cfg = self.coordinator.config
        log(INFO, "\t├──> AlignedStrategy: %d experts, tolerance %.2f, backend %s, soft band %s",
            self.num_experts, cfg.tolerance, cfg.backend, cfg.soft)
        log(INFO, "\t└──> state checkpoint: %s", self.state_path or "none")

    # ---- training ---------------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        for _ in range(600):
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.min_nodes:
                return nodes
            time.sleep(0.1)
        return sorted(int(n) for n in grid.get_node_ids())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        nodes = self._wait_for_nodes(grid)
        statuses = []
        for node in nodes:
            status: dict[str, Any] = {"client_id": node}
            rep = self.reports.get(node, {})
            if "max-experts" in rep:
                status["max_experts"] = int(rep["max-experts"])
            if rep.get("routing") and len(rep["routing"]) == self.num_experts:
                status["routing"] = [float(v) for v in rep["routing"]]
            statuses.append(status)
        plan = self.coordinator.plan_round(server_round, statuses, deadline=self.deadline)
        shared = {k: v for k, v in self.current.items() if self.expert_of(k) is None}
        messages = []
        planned = {}
        for pc in plan.clients:
            if not pc.experts:
                continue
            mine = {k: v for k, v in self.current.items() if self.expert_of(k) in pc.experts}
            cfg = ConfigRecord({**dict(config), **self.train_config, "server-round": server_round,
                                "experts": [int(e) for e in pc.experts]})
            content = RecordDict({"arrays": to_record({**shared, **mine}), "config": cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=int(pc.client_id)))
            planned[str(pc.client_id)] = {"experts": pc.experts, "capacity": pc.capacity}
        self.history[server_round] = {"nodes": nodes, "plan": planned, "status": plan.status,
                                      "planned_load": plan.planned_load}
        log(INFO, "configure_train: planned %d of %d nodes, planned load %s (%s)", len(messages), len(nodes),
            plan.planned_load, plan.status)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        updates = []
        reports, received = [], {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                log(WARNING, "aggregate_train: node %d replied with an error: %s", node, msg.error.reason)
                continue
            metrics = msg.content.get("metrics", MetricRecord())
            arrays = to_numpy(msg.content["arrays"])
            experts = [int(e) for e in metrics.get("experts", [])]
            updates.append((arrays, float(metrics.get("num-examples", 1)),
                            dict(zip(experts, metrics.get("expert-samples", [])))))
            self.reports[node] = {"max-experts": metrics.get("max-experts"), "routing": metrics.get("routing")}
            self.reports[node] = {k: v for k, v in self.reports[node].items() if v is not None}
            received[str(node)] = {"experts": experts, "keys": sorted(arrays)}
            reports.append({
                "client_id": node, "train_seconds": float(metrics.get("train-seconds", 0.0)),
                "download_seconds": float(metrics.get("download-seconds", 0.0)),
                "bytes_down": int(sum(v.nbytes for v in arrays.values())),
                "routing": [float(v) for v in metrics["routing"]] if "routing" in metrics else None,
                "experts": [{"expert": e, "samples": int(s), "mean_loss": float(lo), "accuracy": float(a)}
                            for e, s, lo, a in zip(experts, metrics.get("expert-samples", []),
                                                   metrics.get("expert-loss", []), metrics.get("expert-accuracy", []))]})
        planned = set(self.history.get(server_round, {}).get("plan", {}))
        reports = [r for r in reports if str(r["client_id"]) in planned]
        summary = self.coordinator.observe_round(server_round, reports)
        new, trained_set = average_by_owner(self.current, updates, self.expert_of)
        trained = sorted(trained_set)
        changed = sorted({j for k in new if (j := self.expert_of(k)) is not None
                          and not np.array_equal(new[k], self.current[k])})
        entry = self.history.setdefault(server_round, {})
        entry.update(received=received, dropouts=summary.dropouts, trained_experts=trained, changed_experts=changed,
                     load=summary.expert_clients, load_cv=cv(np.array(summary.expert_clients)),
                     mean_accuracy=summary.mean_accuracy)
        if self.state_path:
            self.coordinator.save(self.state_path)
        if self.history_path:
            self.write_history(self.history_path)
        if not updates:
            return None, None
        self.current = new
        metrics = MetricRecord({"nodes": len(reports), "dropouts": len(summary.dropouts),
                                "load-cv": float(cv(np.array(summary.expert_clients))),
                                "train-accuracy": float(summary.mean_accuracy or 0.0)})
        return to_record(new), metrics

    # ---- evaluation -------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0:
            return []
        nodes = sorted(int(n) for n in grid.get_node_ids())
        nodes = nodes[:max(1, int(round(len(nodes) * self.fraction_evaluate)))]
        cfg = ConfigRecord({**dict(config), "server-round": server_round})
        return [Message(content=RecordDict({"arrays": arrays, "config": cfg}), message_type=MessageType.EVALUATE,
                        dst_node_id=n) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        total, acc, loss = 0.0, 0.0, 0.0
        for msg in replies:
            if msg.has_error():
                continue
            m = msg.content.get("metrics", MetricRecord())
            n = float(m.get("num-examples", 0))
            total += n
            acc += n * float(m.get("accuracy", 0.0))
            loss += n * float(m.get("loss", 0.0))
        if total == 0:
            return None
        out = {"accuracy": acc / total, "loss": loss / total}
        self.history.setdefault(server_round, {})["evaluate"] = out
        if self.history_path:
            self.write_history(self.history_path)
        return MetricRecord(out)

    def write_history(self, path: str | Path) -> None:
        """Save ``history`` as JSON (atomically: a reader never sees half a file)."""
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.history.items())}, indent=1,
                                         default=float))
        tmp.replace(path)


# ---- client side ------------------------------------------------------------------------------
def train_reply(msg: Message, x: np.ndarray, y: np.ndarray, *, num_experts: int, hidden: int = 0, top_k: int = 2,
                lr: float = 0.5, epochs: int = 2, batch_size: int = 32, max_experts: Optional[int] = None,
                seed: int = 0) -> Message:
    """Train the received gate and experts of the numpy MoE on ``(x, y)`` and build the reply."""
    from ..training.model import MoE
    from ..training.simulate import SimConfig, local_train, routing_histogram

    params = to_numpy(msg.content["arrays"])
    cfg_record = msg.content["config"]
    experts = [int(e) for e in cfg_record["experts"]]
    model = MoE(num_experts, hidden=hidden, top_k=top_k)
    cfg = SimConfig(lr=lr, local_epochs=epochs, batch_size=batch_size, experts=num_experts,
                    max_capacity=min(3, num_experts), min_capacity=1)
    rng = np.random.default_rng([seed, int(cfg_record.get("server-round", 0))])
    started = time.perf_counter()
    local, rep = local_train(model, params, x, y, experts, cfg, rng)
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "num-examples": int(len(y)), "experts": experts,
        "expert-samples": [e["samples"] for e in rep["experts"]],
        "expert-loss": [e["mean_loss"] for e in rep["experts"]],
        "expert-accuracy": [e["accuracy"] for e in rep["experts"]],
        "train-seconds": float(seconds), "routing": routing_histogram(model, {**params, **local}, x),
        "received-keys": len(params)}
    if max_experts is not None:
        metrics["max-experts"] = int(max_experts)
    return Message(content=RecordDict({"arrays": to_record(local), "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate_reply(msg: Message, x: np.ndarray, y: np.ndarray, *, num_experts: int, hidden: int = 0,
                   top_k: int = 2) -> Message:
    """Evaluate the full received model on ``(x, y)``: accuracy, loss and num-examples."""
    from ..training.model import MoE

    params = to_numpy(msg.content["arrays"])
    model = MoE(num_experts, hidden=hidden, top_k=top_k)
    probs = model.forward(params, x)[0]
    loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
    acc = float((probs.argmax(axis=1) == y).mean())
    return Message(content=RecordDict({"metrics": MetricRecord({"accuracy": acc, "loss": loss,
                                                                 "num-examples": int(len(y))})}), reply_to=msg)
