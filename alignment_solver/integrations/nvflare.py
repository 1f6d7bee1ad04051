"""NVIDIA FLARE plug-in: an aligned server workflow on the ModelController API, and a client helper.

Parameters travel as the ``params`` dict of an ``FLModel``, keyed as in the Flower plug-in
(:mod:`alignment_solver.integrations.units`): ``...experts.{j}.<name>`` (PyTorch ``nn.ModuleList``)
or ``expert{j}.<name>`` belongs to expert ``j``; a fused parameter with a leading expert axis held
by a module called ``experts`` (transformers 5: ``...mlp.experts.gate_up_proj``), or one that
``expert_axes={regex: axis}`` declares, travels as one array per expert under the slice key
``...gate_up_proj[j]``; every other key is shared.  ``units="layer"`` makes each (layer, expert)
its own unit, and ``expert_of`` names a replacement mapping.  A model in which no key belongs to
an expert is refused (ValueError) before the first round.  Before a site's first round the
controller sends it a ``query`` task (``meta``: ``num-experts`` per layer, ``num-units``,
``units``); the site answers with what its configuration declares (``metrics``: ``max-experts``,
``label``, ``routing``, which has ``num-units`` entries).  Each round :class:`AlignedController`
sends each planned site its own ``train`` task: an ``FLModel`` with the shared arrays and only
that site's experts' (slices') arrays, and ``meta = {"experts": [...], "round": r, "units": ...,
"num-experts": experts per MoE layer}`` (plus ``"expert-axes"`` when declared), so the site can
rebuild the same unit map.  A site replies with the arrays it trained and the metrics of the
Flower plug-in (``num-examples``, ``experts``, ``expert-samples``, ``expert-loss``,
``expert-accuracy``, ``train-seconds``, optional ``max-experts`` and ``routing``), or, when its
training raised, with :func:`error_model` (``meta["error"]``: the exception, which NVFlare would
otherwise keep in the site's log).  Replies are checked and aggregated by
:mod:`alignment_solver.integrations.replies`, the same code the Flower strategy calls.  Everything
the workflow hands out whole (``validate`` tasks, ``central_evaluation``, ``model_path``) is the
joined full model.

On the site, :func:`train_model` / :func:`evaluate_model` turn a received ``FLModel`` into the
reply, and :func:`run_client` is the whole Client API loop (``flare.init`` / ``receive`` /
``send``) for the numpy MoE of :mod:`alignment_solver.training`.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from ..coordinator import AlignmentCoordinator, CoordinatorConfig
from ..errors import ReplyError, TrainingFailedError
from ..load_monitor import cv
from ..state import write_atomic
from .local import evaluate_arrays, received_experts, train_arrays
from .replies import (AggregationConfig, Reply, ReplyChecker, aggregate, capacity_report, changed_experts,
                      check_declaration, check_evaluations, evaluation_mean, failure_message, held_back)
from .units import UnitMap, check_expert_axes

TRAIN_TASK = "train"
EVALUATE_TASK = "validate"
QUERY_TASK = "query"
MAX_REASON = 500


def payload_bytes(params: Any) -> int:
    """Bytes of the arrays in an ``FLModel.params`` dict (``nbytes``; 0 for anything else)."""
    if not isinstance(params, Mapping):
        return 0
    return int(sum(getattr(v, "nbytes", 0) for v in params.values()))


def load_callable(spec: str) -> Callable[..., Any]:
    """The function named ``"package.module:function"``; ValueError naming ``spec`` otherwise."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"a function must be named as 'package.module:function'; got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


