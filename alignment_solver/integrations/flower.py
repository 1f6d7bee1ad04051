"""Flower plug-in: an aligned strategy on Flower's Message API, and client-side helpers.

Parameters travel as one ``ArrayRecord`` whose keys name their owner
(:mod:`alignment_solver.integrations.units`): ``...experts.{j}.<name>`` (a PyTorch
``nn.ModuleList`` called ``experts``, in any MoE layer) or ``expert{j}.<name>`` belongs to expert
``j``; every other key is shared.  ``expert_of`` replaces the patterns; ``units="layer"`` makes
each (layer, expert) its own unit.  A model in which no key belongs to an expert is refused with
a ValueError at the first ``configure_train``.  Each round ``AlignedStrategy`` sends each node only
the shared arrays and its own units; replies carry back the arrays it received and trained and a
``MetricRecord`` with these keys (lists follow the order of ``experts``):

=====================  =====================================================================
``num-examples``       local training samples (weight of the shared arrays)
``experts``            list of the unit ids it trained (a subset of ``config["experts"]``)
``expert-samples``     samples routed to each of those units (their averaging weights; 0 allowed)
``expert-loss``        mean loss on those samples, per unit
``expert-accuracy``    accuracy on those samples, per unit
``train-seconds``      wall time of local training (and ``download-seconds``, optional)
``max-experts``        optional: most experts it will take next round (capacity report)
``routing``            optional: samples its gate routes to each unit (cold-start prior)
=====================  =====================================================================

Other metric keys are ignored.  Evaluate replies carry ``num-examples``, ``accuracy`` and ``loss``.
Before a node's first round the strategy sends it a ``QUERY`` message; a ClientApp with a query
handler answers with a ``ConfigRecord`` ``"capacity"`` holding what its node config declares
(``max-experts``, ``label``, ``routing``: see :func:`capacity_reply`).  A node without a query
handler starts at the profiler's default.

Every reply is checked by :mod:`alignment_solver.integrations.replies` (the same code the
NVFlare adapter uses) against the round's plan and the model's schema; a reply that fails is
rejected, logged with its reason and counted as a failed client, and the round goes on.

:func:`train_reply` builds such a reply for the numpy MoE of :mod:`alignment_solver.training`;
:mod:`alignment_solver.integrations.torch` does it for a PyTorch model in a few lines.
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
from ..errors import ReplyError
from ..load_monitor import cv
from ..state import write_atomic
from .local import evaluate_arrays, train_arrays
from .replies import (AggregationConfig, Reply, ReplyChecker, aggregate, capacity_report, changed_experts,
                      check_declaration, check_evaluation, held_back)
from .units import UnitMap

def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def array_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the array payloads of ``messages`` (their ``ArrayRecord`` contents)."""
    total = 0
    for msg in messages:
        if msg.has_error():
            continue
        for record in msg.content.array_records.values():
            total += sum(len(a.data) for a in record.values())
    return total


