"""Flower plug-in: an aligned strategy on Flower's Message API, and client-side helpers.

Parameters travel as one ``ArrayRecord`` whose keys name their owner
(:mod:`alignment_solver.integrations.units`): ``...experts.{j}.<name>`` (a PyTorch
``nn.ModuleList`` called ``experts``, in any MoE layer) or ``expert{j}.<name>`` belongs to expert
``j``; a fused parameter with a leading expert axis held by a module called ``experts``
(transformers 5: ``...mlp.experts.gate_up_proj`` of shape ``(E, 2I, H)``), or one that
``expert_axes={regex: axis}`` declares, travels as one array per expert under the slice key
``...gate_up_proj[j]``; every other key is shared.  ``expert_of`` replaces the patterns;
``units="layer"`` makes each (layer, expert) its own unit.  A model in which no key belongs to an
expert is refused with a ValueError at the first ``configure_train``.  Flower hands the strategy
the full model and gets the full model back (``aggregate_train``, evaluation messages); only
``TRAIN`` messages and their replies carry slices.  Each round ``AlignedStrategy`` sends each node
only the shared arrays and its own units (``config``: ``experts``, ``units``, ``num-experts`` =
experts per MoE layer, and ``expert-axes`` as JSON when declared, so a client rebuilds the same
map); replies carry back the arrays it received and trained and a ``MetricRecord`` with these keys
(lists follow the order of ``experts``):

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
Before a node's first round the strategy sends it a ``QUERY`` message (config: ``num-experts``
per layer, ``num-units`` planned, ``units``); a ClientApp with a query handler answers with a
``ConfigRecord`` ``"capacity"`` holding what its node config declares (``max-experts``,
``label``, ``routing`` with ``num-units`` entries: see :func:`capacity_reply`).  A node without a query
handler starts at the profiler's default (one warning line on the server; Flower's node side
still logs the ClientApp's ``ValueError`` with its traceback, which the server cannot prevent).

Every reply is checked by :mod:`alignment_solver.integrations.replies` (the same code the
NVFlare adapter uses) against the round's plan and the model's schema; a reply that fails is
rejected, logged with its reason and counted as a failed client, and the round goes on.  A node
whose ClientApp raised sends an error reply: its exception (type and message, read from
Flower's ``Error.reason``) is logged and recorded.  After ``max_failed_rounds`` consecutive rounds
without a valid reply the strategy raises :class:`TrainingFailedError` naming the most frequent
reason; under ``flwr run`` the run then ends with status ``finished:failed`` and that message
(``flwr ls``), though ``flwr run --stream`` itself exits 0 (Flower's CLI does not pass the
status on); ``run_simulation`` raises it.

:func:`train_reply` builds such a reply for the numpy MoE of :mod:`alignment_solver.training`;
:mod:`alignment_solver.integrations.torch` does it for a PyTorch model in a few lines.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..coordinator import AlignmentCoordinator, CoordinatorConfig
from ..errors import ReplyError, TrainingFailedError
from ..load_monitor import cv
from ..state import write_atomic
from .local import evaluate_arrays, train_arrays
from .replies import (AggregationConfig, Reply, ReplyChecker, aggregate, capacity_report, changed_experts,
                      check_declaration, check_evaluations, evaluation_mean, failure_message, held_back)
from .units import UnitMap, check_expert_axes


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def array_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the array payloads of ``messages`` (their ``ArrayRecord`` contents, as serialised)."""
    total = 0
    for msg in messages:
        if msg.has_error():
            continue
        for record in msg.content.array_records.values():
            total += sum(len(a.data) for a in record.values())
    return total


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_REASON = re.compile(r"^<class '(?P<cls>[^']+)'>:<'(?P<body>.*)'>$", re.S)
_EXCEPTION_LINE = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*(?:\([\w.]+\))?): ?(?P<msg>.*)$")
MAX_REASON = 500


