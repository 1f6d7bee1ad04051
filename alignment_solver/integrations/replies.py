"""Client replies of an aligned round: validation and per-expert aggregation, framework-neutral.

Every framework adapter (Flower, NVFlare) turns its messages into :class:`Reply` objects and
calls the same two functions:

- :meth:`ReplyChecker.check_round` checks each reply against the round's plan and the model's
  schema before anything is used.  A reply passes only if its node was planned and replied once;
  every array key exists in the model, belongs to the shared part or to an expert the reply lists,
  has the model's shape and dtype kind (float for float arrays, integers that fit for integer
  ones) and finite values once cast to the model's dtype (1e300 is infinite in float32); a
  difference reply (``Reply.diff``, NVFlare's ``ParamsType.DIFF``) is added to the current arrays
  first; it carries every shared array it was sent (the schema's arrays no expert owns); the
  experts it lists were assigned to it, each one comes with all of its arrays, and an expert
  reported with 0 ``expert-samples`` comes back unchanged; counts are integers with
  ``1 <= num-examples <= max_examples`` (samples, or tokens when ``counts-tokens`` is 1; the
  default cap, 10**12, fits an LLM client's tokens) and ``expert-samples <= num-examples``; losses, seconds
  and routing are finite and non-negative, accuracies lie in [0, 1]; ``max-experts`` is an
  integer in [0, 10**6].  A failed reply is rejected with the reason (it counts as a failed
  client); the others go on.
- :func:`aggregate` averages each key over the accepted replies that sent it: shared keys by
  ``num-examples``, an expert's keys by the samples routed to it (an expert reported with 0
  samples is left out: its arrays are unchanged), each weight capped
  by the client's ``weight_cap`` and, with 3 or more accepted replies, at ``weight_factor`` times
  their median ``num-examples``; or, robustly, the coordinate-wise ``median`` or
  ``trimmed_mean`` (unweighted, ``trim`` of the values cut at each end).  Each reply's update (its
  arrays minus the current ones, as one vector) is first scaled to at most ``relative_clip``
  times the median update norm of the round's accepted replies (3 or more, median above 0) and
  to ``clip_norm``.
  A key with too few contributions for the robust method to drop any (``median``: fewer than 3;
  ``trimmed_mean``: fewer than ``1 / trim``) follows ``few``: the weighted mean of the clipped
  updates, or ``"keep"`` its current value.  Keys nobody sent keep their current value.
- A privacy floor (``min_group``, :func:`held_back`), counted per array: no array, shared or
  expert, is updated from fewer than ``min_group`` accepted replies that contributed to it (an
  expert's contributors are the replies that trained it, with samples > 0; every accepted reply
  carries every shared array); below that it keeps its current value this round (a lone
  client's update is never published in the clear).  The adapters log and record what was
  held back; the coordinator still observes every accepted reply.
- :func:`check_evaluations` checks evaluation replies the same way (a node asked this round,
  one reply, ``num-examples`` capped like train weights); :func:`evaluation_mean` averages them.

Reply metrics use the keys of the Flower integration: ``num-examples``, ``experts``,
``expert-samples``, ``expert-loss``, ``expert-accuracy``, ``train-seconds``,
``download-seconds``, ``max-experts``, ``routing``, ``counts-tokens`` (0 or 1); other keys are ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ReplyError, describe
from ..problem import MAX_MAGNITUDE
from ..rounds import MAX_EXAMPLES, ClientReport, Label
from ..search.floor import below_floor

MAX_DECLARED_EXPERTS = 10 ** 6


class AggregationConfig(BaseModel):
    """How accepted replies are combined, and the largest sample count a reply may claim."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="weighted mean, or coordinate-wise median / trimmed mean (robust, unweighted)")
    trim: float = Field(0.2, ge=0, lt=0.5, description="share cut at each end by trimmed_mean")
    clip_norm: Optional[float] = Field(None, gt=0, allow_inf_nan=False,
                                       description="L2 cap on each reply's update (None: no clipping)")
    relative_clip: Optional[float] = Field(10.0, gt=0, allow_inf_nan=False, description=(
        "each reply's update norm at most this multiple of the median over the round's accepted replies "
        "(applies from 3 replies; None: off)"))
    weight_factor: Optional[float] = Field(5.0, ge=1, allow_inf_nan=False, description=(
        "a reply's weight at most this multiple of the median accepted num-examples (from 3 replies; None: off)"))
    few: Literal["mean", "keep"] = Field("mean", description=(
        "median / trimmed_mean over too few contributions to drop any: the weighted mean of the clipped "
        "updates, or keep the current value"))
    max_examples: int = Field(MAX_EXAMPLES, ge=1, le=MAX_EXAMPLES, description=(
        "a reply claiming more num-examples (samples or tokens) is rejected"))
    min_group: int = Field(0, ge=0, le=MAX_DECLARED_EXPERTS, description=(
        "privacy floor: an expert's arrays change only from at least this many accepted replies, the shared "
        "arrays only when at least this many were accepted; fewer: kept this round (0 or 1: off)"))