class AlignedStrategy(Strategy):
    """Client-expert alignment for federated MoE training, as a Flower strategy.

    Contract, per round ``r``:

    - ``configure_train``: on the first call the model's keys are mapped to units
      (:class:`~alignment_solver.integrations.units.UnitMap`; ValueError if no key belongs to an
      expert).  The connected nodes (sorted by id, so a seed fixes the plan) are the available
      clients.  A node never seen is first asked for its declared capacity, label and routing
      (one ``QUERY`` message, ``query_timeout`` seconds; no answer: the profiler's default); later
      its last capacity report (``max-experts``, ``routing`` from its previous reply) is passed on.
      ``AlignmentCoordinator.plan_round`` decides; each node with units gets its own ``TRAIN``
      message: a fresh ``ConfigRecord`` (the round settings plus ``experts`` and ``units``) and an
      ``ArrayRecord`` with the shared arrays and only its units' arrays.
    - ``aggregate_train``: each reply is validated (``ReplyChecker``); rejected replies are
      logged with the reason and kept in ``history[r]["rejected"]`` (error replies, whose source
      may be the SuperLink rather than the node, in ``history[r]["errors"]``).  Per unit, the accepted
      replies that trained it are combined (``aggregation``: weighted mean by
      ``expert-samples``, median or trimmed mean, optional update clipping); a unit nobody
      trained keeps its arrays; shared arrays are combined over all accepted replies by
      ``num-examples``.  A node's weight is capped at the ``num-examples`` of its first accepted
      reply (and every claim at ``aggregation.max_examples``).  Accepted replies become
      ``observe_round`` reports; planned nodes without one (no reply, an error, rejected) are
      dropouts.  A round without any accepted reply leaves the model unchanged and logs so.
      The coordinator state is checkpointed to ``state_path``; a strategy started on an existing
      state continues its round numbers (Flower's round ``r`` is coordinator round
      ``r + offset``).
    - ``configure_evaluate`` / ``aggregate_evaluate``: the full model to every node (or
      ``fraction_evaluate`` of them); ``accuracy`` and ``loss`` averaged by ``num-examples``.

    ``num_experts`` counts experts per MoE layer; with ``units="layer"`` the coordinator plans
    ``layers * num_experts`` units, at least one of each layer per training node.  ``history``
    keeps, per round, the plan (each node with its readable ``label``), what each node said it
    trained and the aggregate metrics; it is written as JSON to ``history_path`` (if given) after
    every step.
    """

    def __init__(self, *, num_experts: int, config: Optional[CoordinatorConfig] = None,
                 state_path: Optional[str] = None, fraction_evaluate: float = 1.0, min_nodes: int = 1,
                 train_config: Optional[dict[str, Any]] = None, deadline: Optional[float] = None,
                 history_path: Optional[str] = None, aggregation: Optional[AggregationConfig] = None,
                 expert_of: Optional[Callable[[str], Optional[int]]] = None, units: str = "expert",
                 query_timeout: float = 30.0) -> None:
        if units not in ("expert", "layer"):
            raise ValueError(f"units must be one of ['expert', 'layer']; got {units!r}")
        if units == "layer" and expert_of is not None:
            raise ValueError("units='layer' reads each key's layer itself; a custom expert_of works with units='expert'")
        if not (isinstance(query_timeout, (int, float)) and 0 <= query_timeout < float("inf")):
            raise ValueError(f"query_timeout must be a number of seconds >= 0; got {query_timeout!r}")
        self.config = config or CoordinatorConfig()
        self.coordinator: Optional[AlignmentCoordinator] = None
        self.num_experts = num_experts
        self.units = units
        self.state_path = state_path
        self.fraction_evaluate = fraction_evaluate
        self.min_nodes = min_nodes
        self.train_config = dict(train_config or {})
        self.deadline = deadline
        self.custom_expert_of = expert_of
        self.unit_map: Optional[UnitMap] = None
        self.query_timeout = float(query_timeout)
        self.history_path = history_path
        self.aggregation = aggregation or AggregationConfig()
        self.reports: dict[int, dict[str, Any]] = {}        # node id -> last capacity report
        self.declared: dict[int, dict[str, Any]] = {}       # node id -> what its configuration declared
        self.labels: dict[int, str] = {}                    # node id -> readable label
        self.weight_caps: dict[str, float] = {}             # node id -> num-examples of its first accepted reply
        self.current: dict[str, np.ndarray] = {}
        self.history: dict[int, dict[str, Any]] = {}
        self.sent: dict[int, dict[int, Message]] = {}       # round -> node -> the TRAIN message it was sent
        self.aggregated: set[int] = set()
        self.offset = 0
        if units == "expert":
            self._open_coordinator(num_experts, None)

    def _open_coordinator(self, units: int, groups: Optional[list[int]]) -> None:
        config = self.config if groups is None else self.config.model_copy(update={"unit_groups": groups})
        if self.state_path and Path(self.state_path).exists():
            self.coordinator = AlignmentCoordinator.load(self.state_path, num_experts=units)
        else:
            self.coordinator = AlignmentCoordinator(units, config=config)
        # Flower numbers each run's rounds from 1; a restarted server continues the coordinator's.
        done = max(self.coordinator.last_round, -1 if self.coordinator.pending is None
                   else self.coordinator.pending["round"])
        self.offset = done + 1

    def expert_of(self, key: str) -> Optional[int]:
        """The unit owning ``key`` (None: shared); known from the first ``configure_train`` on."""
        if self.unit_map is None:
            raise RuntimeError("the unit map is built from the model at the first configure_train")
        return self.unit_map.unit_of(key)

    def _map_units(self, arrays: dict[str, np.ndarray]) -> None:
        """Map the model's keys to units once; ValueError (never a silent FedAvg) if none maps."""
        if self.unit_map is not None:
            return
        self.unit_map = UnitMap(arrays, units=self.units, expert_of=self.custom_expert_of,
                                num_experts=self.num_experts)
        if self.coordinator is None:
            self._open_coordinator(self.unit_map.num_units, self.unit_map.groups)
        log(INFO, "AlignedStrategy: %d units (%s), %d layer(s), %d shared arrays", self.unit_map.num_units,
            self.units, self.unit_map.num_layers, len(self.unit_map.shared_keys()))

    def summary(self) -> None:
        cfg = self.config
        log(INFO, "\t├──> AlignedStrategy: %d experts per layer (units: %s), tolerance %.2f, backend %s, soft band %s",
            self.num_experts, self.units, cfg.tolerance, cfg.backend, cfg.soft)
        log(INFO, "\t└──> state checkpoint: %s", self.state_path or "none")

    # ---- training ---------------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        for _ in range(600):
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.min_nodes:
                return nodes
            time.sleep(0.1)
        return sorted(int(n) for n in grid.get_node_ids())

    def _query(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes never seen what their configuration declares (capacity, label, routing)."""
        new = [n for n in nodes if n not in self.declared]
        send = getattr(grid, "send_and_receive", None)
        if not new or send is None or self.query_timeout <= 0:
            for n in new:
                self.declared[n] = {}
            return
        cfg = ConfigRecord({"num-experts": self.coordinator.E, "units": self.units})
        msgs = [Message(content=RecordDict({"config": cfg}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in new]
        answered = 0
        for reply in send(msgs, timeout=self.query_timeout):
            node = int(reply.metadata.src_node_id)
            if node not in new or node in self.declared:
                continue
            self.declared[node] = {}
            if reply.has_error():
                continue
            record = reply.content.get("capacity") if "capacity" in reply.content else None
            try:
                self.declared[node] = check_declaration(dict(record) if isinstance(record, ConfigRecord) else record,
                                                        self.coordinator.E)
                answered += 1
            except ReplyError as exc:
                log(WARNING, "configure_train: ignored the capacity declaration of node %s: %s", node, exc)
        for n in new:
            self.declared.setdefault(n, {})
        log(INFO, "configure_train: %d of %d new nodes declared their capacity", answered, len(new))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        self._map_units(self.current)
        nodes = self._wait_for_nodes(grid)
        self._query(grid, nodes)
        statuses = []
        for node in nodes:
            first = self.declared.get(node, {})
            if "label" in first:
                self.labels[node] = first["label"]
            status: dict[str, Any] = {"client_id": node, "label": self.labels.get(node)}
            if node in self.reports:
                status.update(self.reports[node])
            else:
                status.update({k: v for k, v in first.items() if k != "label"})
            statuses.append(status)
        replan = self.coordinator.pending is not None
        if replan:
            log(WARNING, "configure_train: round %s was planned and never aggregated; planning round %d instead",
                self.coordinator.pending["round"], server_round)
        plan = self.coordinator.plan_round(server_round + self.offset, statuses, deadline=self.deadline,
                                           replan=replan)
        shared = {k: v for k, v in self.current.items() if self.expert_of(k) is None}
        messages = []
        planned = {}
        for pc in plan.clients:
            if not pc.experts:
                continue
            mine = {k: v for k, v in self.current.items() if self.expert_of(k) in pc.experts}
            cfg = ConfigRecord({**dict(config), **self.train_config, "server-round": server_round,
                                "experts": [int(e) for e in pc.experts], "units": self.units})
            content = RecordDict({"arrays": to_record({**shared, **mine}), "config": cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=int(pc.client_id)))
            planned[str(pc.client_id)] = {"experts": pc.experts, "capacity": pc.capacity, "label": pc.label}
        self.sent = {r: m for r, m in self.sent.items() if r >= server_round - 1}
        self.sent[server_round] = {int(m.metadata.dst_node_id): m for m in messages}
        self.aggregated.discard(server_round)
        self.history[server_round] = {"nodes": nodes, "plan": planned, "status": plan.status,
                                      "planned_load": plan.planned_load, "bytes_down": array_bytes(messages),
                                      "labels": {str(n): self.labels[n] for n in nodes if n in self.labels}}
        if self.state_path:
            self.coordinator.save(self.state_path)
        log(INFO, "configure_train: planned %d of %d nodes, planned load %s (%s)", len(messages), len(nodes),
            plan.planned_load, plan.status)
        return messages

    def _reply(self, msg: Message) -> Reply:
        """A Flower reply as a framework-neutral :class:`Reply` (records of the wrong type stay as-is)."""
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            return Reply(node, error=str(msg.error.reason))
        content = msg.content
        arrays = content.get("arrays") if "arrays" in content else None
        metrics = content.get("metrics") if "metrics" in content else None
        if not isinstance(arrays, ArrayRecord):
            return Reply(node, error=f"'arrays' must be an ArrayRecord; got {type(arrays).__name__}")
        if not isinstance(metrics, MetricRecord):
            return Reply(node, error=f"'metrics' must be a MetricRecord; got {type(metrics).__name__}")
        try:
            return Reply(node, arrays=to_numpy(arrays), metrics=dict(metrics))
        except Exception as exc:           # an Array that does not deserialise is the client's fault
            return Reply(node, error=f"arrays record cannot be read: {type(exc).__name__}: {exc}")

    def _genuine(self, server_round: int, replies: list[Message]) -> tuple[list[Message], dict[str, str]]:
        """Replies that answer the very message this round sent their node; the others with why."""
        sent = self.sent.get(server_round, {})
        genuine, foreign = [], []
        for m in replies:
            node = int(m.metadata.src_node_id)
            expected = sent.get(node)
            if expected is None:
                foreign.append((node, f"node {node} was sent no training message in round {server_round}"))
            elif m.metadata.reply_to_message_id != expected.metadata.message_id:
                foreign.append((node, f"is not a reply to the message round {server_round} sent node {node}"))
            else:
                genuine.append(m)
        honest = {int(m.metadata.src_node_id) for m in genuine}
        return genuine, {(str(n) if n not in honest else f"{n} (foreign)"): why for n, why in foreign}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        pending = None if self.coordinator is None or self.coordinator.pending is None \
            else self.coordinator.pending["round"]
        if server_round not in self.sent or server_round in self.aggregated or pending != server_round + self.offset:
            log(WARNING, "aggregate_train: round %d was not configured by this strategy or is already aggregated; "
                "its %d replies are ignored", server_round, len(replies))
            return None, None
        self.aggregated.add(server_round)
        plan = self.history.get(server_round, {}).get("plan", {})
        checker = ReplyChecker(self.current, self.coordinator.E, owner=self.expert_of, config=self.aggregation)
        errors = [f"{m.error.code}: {m.error.reason}" for m in replies if m.has_error()]
        for reason in errors:               # the error's source is the SuperLink, not always the node
            log(WARNING, "aggregate_train: round %d: a reply is an error: %s", server_round, reason)
        genuine, foreign = self._genuine(server_round, [m for m in replies if not m.has_error()])
        checked = checker.check_round([self._reply(m) for m in genuine],
                                      {node: p["experts"] for node, p in plan.items()}, self.weight_caps)
        checked.rejected.update(foreign)
        for node, reason in checked.rejected.items():
            log(WARNING, "aggregate_train: round %d: rejected the reply of node %s: %s", server_round, node, reason)
        received = {}
        for rep in checked.accepted:
            node = int(rep.client_id)
            self.weight_caps.setdefault(str(node), float(rep.num_examples))
            self.reports[node] = capacity_report(rep)
            received[str(node)] = {"experts": [e.expert for e in rep.report.experts], "keys": sorted(rep.arrays)}
        summary = self.coordinator.observe_round(server_round + self.offset, [rep.report for rep in checked.accepted])
        new, trained_set = aggregate(self.current, checked.accepted, self.expert_of, self.aggregation)
        trained = sorted(trained_set)
        changed = changed_experts(self.current, new, self.expert_of)
        entry = self.history.setdefault(server_round, {})
        held = held_back(checked.accepted, self.aggregation)
        if held:
            entry["held_back"] = held
            log(WARNING, "aggregate_train: round %d: privacy floor %d: kept the arrays of experts %s (accepted "
                "replies per expert) %s", server_round, held["min_group"], held.get("experts", {}),
                f"and the shared arrays ({held['shared']} accepted replies)" if "shared" in held else "")
        entry.update(bytes_up=array_bytes(replies), received=received, rejected=checked.rejected, errors=errors, dropouts=summary.dropouts,
                     trained_experts=trained, changed_experts=changed, load=summary.expert_clients,
                     load_cv=cv(np.array(summary.expert_clients)), mean_accuracy=summary.mean_accuracy)
        if self.state_path:
            self.coordinator.save(self.state_path)
        if self.history_path:
            self.write_history(self.history_path)
        if not checked.accepted:
            log(WARNING, "aggregate_train: round %d: NO VALID REPLY (%d planned, %d rejected, %d sent nothing); "
                "the global model is unchanged", server_round, len(plan), len(checked.rejected),
                len(summary.dropouts) - len(checked.rejected))
            return None, None
        if summary.dropouts:
            log(INFO, "aggregate_train: round %d: %d planned nodes failed (no reply, an error or rejected): %s", server_round,
                len(summary.dropouts), summary.dropouts)
        self.current = new
        metrics = MetricRecord({"nodes": len(checked.accepted), "dropouts": len(summary.dropouts),
                                "rejected": len(checked.rejected),
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
        """Accuracy and loss averaged by ``num-examples`` over valid replies; invalid ones are logged."""
        total, acc, loss = 0.0, 0.0, 0.0
        for msg in replies:
            if msg.has_error():
                continue
            m = msg.content.get("metrics") if "metrics" in msg.content else None
            try:
                n, a, lo = check_evaluation(m if isinstance(m, MetricRecord) else None, self.aggregation.max_examples)
            except ReplyError as exc:
                log(WARNING, "aggregate_evaluate: round %d: rejected the reply of node %s: %s", server_round,
                    msg.metadata.src_node_id, exc)
                continue
            total += n
            acc += n * a
            loss += n * lo
        if total == 0:
            return None
        out = {"accuracy": acc / total, "loss": loss / total}
        self.history.setdefault(server_round, {})["evaluate"] = out
        if self.history_path:
            self.write_history(self.history_path)
        return MetricRecord(out)

    def write_history(self, path: str | Path) -> None:
        """Save ``history`` as JSON (atomically: a reader never sees half a file)."""
        write_atomic(path, json.dumps({str(k): v for k, v in sorted(self.history.items())}, indent=1, default=float))


# ---- client side ------------------------------------------------------------------------------
def declared_capacity(node_config: Any) -> dict[str, Any]:
    """What a node's configuration declares: ``max-experts``, ``label`` and ``routing``.

    ``label`` is the config's ``label``, else ``partition-{partition-id}``; ``routing`` is a
    comma-separated string of numbers (node config values are scalars).  Keys that are absent are
    left out; the server checks the values.
    """
    cfg = dict(node_config or {})
    out: dict[str, Any] = {}
    if "max-experts" in cfg:
        out["max-experts"] = int(cfg["max-experts"])
    if "label" in cfg:
        out["label"] = str(cfg["label"])
    elif "partition-id" in cfg:
        out["label"] = f"partition-{cfg['partition-id']}"
    if "routing" in cfg:
        out["routing"] = [float(v) for v in str(cfg["routing"]).split(",") if v.strip()]
    return out


def capacity_reply(msg: Message, context: Any, *, max_experts: Optional[int] = None) -> Message:
    """The answer to the strategy's capacity ``QUERY``: a ``ConfigRecord`` ``"capacity"`` built by
    :func:`declared_capacity` from ``context.node_config`` (``max_experts``, if given, wins).  Use it
    as the ClientApp's query handler."""
    declared = declared_capacity(context.node_config)
    if max_experts is not None:
        declared["max-experts"] = int(max_experts)
    return Message(content=RecordDict({"capacity": ConfigRecord(declared)}), reply_to=msg)


def train_reply(msg: Message, x: np.ndarray, y: np.ndarray, *, num_experts: int, hidden: int = 0, top_k: int = 2,
                lr: float = 0.5, epochs: int = 2, batch_size: int = 32, max_experts: Optional[int] = None,
                seed: int = 0) -> Message:
    """Train the received gate and experts of the numpy MoE on ``(x, y)`` and build the reply."""
    cfg_record = msg.content["config"]
    local, metrics = train_arrays(to_numpy(msg.content["arrays"]), [int(e) for e in cfg_record["experts"]], x, y,
                                  num_experts=num_experts, server_round=int(cfg_record.get("server-round", 0)),
                                  hidden=hidden, top_k=top_k, lr=lr, epochs=epochs, batch_size=batch_size,
                                  max_experts=max_experts, seed=seed)
    return Message(content=RecordDict({"arrays": to_record(local), "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate_reply(msg: Message, x: np.ndarray, y: np.ndarray, *, num_experts: int, hidden: int = 0,
                   top_k: int = 2) -> Message:
    """Evaluate the full received model on ``(x, y)``: accuracy, loss and num-examples."""
    metrics = evaluate_arrays(to_numpy(msg.content["arrays"]), x, y, num_experts=num_experts, hidden=hidden,
                              top_k=top_k)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