class AlignedController(ModelController):
    """Client-expert alignment for federated MoE training, as an NVFlare server workflow.

    Contract, per round ``r`` of ``num_rounds`` (NVFlare's 0-based round; the coordinator's round
    is ``r + offset``, where ``offset`` continues an existing state file):

    - before the first round the model's arrays are mapped to units (``units``, ``expert_of``,
      ``num_experts``, ``expert_axes``; ValueError if no key belongs to an expert); fused
      parameters are split into one transport array per expert (slice key ``K[j]``) and
      ``current`` holds these transport arrays.  A site never seen gets a ``query`` task (all new
      sites at once; the wait ends when every one answered, at most ``query_timeout`` seconds)
      and its declared capacity, label and routing set its first plan; the log names the sites
      that did not answer;
    - the connected sites (sorted by name; NVFlare's dead-client list left out) are the available
      clients, each with its last capacity
      report (``max-experts``, ``routing``); ``AlignmentCoordinator.plan_round`` decides;
    - each site with experts gets its own ``train`` task (shared arrays plus only its experts'
      transport arrays, ``meta``: ``experts``, ``units``, ``num-experts``, ``expert-axes``), all
      sent at once, each with ``train_timeout`` seconds;
    - replies are checked by ``ReplyChecker``: rejected ones (and :func:`error_model` replies,
      whose site-side exception is logged) are logged with the reason and kept in
      ``history[r]["rejected"]``; sites that sent nothing, an error or a rejected reply are
      dropouts; accepted replies are aggregated per transport array (``aggregate``) and observed.
      After ``max_failed_rounds`` rounds in a row without a valid reply (or when every round of
      a shorter run failed) the workflow raises :class:`TrainingFailedError` naming the most
      frequent reason; NVFlare's ``ModelController`` turns it into a system panic, which ends
      the job (``None``: never stop);
    - the coordinator state is saved to ``state_path`` and the history to ``history_path``
      (relative paths lie in the job's run folder).  Federated evaluation sends the full model,
      so it runs only in the last round, plus every ``evaluate_every`` rounds if set, on
      ``fraction_evaluate`` of the connected sites (drawn from the coordinator seed and the
      round), each ``validate`` task with ``evaluate_timeout`` seconds (0: never); the reason is
      in :class:`~alignment_solver.integrations.flower.AlignedStrategy`.  ``central_evaluation``
      (if named) scores the joined model on the server every round.  The final joined arrays are
      written to ``model_path`` (``.npz``).  ``history[r]`` counts training bytes
      (``bytes_down``, ``bytes_up``) and evaluation bytes (``eval_bytes_down``,
      ``eval_bytes_up``) separately, as array payload (``nbytes``).

    Constructor arguments are plain values, so the job configuration can carry them:
    ``initial_model`` and ``central_evaluation`` name functions as ``"package.module:function"``
    (the first takes ``num_experts`` and returns the initial (full) arrays, the second takes the
    joined arrays and returns a dict of metrics);
    ``coordinator_config`` and ``aggregation_config`` are the fields of :class:`CoordinatorConfig` and
    :class:`AggregationConfig`; ``expert_of`` (optional) names a ``key -> expert id or None`` function
    the same way; ``expert_axes`` is a plain dict ``{regex: axis}``.  ``num_experts`` counts experts
    per MoE layer (``units="layer"``: the coordinator plans ``layers * num_experts`` units).
    """

    def __init__(self, *, num_experts: int, initial_model: str, num_rounds: int = 3,
                 central_evaluation: str = "", coordinator_config: Optional[dict] = None,
                 aggregation_config: Optional[dict] = None, min_clients: int = 1, wait_for_clients: float = 60.0,
                 train_timeout: int = 600, evaluate_timeout: int = 60, deadline: Optional[float] = None,
                 state_path: str = "aligned_state.json", history_path: str = "aligned_history.json",
                 model_path: str = "aligned_model.npz", units: str = "expert", expert_of: str = "",
                 expert_axes: Optional[dict] = None, query_timeout: int = 120, max_failed_rounds: Optional[int] = 3,
                 evaluate_every: Optional[int] = None, fraction_evaluate: float = 1.0) -> None:
        super().__init__(persistor_id="", ignore_result_error=True)
        if units not in ("expert", "layer"):
            raise ValueError(f"units must be one of ['expert', 'layer']; got {units!r}")
        if max_failed_rounds is not None and (not isinstance(max_failed_rounds, int)
                                              or isinstance(max_failed_rounds, bool) or max_failed_rounds < 1):
            raise ValueError(f"max_failed_rounds must be None (never stop) or an integer >= 1; got {max_failed_rounds!r}")
        if evaluate_every is not None and (not isinstance(evaluate_every, int) or isinstance(evaluate_every, bool)
                                           or evaluate_every < 1):
            raise ValueError(f"evaluate_every must be None (last round only) or an integer >= 1; got {evaluate_every!r}")
        if not (isinstance(fraction_evaluate, (int, float)) and 0 <= fraction_evaluate <= 1):
            raise ValueError(f"fraction_evaluate must be a number in [0, 1]; got {fraction_evaluate!r}")
        self._units = units
        self._expert_of = expert_of
        self._expert_axes = check_expert_axes(expert_axes)
        self._query_timeout = int(query_timeout)
        self._max_failed_rounds = max_failed_rounds
        self._evaluate_every = evaluate_every
        self._fraction_evaluate = float(fraction_evaluate)
        self.unit_map: Optional[UnitMap] = None
        self.labels: dict[str, str] = {}
        self.declared: dict[str, dict[str, Any]] = {}
        self._num_experts = int(num_experts)
        self._initial_model = initial_model
        self._num_rounds = int(num_rounds)
        self._central_evaluation = central_evaluation
        self._coordinator_config = dict(coordinator_config or {})
        self._aggregation_config = dict(aggregation_config or {})
        self._min_clients = int(min_clients)
        self._wait_for_clients = float(wait_for_clients)
        self._train_timeout = int(train_timeout)
        self._evaluate_timeout = int(evaluate_timeout)
        self._deadline = deadline
        self._state_path = state_path
        self._history_path = history_path
        self._model_path = model_path
        self.aggregation = AggregationConfig(**self._aggregation_config)
        self.config = CoordinatorConfig(**self._coordinator_config)
        self.coordinator: Optional[AlignmentCoordinator] = None
        self.offset = 0
        self.current: dict[str, np.ndarray] = {}            # transport arrays (fused parameters split)
        self.reports: dict[str, dict[str, Any]] = {}
        self.weight_caps: dict[str, float] = {}
        self.history: dict[int, dict[str, Any]] = {}
        self.failed: list[tuple[int, list[str]]] = []      # current run of failed rounds: (round, reasons)
        self._lock = threading.Lock()
        self._replies: list[Reply] = []
        self._bytes_up = 0
        self._task_errors: dict[str, str] = {}             # site -> NVFlare return code of its failed train task
        self._round = -1

    # ---- paths and set-up ---------------------------------------------------------------------
    def _path(self, name: str) -> Optional[Path]:
        if not name:
            return None
        p = Path(name)
        return p if p.is_absolute() else Path(self.get_run_dir()) / p

    def _setup(self) -> None:
        arrays = load_callable(self._initial_model)(self._num_experts)
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError(f"initial_model {self._initial_model!r} must return a non-empty dict of arrays")
        full = {str(k): np.asarray(v) for k, v in arrays.items()}
        self.unit_map = UnitMap(full, units=self._units, num_experts=self._num_experts,
                                expert_of=load_callable(self._expert_of) if self._expert_of else None,
                                expert_axes=self._expert_axes or None)
        self.current = self.unit_map.split(full)
        E = self.unit_map.num_units
        state = self._path(self._state_path)
        if state is not None and state.exists():
            self.coordinator = AlignmentCoordinator.load(state, num_experts=E)
        else:
            config = self.config if self.unit_map.groups is None else \
                self.config.model_copy(update={"unit_groups": self.unit_map.groups})
            self.coordinator = AlignmentCoordinator(E, config=config)
        done = max(self.coordinator.last_round, -1 if self.coordinator.pending is None
                   else self.coordinator.pending["round"])
        self.offset = done + 1
        um = self.unit_map
        fused = f", {len(um.fused)} fused parameters split by expert" if um.fused else ""
        self.info(f"{E} units ({self._units}), {um.num_layers} MoE layer(s), {len(um.shared_keys())} shared arrays"
                  f"{fused}")

    def expert_of(self, key: str) -> Optional[int]:
        """The unit owning transport key ``key`` (None: shared)."""
        return self.unit_map.unit_of(key)

    def full_model(self) -> dict[str, np.ndarray]:
        """The current model as the framework and the user see it: slices joined into fused parameters."""
        return self.unit_map.join(self.current)

    def _query(self, sites: list[str]) -> None:
        """Ask sites never seen what their configuration declares (capacity, label, routing); log
        the sites that did not answer in time or failed, and why when the site said."""
        new = [s for s in sites if s not in self.declared]
        for s in new:
            self.declared[s] = {}
        if not new or self._query_timeout <= 0:
            return
        data = FLModel(params={}, meta={"num-experts": self._num_experts, "num-units": self.coordinator.E,
                                        "units": self._units})
        started = time.monotonic()
        with self._lock:
            self._task_errors = {}
        results = self.send_model_and_wait(task_name=QUERY_TASK, data=data, targets=new, timeout=self._query_timeout)
        with self._lock:
            answered, failed = set(self._task_errors) & set(new), {s: f"its task failed: {code} (see the site's log)"
                                                                   for s, code in self._task_errors.items() if s in new}
        for res in results:
            site = str((res.meta or {}).get("client_name", "?"))
            if site not in self.declared:
                continue
            answered.add(site)
            error = (res.meta or {}).get("error")
            if error:
                failed[site] = f"replied with an error: {str(error)[:MAX_REASON]}"
                continue
            try:
                self.declared[site] = check_declaration(res.metrics or {}, self.coordinator.E)
            except ReplyError as exc:
                failed[site] = f"ignored its capacity declaration: {exc}"
        for s, d in self.declared.items():
            if "label" in d:
                self.labels[s] = d["label"]
        ok = len(answered) - len(failed)
        self.info(f"{ok} of {len(new)} new sites declared their capacity ({time.monotonic() - started:.1f} s)")
        for site, why in failed.items():
            self.warning(f"site {site} failed the capacity query: {why}; it starts at the profiler's default")
        silent = [s for s in new if s not in answered]
        if silent:
            self.warning(f"sites {silent} did not answer the capacity query within query_timeout={self._query_timeout} s "
                         f"(a slow start-up, e.g. importing a large framework, or a lost site); they start at the "
                         f"profiler's default capacity")

    def _connected(self) -> list[str]:
        """Sites NVFlare knows and does not deem disconnected, sorted by name."""
        return sorted(c.name for c in self.engine.get_clients() if self.get_client_disconnect_time(c.name) is None)

    def _wait_for_sites(self) -> list[str]:
        """Wait up to ``wait_for_clients`` seconds for ``min_clients`` connected sites."""
        stop = time.monotonic() + self._wait_for_clients
        while True:
            sites = self._connected()
            if len(sites) >= self._min_clients or time.monotonic() >= stop or self.abort_signal.triggered:
                return sites
            time.sleep(0.5)

    def _save(self) -> None:
        state = self._path(self._state_path)
        if state is not None:
            self.coordinator.save(state)
        history = self._path(self._history_path)
        if history is not None:
            write_atomic(history, json.dumps({str(k): v for k, v in sorted(self.history.items())}, indent=1,
                                             default=float))

    # ---- the workflow -------------------------------------------------------------------------
    def run(self) -> None:
        self._setup()
        evaluate = load_callable(self._central_evaluation) if self._central_evaluation else None
        if evaluate is not None:
            self.history.setdefault(-1, {})["central"] = dict(evaluate(self.full_model()))
        sites = self._wait_for_sites()
        if len(sites) < self._min_clients:
            self.warning(f"only {len(sites)} of min_clients={self._min_clients} sites connected; training with them")
        for r in range(self._num_rounds):
            if self.abort_signal.triggered:
                self.warning(f"round {r}: the job was aborted")
                break
            self._train_round(r)
            self._evaluate_round(r)
            if evaluate is not None:
                self.history[r]["central"] = dict(evaluate(self.full_model()))
                self.info(f"round {r}: central evaluation {self.history[r]['central']}")
            self._save()
        model = self._path(self._model_path)
        if model is not None:
            model.parent.mkdir(parents=True, exist_ok=True)
            with open(model, "wb") as fh:
                np.savez(fh, **self.full_model())
        self.info(f"finished {self._num_rounds} rounds")

    def _collect(self, result: FLModel) -> None:
        """Keep one site's training reply: FULL or DIFF parameters of this round only, or its error."""
        site = str(result.meta.get("client_name", "?"))
        kind = str(getattr(result.params_type, "value", result.params_type) or "FULL").upper()
        error = (result.meta or {}).get("error")
        if error:
            reply = Reply(site, error=str(error)[:MAX_REASON])
        elif result.current_round is not None and result.current_round != self._round:
            reply = Reply(site, error=f"a reply for round {result.current_round}, received in round {self._round}")
        elif kind not in ("FULL", "DIFF"):
            reply = Reply(site, error=f"params_type must be FULL or DIFF; got {kind}")
        else:
            reply = Reply(site, arrays=result.params, metrics=result.metrics, diff=kind == "DIFF")
        with self._lock:
            self._replies.append(reply)
            self._bytes_up += payload_bytes(result.params)

    def _accept_train_result(self, client_name: str, result: Any, fl_ctx: Any, *args: Any, **kwargs: Any) -> bool:
        """NVFlare's check of a result's return code; a failed task's code is kept as the site's reason."""
        accepted = super()._accept_train_result(client_name, result, fl_ctx, *args, **kwargs)
        if not accepted:
            with self._lock:
                self._task_errors[str(client_name)] = str(result.get_return_code())
        return accepted

    def _wait_for_tasks(self) -> None:
        while self.get_num_standing_tasks() > 0:
            if self.abort_signal.triggered:
                self.cancel_all_tasks()
                return
            time.sleep(self._task_check_period)

    def _train_round(self, r: int) -> None:
        sites = self._connected()
        self._query(sites)
        statuses = [{"client_id": s, "label": self.labels.get(s, s),
                     **(self.reports[s] if s in self.reports else
                        {k: v for k, v in self.declared.get(s, {}).items() if k != "label"})} for s in sites]
        replan = self.coordinator.pending is not None
        plan = self.coordinator.plan_round(r + self.offset, statuses, deadline=self._deadline, replan=replan)
        shared = {k: v for k, v in self.current.items() if self.expert_of(k) is None}
        planned = {str(pc.client_id): [int(e) for e in pc.experts] for pc in plan.clients if pc.experts}
        deliveries = {site: {**shared, **{k: v for k, v in self.current.items() if self.expert_of(k) in experts}}
                      for site, experts in planned.items()}
        self.history[r] = {"coordinator_round": r + self.offset, "sites": sites, "plan": planned,
                           "capacity": {str(pc.client_id): pc.capacity for pc in plan.clients},
                           "labels": {str(pc.client_id): pc.label for pc in plan.clients},
                           "status": plan.status, "planned_load": plan.planned_load,
                           "bytes_down": sum(payload_bytes(d) for d in deliveries.values())}
        self._save()
        self.info(f"round {r}: planned {len(planned)} of {len(sites)} sites: {planned} ({plan.status})")
        with self._lock:
            self._replies = []
            self._bytes_up = 0
            self._task_errors = {}
            self._round = r
        meta = {"units": self._units, "num-experts": self._num_experts}
        if self._expert_axes:
            meta["expert-axes"] = dict(self._expert_axes)
        for site, experts in planned.items():
            data = FLModel(params_type=ParamsType.FULL, params=deliveries[site], current_round=r,
                           total_rounds=self._num_rounds, meta={"experts": experts, "round": r, **meta})
            self.send_model(task_name=TRAIN_TASK, data=data, targets=[site], timeout=self._train_timeout,
                            callback=self._collect)
        self._wait_for_tasks()
        with self._lock:
            replies, self._replies = self._replies, []
            self.history[r]["bytes_up"] = self._bytes_up
            task_errors = {s: code for s, code in self._task_errors.items() if s in planned}
        self._aggregate_round(r, replies, planned, task_errors)

    def _aggregate_round(self, r: int, replies: list[Reply], planned: dict[str, list[int]],
                         task_errors: Optional[Mapping[str, str]] = None) -> None:
        """Check round ``r``'s replies against its plan, let the coordinator observe them and
        aggregate them into the current model (the privacy floor holding back what it must);
        TrainingFailedError after ``max_failed_rounds`` rounds in a row without a valid reply.
        ``task_errors`` maps a site whose task failed in NVFlare to the return code."""
        task_errors = dict(task_errors or {})
        for site, code in task_errors.items():
            self.warning(f"round {r}: the train task of site {site} failed: {code} (NVFlare keeps the exception in "
                         f"the site's log; a site that answers with error_model sends it here)")
        checker = ReplyChecker(self.current, self.coordinator.E, owner=self.expert_of, config=self.aggregation)
        checked = checker.check_round(replies, planned, self.weight_caps)
        for site, reason in checked.rejected.items():
            self.warning(f"round {r}: rejected the reply of site {site}: {reason}")
        received = {}
        for rep in checked.accepted:
            site = str(rep.client_id)
            self.weight_caps.setdefault(site, float(rep.num_examples))
            self.reports[site] = capacity_report(rep)
            received[site] = [e.expert for e in rep.report.experts]
        summary = self.coordinator.observe_round(r + self.offset, [rep.report for rep in checked.accepted])
        new, trained = aggregate(self.current, checked.accepted, self.expert_of, self.aggregation)
        changed = changed_experts(self.current, new, self.expert_of)
        self.history[r].update(received=received, rejected=checked.rejected, task_errors=task_errors,
                               dropouts=[str(d) for d in summary.dropouts],
                               trained_experts=sorted(trained), changed_experts=changed,
                               load=summary.expert_clients, load_cv=cv(np.array(summary.expert_clients)),
                               mean_accuracy=summary.mean_accuracy)
        held = held_back(checked.accepted, self.aggregation)
        if held:
            self.history[r]["held_back"] = held
            self.warning(f"round {r}: privacy floor {held['min_group']}: kept the arrays of experts "
                         f"{held.get('experts', {})} (accepted replies per expert)"
                         + (f" and the shared arrays ({held['shared']} accepted replies)" if "shared" in held else ""))
        if summary.dropouts:
            self.warning(f"round {r}: planned sites failed (no reply, an error or rejected): {summary.dropouts}")
        self.current = new
        self._save()
        if checked.accepted:
            self.failed = []
            return
        silent = [s for s in planned if s not in checked.rejected and s not in task_errors]
        reasons = list(checked.rejected.values()) + \
            [f"its train task failed on the site: {code} (the exception is in the site's log)"
             for s, code in task_errors.items() if s not in checked.rejected] + \
            [f"sent no reply within train_timeout={self._train_timeout} s"] * len(silent)
        self.failed.append((r, reasons))
        top = Counter(reasons).most_common(1)
        self.warning(f"round {r}: NO VALID REPLY ({len(planned)} planned, {len(checked.rejected)} rejected, "
                     f"{len(task_errors)} failed tasks, {len(silent)} sent nothing); the global model is unchanged; "
                     f"{len(self.failed)} failed round(s) "
                     f"in a row (max_failed_rounds={self._max_failed_rounds})"
                     + (f"; most frequent reason: {top[0][0]}" if top else "; no site was planned"))
        limit = self._max_failed_rounds
        whole_run = r == self._num_rounds - 1 and len(self.failed) == self._num_rounds
        if limit is not None and (len(self.failed) >= limit or whole_run):
            message = failure_message(self.failed, limit, "site")
            self.error(f"stopping: {message}")
            raise TrainingFailedError(message)

    def _evaluates(self, r: int) -> bool:
        if self._evaluate_timeout <= 0 or self._fraction_evaluate <= 0:
            return False
        return r == self._num_rounds - 1 or bool(self._evaluate_every and (r + 1) % self._evaluate_every == 0)

    def _evaluate_round(self, r: int) -> None:
        self.history[r]["eval_bytes_down"] = self.history[r]["eval_bytes_up"] = 0
        if not self._evaluates(r):
            return
        sites = self._connected()
        if not sites:
            return
        k = max(1, int(round(len(sites) * self._fraction_evaluate)))
        if k < len(sites):
            rng = np.random.default_rng([self.config.seed, r])
            sites = sorted(str(s) for s in rng.choice(sites, size=k, replace=False))
        full = self.full_model()
        data = FLModel(params_type=ParamsType.FULL, params=full, current_round=r,
                       total_rounds=self._num_rounds, meta={"round": r})
        results = self.send_model_and_wait(task_name=EVALUATE_TASK, data=data, targets=sites,
                                           timeout=self._evaluate_timeout)
        self.history[r]["eval_bytes_down"] = payload_bytes(full) * len(sites)
        self.history[r]["eval_bytes_up"] = sum(payload_bytes(res.params) for res in results)
        replies = [Reply(str((res.meta or {}).get("client_name", "?")), metrics=res.metrics,
                         error=(str((res.meta or {})["error"])[:MAX_REASON] if (res.meta or {}).get("error") else None))
                   for res in results]
        accepted, rejected = check_evaluations(replies, sites, self.aggregation.max_examples,
                                               weight_factor=self.aggregation.weight_factor,
                                               weight_caps=self.weight_caps)
        for site, reason in rejected.items():
            self.warning(f"round {r}: rejected the evaluation of site {site}: {reason}")
        if rejected:
            self.history[r]["eval_rejected"] = rejected
        mean = evaluation_mean(accepted)
        if mean is not None:
            self.history[r]["evaluate"] = {"accuracy": mean["accuracy"], "loss": mean["loss"], "sites": len(accepted)}
            self.info(f"round {r}: federated evaluation {self.history[r]['evaluate']}")