def error_text(reason: Any) -> str:
    """The node-side exception of a Flower error reply, as ``"Type: message"`` (at most 500 characters).

    Flower 1.42 sets ``Error.reason`` to ``"<class 'ValueError'>:<'message'>"`` for a ClientApp
    that raised in a deployment, and to the Ray task error with the whole traceback in the
    simulation runtime (the original exception is the first one of the chain).  Any other reason
    (a SuperLink error: node unavailable, message expired) is returned as it is.
    """
    text = _ANSI.sub("", str(reason)).strip()
    m = _FLOWER_REASON.match(text)
    if m:
        cls, body = m.group("cls"), m.group("body").strip()
        if "Traceback" in body or "\n  File " in body:
            first = body.split("The above exception was the direct cause of the following exception:")[0]
            lines = [ln for ln in first.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
            hit = next((e for ln in reversed(lines) if (e := _EXCEPTION_LINE.match(ln))), None)
            if hit is not None:
                text = f"{hit.group('cls').rsplit('.', 1)[-1]}: {hit.group('msg')}"
            else:
                text = f"{cls.rsplit('.', 1)[-1]}: {lines[-1] if lines else body}"
        else:
            text = f"{cls.rsplit('.', 1)[-1]}: {body}"
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


class AlignedStrategy(Strategy):
    """Client-expert alignment for federated MoE training, as a Flower strategy.

    Contract, per round ``r``:

    - ``configure_train``: on the first call the model's arrays are mapped to units
      (:class:`~alignment_solver.integrations.units.UnitMap` with ``units``, ``expert_of``,
      ``num_experts`` and ``expert_axes``; ValueError if no key belongs to an expert); fused
      parameters are split into one transport array per expert (slice key ``K[j]``), and
      ``current`` holds these transport arrays.  The connected nodes (sorted by id, so a seed
      fixes the plan) are the available clients.  A node never seen is first asked for its
      declared capacity, label and routing (one ``QUERY`` message to all new nodes, answered as
      soon as every one replied, at most ``query_timeout`` seconds; a node that does not answer
      starts at the profiler's default, and the log names it and why); later its last capacity
      report (``max-experts``, ``routing`` from its previous reply) is passed on.
      ``AlignmentCoordinator.plan_round`` decides; each node with units gets its own ``TRAIN``
      message: a fresh ``ConfigRecord`` (the round settings plus ``experts``, ``units``,
      ``num-experts`` and ``expert-axes``) and an ``ArrayRecord`` with the shared arrays and only
      its units' transport arrays.
    - ``aggregate_train``: each reply is validated (``ReplyChecker``, per transport array);
      rejected replies are logged with the reason and kept in ``history[r]["rejected"]``; error
      replies (a ClientApp that raised; or from the SuperLink: node unavailable) are logged with
      the node-side exception (:func:`error_text`) and kept in ``history[r]["errors"]``.  Per
      unit, the accepted replies that trained it are combined (``aggregation``: weighted mean by
      ``expert-samples``, median or trimmed mean, optional update clipping); a unit nobody
      trained keeps its arrays; shared arrays are combined over all accepted replies by
      ``num-examples``.  A node's weight is capped at the ``num-examples`` of its first accepted
      reply (and every claim at ``aggregation.max_examples``).  Accepted replies become
      ``observe_round`` reports; planned nodes without one (no reply, an error, rejected) are
      dropouts.  The return value is the JOINED full model.  A round without any accepted reply
      leaves the model unchanged, returns ``(None, None)`` and logs why; after
      ``max_failed_rounds`` such rounds in a row (or when every round of a shorter run failed)
      it raises :class:`TrainingFailedError` with the most frequent reason (``None``: never).
      The coordinator state is checkpointed to ``state_path``; a strategy started on an
      existing state continues its round numbers (Flower's round ``r`` is coordinator round
      ``r + offset``).
    - ``configure_evaluate`` / ``aggregate_evaluate``: federated evaluation sends the full model,
      so by default it runs only in the last round (known from :meth:`start`), plus every
      ``evaluate_every`` rounds if set, on ``fraction_evaluate`` of the connected nodes (drawn
      at random from ``config.seed`` and the round; 0: never).  Why: the full model to every
      node every round cost more than aligned training itself (12.8 MB against 9.0 MB in 5
      rounds, issue 35); a server-side ``evaluate_fn`` gives the per-round curve without
      traffic, and one federated evaluation at the end costs what one FedAvg round downloads.
      ``accuracy`` and ``loss`` are averaged by ``num-examples``.

    ``num_experts`` counts experts per MoE layer; with ``units="layer"`` the coordinator plans
    ``layers * num_experts`` units, at least one of each layer per training node.  ``history``
    keeps, per round, the plan (each node with its readable ``label``), what each node said it
    trained, the aggregate metrics, the training bytes (``bytes_down``, ``bytes_up``) and the
    evaluation bytes (``eval_bytes_down``, ``eval_bytes_up``) separately; it is written as JSON
    to ``history_path`` (if given) after every step.
    """

    def __init__(self, *, num_experts: int, config: Optional[CoordinatorConfig] = None,
                 state_path: Optional[str] = None, fraction_evaluate: float = 1.0,
                 evaluate_every: Optional[int] = None, min_nodes: int = 1,
                 train_config: Optional[dict[str, Any]] = None, deadline: Optional[float] = None,
                 history_path: Optional[str] = None, aggregation: Optional[AggregationConfig] = None,
                 expert_of: Optional[Callable[[str], Optional[int]]] = None, units: str = "expert",
                 expert_axes: Optional[Mapping[str, int]] = None, query_timeout: float = 120.0,
                 max_failed_rounds: Optional[int] = 3) -> None:
        if units not in ("expert", "layer"):
            raise ValueError(f"units must be one of ['expert', 'layer']; got {units!r}")
        if units == "layer" and expert_of is not None:
            raise ValueError("units='layer' reads each key's layer itself; a custom expert_of works with units='expert'")
        if not (isinstance(query_timeout, (int, float)) and 0 <= query_timeout < float("inf")):
            raise ValueError(f"query_timeout must be a number of seconds >= 0; got {query_timeout!r}")
        if not (isinstance(fraction_evaluate, (int, float)) and 0 <= fraction_evaluate <= 1):
            raise ValueError(f"fraction_evaluate must be a number in [0, 1]; got {fraction_evaluate!r}")
        if evaluate_every is not None and (not isinstance(evaluate_every, int) or isinstance(evaluate_every, bool)
                                           or evaluate_every < 1):
            raise ValueError(f"evaluate_every must be None (last round only) or an integer >= 1; got {evaluate_every!r}")
        if max_failed_rounds is not None and (not isinstance(max_failed_rounds, int)
                                              or isinstance(max_failed_rounds, bool) or max_failed_rounds < 1):
            raise ValueError(f"max_failed_rounds must be None (never stop) or an integer >= 1; got {max_failed_rounds!r}")
        self.config = config or CoordinatorConfig()
        self.coordinator: Optional[AlignmentCoordinator] = None
        self.num_experts = num_experts
        self.units = units
        self.state_path = state_path
        self.fraction_evaluate = float(fraction_evaluate)
        self.evaluate_every = evaluate_every
        self.min_nodes = min_nodes
        self.train_config = dict(train_config or {})
        self.deadline = deadline
        self.custom_expert_of = expert_of
        self.expert_axes = check_expert_axes(expert_axes)
        self.unit_map: Optional[UnitMap] = None
        self.query_timeout = float(query_timeout)
        self.max_failed_rounds = max_failed_rounds
        self.num_rounds: Optional[int] = None               # known from start()
        self.history_path = history_path
        self.aggregation = aggregation or AggregationConfig()
        self.reports: dict[int, dict[str, Any]] = {}        # node id -> last capacity report
        self.declared: dict[int, dict[str, Any]] = {}       # node id -> what its configuration declared
        self.labels: dict[int, str] = {}                    # node id -> readable label
        self.weight_caps: dict[str, float] = {}             # node id -> num-examples of its first accepted reply
        self.current: dict[str, np.ndarray] = {}            # transport arrays (fused parameters split)
        self.history: dict[int, dict[str, Any]] = {}
        self.sent: dict[int, dict[int, Message]] = {}       # round -> node -> the TRAIN message it was sent
        self.eval_asked: dict[int, list[int]] = {}          # round -> nodes sent an EVALUATE message
        self.aggregated: set[int] = set()
        self.failed: list[tuple[int, list[str]]] = []      # current run of failed rounds: (round, reasons)
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

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``Strategy.start``; the strategy also learns ``num_rounds`` (its last round)."""
        self.num_rounds = int(num_rounds)
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def expert_of(self, key: str) -> Optional[int]:
        """The unit owning transport key ``key`` (None: shared); known from the first ``configure_train`` on."""
        if self.unit_map is None:
            raise RuntimeError("the unit map is built from the model at the first configure_train")
        return self.unit_map.unit_of(key)

    def _map_units(self, arrays: dict[str, np.ndarray]) -> None:
        """Map the model's arrays to units once; ValueError (never a silent FedAvg) if none maps."""
        if self.unit_map is not None:
            return
        self.unit_map = UnitMap(arrays, units=self.units, expert_of=self.custom_expert_of,
                                num_experts=self.num_experts, expert_axes=self.expert_axes or None)
        if self.coordinator is None:
            self._open_coordinator(self.unit_map.num_units, self.unit_map.groups)
        um = self.unit_map
        fused = f", {len(um.fused)} fused parameters split by expert" if um.fused else ""
        log(INFO, "AlignedStrategy: %d units (%s), %d MoE layer(s), %d shared arrays%s", um.num_units,
            self.units, um.num_layers, len(um.shared_keys()), fused)

    def summary(self) -> None:
        cfg = self.config
        log(INFO, "\t├──> AlignedStrategy: %d experts per layer (units: %s), tolerance %.2f, backend %s, soft band %s",
            self.num_experts, self.units, cfg.tolerance, cfg.backend, cfg.soft)
        log(INFO, "\t├──> federated evaluation: %s", self._evaluation_schedule())
        log(INFO, "\t└──> state checkpoint: %s; stops after %s failed rounds in a row", self.state_path or "none",
            self.max_failed_rounds)

    def _evaluation_schedule(self) -> str:
        if self.fraction_evaluate <= 0:
            return "off"
        when = "the last round" + (f" and every {self.evaluate_every} rounds" if self.evaluate_every else "")
        return f"{when}, {self.fraction_evaluate:.0%} of the nodes"

    # ---- training ---------------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        for _ in range(600):
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.min_nodes:
                return nodes
            time.sleep(0.1)
        return sorted(int(n) for n in grid.get_node_ids())

    def _query(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes never seen what their configuration declares (capacity, label, routing); log
        who did not answer and why (no query handler: one line for all such nodes)."""
        new = [n for n in nodes if n not in self.declared]
        send = getattr(grid, "send_and_receive", None)
        if not new or send is None or self.query_timeout <= 0:
            for n in new:
                self.declared[n] = {}
            return
        cfg = ConfigRecord({"num-experts": int(self.num_experts), "num-units": int(self.coordinator.E),
                            "units": self.units})
        msgs = [Message(content=RecordDict({"config": cfg}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in new]
        started = time.monotonic()
        answered, no_handler, failed = [], [], {}
        for reply in send(msgs, timeout=self.query_timeout):    # returns as soon as every node replied
            node = int(reply.metadata.src_node_id)
            if node not in new or node in self.declared:
                continue
            self.declared[node] = {}
            if reply.has_error():
                why = error_text(reply.error.reason)
                if "No query function registered" in why:
                    no_handler.append(node)
                else:
                    failed[node] = why
                continue
            record = reply.content.get("capacity") if "capacity" in reply.content else None
            try:
                self.declared[node] = check_declaration(dict(record) if isinstance(record, ConfigRecord) else record,
                                                        self.coordinator.E)
                answered.append(node)
            except ReplyError as exc:
                failed[node] = f"ignored its capacity declaration: {exc}"
        silent = [n for n in new if n not in self.declared]
        for n in silent:
            self.declared[n] = {}
        log(INFO, "configure_train: %d of %d new nodes declared their capacity (%.1f s)", len(answered), len(new),
            time.monotonic() - started)
        if no_handler:
            log(WARNING, "configure_train: nodes %s have no query handler, so they start at the profiler's default "
                "capacity (register alignment_solver.integrations.flower.capacity_reply with @app.query(), or pass "
                "query_timeout=0 to skip the query)", no_handler)
        for node, why in failed.items():
            log(WARNING, "configure_train: node %s failed the capacity query: %s", node, why)
        if silent:
            log(WARNING, "configure_train: nodes %s did not answer the capacity query within query_timeout=%g s "
                "(a slow start-up, e.g. importing a large framework, or a lost node); they start at the "
                "profiler's default capacity", silent, self.query_timeout)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        full = to_numpy(arrays)
        self._map_units(full)
        self.current = self.unit_map.split(full)
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
        extra: dict[str, Any] = {"units": self.units, "num-experts": int(self.num_experts)}
        if self.expert_axes:
            extra["expert-axes"] = json.dumps(self.expert_axes)
        messages = []
        planned = {}
        for pc in plan.clients:
            if not pc.experts:
                continue
            mine = {k: v for k, v in self.current.items() if self.expert_of(k) in pc.experts}
            cfg = ConfigRecord({**dict(config), **self.train_config, "server-round": server_round,
                                "experts": [int(e) for e in pc.experts], **extra})
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
            return Reply(node, error=error_text(msg.error.reason))
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
        errors = {}                         # the error's source may be the SuperLink (node unavailable), not the node
        for m in replies:
            if m.has_error():
                errors[str(m.metadata.src_node_id)] = error_text(m.error.reason)
        for node, reason in errors.items():
            log(WARNING, "aggregate_train: round %d: node %s replied with an error: %s", server_round, node, reason)
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
        entry.update(bytes_up=array_bytes(replies), received=received, rejected=checked.rejected, errors=errors,
                     dropouts=summary.dropouts, trained_experts=trained, changed_experts=changed,
                     load=summary.expert_clients, load_cv=cv(np.array(summary.expert_clients)),
                     mean_accuracy=summary.mean_accuracy)
        if self.state_path:
            self.coordinator.save(self.state_path)
        if self.history_path:
            self.write_history(self.history_path)
        if not checked.accepted:
            self._failed_round(server_round, plan, errors, checked.rejected)
            return None, None
        self.failed = []
        if summary.dropouts:
            log(INFO, "aggregate_train: round %d: %d planned nodes failed (no reply, an error or rejected): %s", server_round,
                len(summary.dropouts), summary.dropouts)
        self.current = new
        metrics = MetricRecord({"nodes": len(checked.accepted), "dropouts": len(summary.dropouts),
                                "rejected": len(checked.rejected),
                                "load-cv": float(cv(np.array(summary.expert_clients))),
                                "train-accuracy": float(summary.mean_accuracy or 0.0)})
        return to_record(self.unit_map.join(new)), metrics

    def _failed_round(self, server_round: int, plan: Mapping[str, Any], errors: Mapping[str, str],
                      rejected: Mapping[str, str]) -> None:
        """Log a round without a valid reply; raise TrainingFailedError after ``max_failed_rounds`` in a row."""
        silent = [n for n in plan if n not in errors and n not in rejected]
        reasons = ([f"replied with an error: {why}" for why in errors.values()] + list(rejected.values())
                   + ["sent no reply before the round's timeout"] * len(silent))
        self.failed.append((server_round, reasons))
        top = Counter(reasons).most_common(1)
        log(WARNING, "aggregate_train: round %d: NO VALID REPLY (%d planned, %d rejected, %d errors, %d sent nothing); "
            "the global model is unchanged; %d failed round(s) in a row (max_failed_rounds=%s)%s", server_round,
            len(plan), len(rejected), len(errors), len(silent), len(self.failed), self.max_failed_rounds,
            f"; most frequent reason: {top[0][0]}" if top else "; no node was planned")
        limit = self.max_failed_rounds
        whole_run = self.num_rounds is not None and server_round >= self.num_rounds and len(self.failed) >= server_round
        if limit is not None and (len(self.failed) >= limit or whole_run):
            message = failure_message(self.failed, limit)
            log(ERROR, "AlignedStrategy: stopping: %s", message)
            raise TrainingFailedError(message)

    # ---- evaluation -------------------------------------------------------------------------
    def _evaluates(self, server_round: int) -> bool:
        if self.fraction_evaluate <= 0:
            return False
        last = self.num_rounds is not None and server_round == self.num_rounds
        return last or bool(self.evaluate_every and server_round % self.evaluate_every == 0)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The full model to ``fraction_evaluate`` of the nodes in the rounds that evaluate (see the class)."""
        entry = self.history.setdefault(server_round, {})
        entry["eval_bytes_down"] = 0
        if not self._evaluates(server_round):
            return []
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if not nodes:
            return []
        k = max(1, int(round(len(nodes) * self.fraction_evaluate)))
        if k < len(nodes):
            rng = np.random.default_rng([self.config.seed, server_round])
            nodes = sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))
        cfg = ConfigRecord({**dict(config), "server-round": server_round})
        messages = [Message(content=RecordDict({"arrays": arrays, "config": cfg}), message_type=MessageType.EVALUATE,
                            dst_node_id=n) for n in nodes]
        entry["eval_bytes_down"] = array_bytes(messages)
        self.eval_asked = {r: n for r, n in self.eval_asked.items() if r >= server_round - 1}
        self.eval_asked[server_round] = nodes
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Accuracy and loss over the valid replies (:func:`~.replies.check_evaluations`: a node asked
        this round, one reply each, ``num-examples`` capped like training weights), averaged by
        those capped weights; every rejected reply is logged with its reason."""
        replies = list(replies)
        entry = self.history.setdefault(server_round, {})
        entry["eval_bytes_up"] = array_bytes(replies)
        checked = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                checked.append(Reply(node, error=error_text(msg.error.reason)))
                continue
            m = msg.content.get("metrics") if "metrics" in msg.content else None
            checked.append(Reply(node, metrics=m if isinstance(m, MetricRecord) else None))
        accepted, rejected = check_evaluations(checked, self.eval_asked.get(server_round, []),
                                               self.aggregation.max_examples,
                                               weight_factor=self.aggregation.weight_factor,
                                               weight_caps=self.weight_caps)
        for node, reason in rejected.items():
            log(WARNING, "aggregate_evaluate: round %d: rejected the reply of node %s: %s", server_round, node, reason)
        if rejected:
            entry["eval_rejected"] = rejected
        mean = evaluation_mean(accepted)
        out = None if mean is None else {"accuracy": mean["accuracy"], "loss": mean["loss"]}
        if out is not None:
            entry["evaluate"] = out
        if self.history_path:
            self.write_history(self.history_path)
        return None if out is None else MetricRecord(out)

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