@dataclass
class Reply:
    """One client's reply as the framework delivered it (``error``: a transport-level failure)."""

    client_id: Label
    arrays: Any = None
    metrics: Any = None
    error: Optional[str] = None
    diff: bool = False          # the arrays are differences to the current ones (NVFlare ParamsType.DIFF)


@dataclass
class ValidReply:
    """A reply that passed every check: float arrays, capped weights, and its coordinator report."""

    client_id: Label
    arrays: dict[str, np.ndarray]
    num_examples: int
    weight: float
    expert_weights: dict[int, float]        # the experts it trained (samples > 0) -> capped weight
    report: ClientReport
    max_experts: Optional[int] = None
    routing: Optional[list[float]] = None


@dataclass
class RoundReplies:
    accepted: list[ValidReply] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)     # str(client id) -> reason


def finite_number(v: Any) -> bool:
    """A real, finite number (int or float, numpy included; not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


def _count(metrics: Mapping[str, Any], key: str, *, low: int, high: float, required: bool = True) -> Optional[int]:
    if key not in metrics:
        if required:
            raise ReplyError(f"metric {key!r} is missing")
        return None
    v = metrics[key]
    if not finite_number(v) or v != int(v) or not low <= v <= high:
        raise ReplyError(f"metric {key!r} must be an integer in [{low}, {high:g}]; got {describe(v)}")
    return int(v)


def _numbers(metrics: Mapping[str, Any], key: str, n: Optional[int], *, low: float, high: float,
             integer: bool = False) -> list[float]:
    v = metrics[key]
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise ReplyError(f"metric {key!r} must be a list of numbers; got {describe(v)}")
    values = list(v)
    if n is not None and len(values) != n:
        raise ReplyError(f"metric {key!r} must have {n} entries; got {len(values)}")
    for x in values:
        if not finite_number(x) or not low <= x <= high or (integer and x != int(x)):
            kind = "integers" if integer else "numbers"
            raise ReplyError(f"metric {key!r} must hold {kind} in [{low:g}, {high:g}]; got {describe(x)}")
    return [float(x) for x in values]


def _seconds(metrics: Mapping[str, Any], key: str) -> float:
    v = metrics.get(key, 0.0)
    if not finite_number(v) or not 0 <= v <= MAX_MAGNITUDE:
        raise ReplyError(f"metric {key!r} must be finite seconds >= 0; got {describe(v)}")
    return float(v)


class ReplyChecker:
    """Checks replies against the model ``schema`` (the current arrays) and the round's plan."""

    def __init__(self, schema: Mapping[str, np.ndarray], num_experts: int, *,
                 owner: Callable[[str], Optional[int]], config: AggregationConfig = AggregationConfig()) -> None:
        self.schema = {k: np.asarray(v) for k, v in schema.items()}
        self.E = int(num_experts)
        self.owner = owner
        self.config = config
        self.expert_keys: dict[int, set[str]] = {}
        self.shared_keys: set[str] = set()
        for k in self.schema:
            j = owner(k)
            if j is not None:
                self.expert_keys.setdefault(j, set()).add(k)
            else:
                self.shared_keys.add(k)

    def check(self, reply: Reply, planned: Optional[list[int]], weight_cap: Optional[float] = None) -> ValidReply:
        """The checked reply, or ReplyError naming the first problem."""
        if reply.error is not None:
            raise ReplyError(f"replied with an error: {reply.error}")
        if not planned:
            raise ReplyError("was not planned to train in this round")
        metrics, arrays = reply.metrics, reply.arrays
        if not isinstance(metrics, Mapping):
            raise ReplyError(f"has no metrics record; got {describe(metrics)}")
        if not isinstance(arrays, Mapping):
            raise ReplyError(f"has no arrays record; got {describe(arrays)}")
        n = _count(metrics, "num-examples", low=1, high=self.config.max_examples)
        if "experts" not in metrics:
            raise ReplyError("metric 'experts' is missing")
        experts = [int(e) for e in _numbers(metrics, "experts", None, low=0, high=self.E - 1, integer=True)]
        if len(set(experts)) != len(experts):
            raise ReplyError(f"metric 'experts' lists an expert twice: {experts}")
        extra = sorted(set(experts) - set(planned))
        if extra:
            raise ReplyError(f"lists expert {extra[0]}, which it was not assigned (assigned: {sorted(planned)})")
        for key in ("expert-samples", "expert-loss", "expert-accuracy"):
            if key not in metrics:
                raise ReplyError(f"metric {key!r} is missing")
        samples = _numbers(metrics, "expert-samples", len(experts), low=0, high=n, integer=True)
        losses = _numbers(metrics, "expert-loss", len(experts), low=0, high=MAX_MAGNITUDE)
        accuracy = _numbers(metrics, "expert-accuracy", len(experts), low=0, high=1)
        train, download = _seconds(metrics, "train-seconds"), _seconds(metrics, "download-seconds")
        max_experts = _count(metrics, "max-experts", low=0, high=MAX_DECLARED_EXPERTS, required=False)
        _count(metrics, "counts-tokens", low=0, high=1, required=False)
        routing = _numbers(metrics, "routing", self.E, low=0, high=MAX_MAGNITUDE) if "routing" in metrics else None

        checked: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if key not in self.schema:
                raise ReplyError(f"array {describe(key)} is not part of the model")
            j = self.owner(key)
            if j is not None and j not in experts:
                raise ReplyError(f"array {key!r} belongs to expert {j}, which the reply does not list "
                                 f"(experts: {experts})")
            checked[key] = self._array(key, value, reply.diff)
        missing = sorted(self.shared_keys - set(checked))
        if missing:
            raise ReplyError(f"does not send the shared array {missing[0]!r} it was sent ({len(missing)} of "
                             f"{len(self.shared_keys)} shared arrays missing)")
        for j, s in zip(experts, samples):
            missing = sorted(self.expert_keys.get(j, set()) - set(checked))
            if missing:
                raise ReplyError(f"lists expert {j} but does not send its array {missing[0]!r}")
            moved = next((k for k in sorted(self.expert_keys.get(j, set()))
                          if s == 0 and not np.array_equal(checked[k], self.schema[k])), None)
            if moved is not None:
                raise ReplyError(f"reports 0 samples for expert {j} but changed its array {moved!r} "
                                 f"(an expert without samples must come back unchanged)")
        try:
            report = ClientReport(
                client_id=reply.client_id, train_seconds=train, download_seconds=download,
                bytes_down=int(sum(v.nbytes for v in checked.values())), routing=routing,
                experts=[{"expert": e, "samples": int(s), "mean_loss": lo, "accuracy": a}
                         for e, s, lo, a in zip(experts, samples, losses, accuracy)])
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ReplyError(f"report field {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        cap = float(n if weight_cap is None else min(n, max(weight_cap, 1.0)))
        return ValidReply(client_id=reply.client_id, arrays=checked, num_examples=n, weight=cap,
                          expert_weights={e: min(s, cap) for e, s in zip(experts, samples) if s > 0},
                          report=report, max_experts=max_experts, routing=routing)

    def _array(self, key: str, value: Any, diff: bool) -> np.ndarray:
        """The reply's array in the model's dtype, or ReplyError (shape, dtype kind, range, finiteness)."""
        arr = np.asarray(value)
        want = self.schema[key]
        if arr.shape != want.shape:
            raise ReplyError(f"array {key!r} must have shape {want.shape}; got {arr.shape}")
        if want.dtype.kind == "f":
            if arr.dtype.kind != "f":
                raise ReplyError(f"array {key!r} must be floating point like the model's {want.dtype}; got {arr.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                out = arr.astype(want.dtype, copy=True)
                if diff:
                    out = want + out
            if not np.all(np.isfinite(out)):
                raise ReplyError(f"array {key!r} holds NaN or infinite values in the model's dtype {want.dtype}")
            return out
        if want.dtype.kind in "iu":
            if arr.dtype.kind not in "iu":
                raise ReplyError(f"array {key!r} must hold integers like the model's {want.dtype}; got {arr.dtype}")
            info = np.iinfo(want.dtype)
            if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise ReplyError(f"array {key!r} holds values outside the range of the model's {want.dtype}")
            out = arr.astype(want.dtype, copy=True)
            if diff:
                total = want.astype(object) + out.astype(object)
                if arr.size and (min(total.flat) < info.min or max(total.flat) > info.max):
                    raise ReplyError(f"array {key!r} plus the current values leaves the range of {want.dtype}")
                out = want + out
            return out
        raise ReplyError(f"array {key!r} has the model dtype {want.dtype}, which replies cannot update")

    def check_round(self, replies: Iterable[Reply], plan: Mapping[str, list[int]],
                    weight_caps: Optional[Mapping[str, float]] = None) -> RoundReplies:
        """Check every reply; ``plan`` maps str(client id) to its planned experts.

        A client that replied more than once has all its replies rejected.
        """
        replies = list(replies)
        counts = Counter(str(r.client_id) for r in replies)
        out = RoundReplies()
        caps = weight_caps or {}
        for reply in replies:
            key = str(reply.client_id)
            if counts[key] > 1:
                out.rejected[key] = f"replied {counts[key]} times in one round"
                continue
            try:
                out.accepted.append(self.check(reply, plan.get(key), caps.get(key)))
            except ReplyError as exc:
                out.rejected[key] = str(exc)
        factor = self.config.weight_factor
        if factor is not None and len(out.accepted) >= 3:
            cap = factor * float(np.median([r.num_examples for r in out.accepted]))
            for r in out.accepted:
                r.weight = min(r.weight, cap)
                r.expert_weights = {e: min(w, cap) for e, w in r.expert_weights.items()}
        return out


MAX_LABEL = 200


def check_declaration(values: Any, num_experts: int) -> dict[str, Any]:
    """What a node's configuration declares before its first round, as ``ClientStatus`` fields.

    ``values`` is the node's answer to a capacity query: ``max-experts`` (an integer in
    [0, 10**6]), ``label`` (printable text, at most 200 characters) and ``routing`` (``num_experts``
    finite numbers >= 0), each optional; other keys are ignored.  ReplyError names the bad value.
    """
    if not isinstance(values, Mapping):
        raise ReplyError(f"has no capacity record; got {describe(values)}")
    out: dict[str, Any] = {}
    k = _count(values, "max-experts", low=0, high=MAX_DECLARED_EXPERTS, required=False)
    if k is not None:
        out["configured_experts"] = k
    if "label" in values:
        label = values["label"]
        if not isinstance(label, str) or not label or len(label) > MAX_LABEL or not label.isprintable():
            raise ReplyError(f"'label' must be printable text of 1 to {MAX_LABEL} characters; got {describe(label)}")
        out["label"] = label
    if "routing" in values:
        out["routing"] = _numbers(values, "routing", num_experts, low=0, high=MAX_MAGNITUDE)
    return out


def capacity_report(reply: ValidReply) -> dict[str, Any]:
    """What an accepted reply says about the client's next round (``max_experts``, ``routing``)."""
    return {k: v for k, v in (("max_experts", reply.max_experts), ("routing", reply.routing)) if v is not None}


def changed_experts(current: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                    owner: Callable[[str], Optional[int]]) -> list[int]:
    """The experts with at least one array that differs between ``current`` and ``new``, sorted."""
    return sorted({j for k in new if (j := owner(k)) is not None and not np.array_equal(new[k], current[k])})


def check_evaluation(metrics: Any, max_examples: int) -> tuple[int, float, float]:
    """``(num-examples, accuracy, loss)`` of an evaluation reply, or ReplyError naming the bad value."""
    if not isinstance(metrics, Mapping):
        raise ReplyError(f"has no metrics record; got {describe(metrics)}")
    n = _count(metrics, "num-examples", low=1, high=max_examples)
    for key, high in (("accuracy", 1.0), ("loss", MAX_MAGNITUDE)):
        if key not in metrics:
            raise ReplyError(f"metric {key!r} is missing")
        v = metrics[key]
        if not finite_number(v) or not 0 <= v <= high:
            raise ReplyError(f"metric {key!r} must be a number in [0, {high:g}]; got {describe(v)}")
    return n, float(metrics["accuracy"]), float(metrics["loss"])


@dataclass
class ValidEvaluation:
    """An evaluation reply that passed :func:`check_evaluations`; ``weight`` is its capped
    ``num-examples``, the weight of its accuracy and loss in :func:`evaluation_mean`."""

    client_id: Label
    num_examples: int
    weight: float
    accuracy: float
    loss: float


def check_evaluations(replies: Iterable[Reply], asked: Iterable[Label], max_examples: int, *,
                      weight_factor: Optional[float] = AggregationConfig().weight_factor,
                      weight_caps: Optional[Mapping[str, float]] = None
                      ) -> tuple[list[ValidEvaluation], dict[str, str]]:
    """Check a round's evaluation replies like training replies: ``(accepted, rejected)``.

    A reply passes only if its node is one of ``asked`` (the nodes sent an evaluation this round,
    compared as ``str``), that node replied once (a node that replied more than once has every
    reply rejected), it carries no error, and its metrics pass :func:`check_evaluation`
    (``1 <= num-examples <= max_examples``).  Each weight is ``num-examples`` capped by the node's
    ``weight_caps`` entry (str(node) -> examples, e.g. the adapters' train caps) and, with 3 or
    more accepted replies, at ``weight_factor`` times their median ``num-examples`` (None: off).
    ``rejected`` maps str(node) to the reason; only ``metrics`` and ``error`` of a :class:`Reply`
    are read.
    """
    replies = list(replies)
    asked_ids = {str(a) for a in asked}
    counts = Counter(str(r.client_id) for r in replies)
    caps = weight_caps or {}
    accepted: list[ValidEvaluation] = []
    rejected: dict[str, str] = {}
    for reply in replies:
        key = str(reply.client_id)
        try:
            if key not in asked_ids:
                raise ReplyError("was not asked to evaluate in this round")
            if counts[key] > 1:
                raise ReplyError(f"replied {counts[key]} times in one round")
            if reply.error is not None:
                raise ReplyError(f"replied with an error: {reply.error}")
            n, accuracy, loss = check_evaluation(reply.metrics, max_examples)
        except ReplyError as exc:
            rejected[key] = str(exc)
            continue
        cap = caps.get(key)
        weight = float(n if cap is None else min(n, max(cap, 1.0)))
        accepted.append(ValidEvaluation(reply.client_id, n, weight, accuracy, loss))
    if weight_factor is not None and len(accepted) >= 3:
        cap = weight_factor * float(np.median([e.num_examples for e in accepted]))
        for e in accepted:
            e.weight = min(e.weight, cap)
    return accepted, rejected


def evaluation_mean(accepted: list[ValidEvaluation]) -> Optional[dict[str, float]]:
    """``{"accuracy", "loss", "num-examples"}``: accuracy and loss averaged by the capped weights of
    the accepted evaluations, and their examples in all; None when nothing was accepted."""
    total = sum(e.weight for e in accepted)
    if not accepted or total <= 0:
        return None
    return {"accuracy": sum(e.weight * e.accuracy for e in accepted) / total,
            "loss": sum(e.weight * e.loss for e in accepted) / total,
            "num-examples": float(sum(e.num_examples for e in accepted))}


def _update_norm(current: Mapping[str, np.ndarray], reply: ValidReply) -> float:
    return math.sqrt(sum(float(np.sum((v.astype(np.float64) - current[k]) ** 2)) for k, v in reply.arrays.items()))


def _scaled(current: Mapping[str, np.ndarray], reply: ValidReply, norm: float, limit: float) -> dict[str, np.ndarray]:
    """The reply's arrays with its update scaled to norm ``limit`` (unchanged when already within)."""
    if norm <= limit:
        return reply.arrays
    scale = limit / norm
    return {k: (current[k] + scale * (v.astype(np.float64) - current[k])).astype(v.dtype) for k, v in reply.arrays.items()}


def held_back(accepted: list[ValidReply], config: AggregationConfig) -> dict[str, Any]:
    """What the privacy floor keeps this round: ``{"min_group": m, "experts": {expert: replies},
    "shared": replies}`` for the experts sent by fewer than ``m`` accepted replies (and the shared
    arrays when fewer than ``m`` were accepted); empty when nothing is held back."""
    experts, shared = below_floor(Counter(j for r in accepted for j in r.expert_weights), len(accepted),
                                  config.min_group)
    out: dict[str, Any] = {}
    if experts:
        out["experts"] = experts
    if shared:
        out["shared"] = len(accepted)
    return {"min_group": config.min_group, **out} if out else {}


def aggregate(current: Mapping[str, np.ndarray], accepted: list[ValidReply], owner: Callable[[str], Optional[int]],
              config: AggregationConfig = AggregationConfig()) -> tuple[dict[str, np.ndarray], set[int]]:
    """New parameters from the accepted replies, and the experts whose arrays were updated.
    Under a privacy floor the arrays :func:`held_back` names keep their current values, and so
    does every array fewer than ``min_group`` accepted replies contributed to."""
    held = held_back(accepted, config)
    kept_experts, keep_shared = set(held.get("experts", {})), "shared" in held
    relative = config.relative_clip is not None and len(accepted) >= 3
    clipping = relative or config.clip_norm is not None
    norms = [_update_norm(current, r) for r in accepted] if clipping else [0.0] * len(accepted)
    limit = math.inf
    if relative and float(np.median(norms)) > 0:
        limit = config.relative_clip * float(np.median(norms))
    if config.clip_norm is not None:
        limit = min(limit, config.clip_norm)
    limits = [limit] * len(accepted)
    contributions: dict[str, list[tuple[np.ndarray, float]]] = {}
    for reply, norm, limit in zip(accepted, norms, limits):
        for k, v in _scaled(current, reply, norm, limit).items():
            j = owner(k)
            if j is not None and j not in reply.expert_weights:
                continue                  # an expert reported with 0 samples: sent back unchanged
            w = reply.weight if j is None else reply.expert_weights[j]
            contributions.setdefault(k, []).append((v, w))
    new = {k: np.array(v, copy=True) for k, v in current.items()}
    updated = set()
    for k, items in contributions.items():
        j = owner(k)
        if (j is None and keep_shared) or j in kept_experts or len(items) < config.min_group:
            continue                      # the privacy floor, counted per array
        stack = np.stack([np.asarray(v, dtype=np.float64) for v, _ in items])
        m = len(items)
        cut = min(int(math.floor(config.trim * m)), (m - 1) // 2)
        robust = (config.method == "median" and m >= 3) or (config.method == "trimmed_mean" and cut >= 1)
        if config.method != "mean" and not robust and config.few == "keep":
            continue
        if config.method == "mean" or not robust:
            w = np.array([w for _, w in items])
            value = np.tensordot(w / w.sum(), stack, axes=1)
        elif config.method == "median":
            value = np.median(stack, axis=0)
        else:
            value = np.sort(stack, axis=0)[cut:m - cut].mean(axis=0)
        new[k] = value.astype(current[k].dtype, copy=False)
        updated.add(k)
    return new, {j for k in updated if (j := owner(k)) is not None}



def failure_message(failed: list[tuple[Any, list[str]]], limit: Optional[int], who: str = "node") -> str:
    """Why training stopped: the failed rounds (``(round, reasons)``, oldest first) and the most
    frequent reason the ``who`` (node, site) gave in them."""
    rounds = [r for r, _ in failed]
    counts = Counter(reason for _, reasons in failed for reason in reasons)
    span = f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]} to {rounds[-1]}"
    head = f"no valid training reply in {len(rounds)} consecutive round(s) ({span}; max_failed_rounds={limit})"
    if not counts:
        return f"{head}; no {who} was planned"
    reason, n = counts.most_common(1)[0]
    more = f"; {len(counts) - 1} other reason(s) in the log and history" if len(counts) > 1 else ""
    return f"{head}; the most frequent reason ({n} of {sum(counts.values())} planned {who}-rounds): {reason}{more}"

__all__ = ["AggregationConfig", "Reply", "ReplyChecker", "RoundReplies", "ValidEvaluation", "ValidReply", "aggregate",
           "capacity_report", "changed_experts", "check_declaration", "check_evaluation", "check_evaluations",
           "evaluation_mean", "finite_number", "held_back"]