# ---- site side --------------------------------------------------------------------------------
def train_model(model: FLModel, x: np.ndarray, y: np.ndarray, *, num_experts: int, hidden: int = 0,
                top_k: int = 2, lr: float = 0.5, epochs: int = 2, batch_size: int = 32,
                max_experts: Optional[int] = None, seed: int = 0) -> FLModel:
    """Train the experts in ``model.meta["experts"]`` and return the reply.

    The site first checks that it received exactly the arrays of those experts (plus shared
    ones) and raises ValueError otherwise, so a wrong delivery fails the task instead of training.
    """
    experts = [int(e) for e in (model.meta or {}).get("experts", [])]
    got = received_experts(model.params)
    if got != sorted(experts):
        raise ValueError(f"received the arrays of experts {got} but was assigned {sorted(experts)}")
    local, metrics = train_arrays(model.params, experts, x, y, num_experts=num_experts,
                                  server_round=int(model.current_round or 0), hidden=hidden, top_k=top_k, lr=lr,
                                  epochs=epochs, batch_size=batch_size, max_experts=max_experts, seed=seed)
    metrics["received-experts"] = got
    return FLModel(params_type=ParamsType.FULL, params=local, metrics=metrics)


def evaluate_model(model: FLModel, x: np.ndarray, y: np.ndarray, *, num_experts: int, hidden: int = 0,
                   top_k: int = 2) -> FLModel:
    """Evaluate the full received model on ``(x, y)``."""
    return FLModel(params={}, metrics=evaluate_arrays(model.params, x, y, num_experts=num_experts, hidden=hidden,
                                                      top_k=top_k))


def error_model(exc: BaseException) -> FLModel:
    """The reply of a site whose task raised: ``meta["error"]`` holds ``"Type: message"`` (at most
    500 characters), which the controller logs and counts; NVFlare itself would pass the server
    only an ``EXECUTION_EXCEPTION`` return code."""
    text = f"{type(exc).__name__}: {exc}"
    return FLModel(params={}, meta={"error": text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."})


def capacity_model(site: str, *, max_experts: Optional[int] = None, label: Optional[str] = None,
                   routing: Optional[list[float]] = None) -> FLModel:
    """The answer to the controller's ``query`` task: what this site's configuration declares."""
    metrics: dict[str, Any] = {"label": label or site}
    if max_experts is not None:
        metrics["max-experts"] = int(max_experts)
    if routing is not None:
        metrics["routing"] = [float(v) for v in routing]
    return FLModel(params={}, metrics=metrics)


def run_client(data: Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], *, num_experts: int,
               max_experts: Optional[Callable[[str], int]] = None,
               on_train: Optional[Callable[[str, FLModel], None]] = None,
               on_reply: Optional[Callable[[str, FLModel], FLModel]] = None, **train_kwargs: Any) -> None:
    """The Client API loop of a site: ``data(site)`` gives ``(x_train, y_train, x_val, y_val)``.

    ``train`` tasks go to :func:`train_model` (reporting ``max_experts(site)`` as the site's
    capacity, if given), ``validate`` tasks to :func:`evaluate_model`, ``query`` tasks to
    :func:`capacity_model` (the same capacity, declared before the first round); ``on_train(site, model)``
    (optional) is called with each received training model first, and ``on_reply(site, reply)``
    (optional) may replace the training reply before it is sent.  A task that raises is answered
    with :func:`error_model` (the traceback goes to the site's log) and the loop goes on, so the
    server sees the reason and the site stays available.
    """
    import nvflare.client as flare

    flare.init()
    site = flare.get_site_name()
    x, y, xv, yv = data(site)
    capacity = None if max_experts is None else int(max_experts(site))
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        try:
            if flare.is_train():
                if on_train is not None:
                    on_train(site, model)
                reply = train_model(model, x, y, num_experts=num_experts, max_experts=capacity, **train_kwargs)
                reply = reply if on_reply is None else on_reply(site, reply)
            elif flare.is_evaluate():
                reply = evaluate_model(model, xv, yv, num_experts=num_experts,
                                       **{k: v for k, v in train_kwargs.items() if k in ("hidden", "top_k")})
            elif flare.get_task_name() == QUERY_TASK:
                reply = capacity_model(site, max_experts=capacity)
            else:
                reply = FLModel(params={}, metrics={})
        except Exception as exc:                    # the server gets the reason; the site stays in the job
            logging.getLogger(__name__).error("site %s: task %s failed:\n%s", site, flare.get_task_name(),
                                              traceback.format_exc())
            reply = error_model(exc)
        flare.send(reply)


__all__ = ["AlignedController", "TrainingFailedError", "capacity_model", "error_model", "evaluate_model",
           "load_callable", "run_client", "train_model"]
