"""PyTorch client helpers for aligned rounds, one set for Flower and NVFlare (extra ``torch``).

Model conventions (:mod:`alignment_solver.integrations.units`): an MoE layer is a module with an
``nn.ModuleList`` attribute ``experts`` and an ``nn.Linear`` router child (named ``router``,
``gate``, ``gating``, ``w_gate`` or ``route``, or else the only ``nn.Linear`` child with one output
per expert) whose output logits the layer turns into its top-k choice; an int attribute
``top_k`` (or ``k``, ``num_experts_per_tok``) is that k.  Any number of MoE layers; everything
else is shared.

Training, inside the user's own loop and optimiser::

    client = AlignedClient(model, msg)          # a Flower Message or an NVFlare FLModel
    with client.training():                     # masks routers, clamps top-k, records routing
        for x, y in loader:
            optimiser.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimiser.step()
            client.track(out, y)                # per-unit samples, loss, accuracy of this batch
    return client.reply()                       # Message or FLModel: only the keys it received

:class:`AlignedClient` loads exactly the shared arrays and the assigned units' arrays (anything
else is a ValueError: the server sent the wrong thing) in the model's own dtype.  During
``training()`` every router's logits of unassigned experts are set to the dtype's lowest value
(a forward hook) and each layer's top-k is clamped to its number of assigned experts, so
unassigned experts receive neither samples nor gradients.  :meth:`AlignedClient.track` attributes
each sample of a batch to the units its (masked) routing chose in any layer (per-sample loss and
accuracy, cross-entropy by default); :meth:`AlignedClient.reply` reports them in the order of
``experts``:

===================  ===========================================================================
``num-examples``     samples passed to ``track`` (all epochs)
``experts``          every assigned unit, ascending
``expert-samples``   samples routed to each unit; an assigned unit that got none reports 0,
                     ``expert-loss`` = the client's mean loss and ``expert-accuracy`` = 0 (its
                     arrays go back unchanged, so its average moves by nothing it learnt)
``expert-loss``      mean loss of those samples
``expert-accuracy``  accuracy of those samples
``train-seconds``    wall time inside ``training()``
``routing``          samples the UNmasked routers would send to each unit (cold-start prior)
``max-experts``      optional, from ``reply(max_experts=...)``
===================  ===========================================================================

:func:`evaluate_reply` loads the full model and answers an evaluate message with
``num-examples``, ``accuracy`` and ``loss``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .units import UnitMap

ROUTER_NAMES = ("router", "gate", "gating", "w_gate", "route")
TOP_K_NAMES = ("top_k", "k", "num_experts_per_tok")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MoELayer:
    """One MoE layer of a model: its path, router, expert count and each expert's unit id."""

    name: str
    module: nn.Module
    router: nn.Linear
    units: list[int]
    top_k_attr: Optional[str]

    @property
    def top_k(self) -> int:
        return int(getattr(self.module, self.top_k_attr)) if self.top_k_attr else 1


def moe_layers(model: nn.Module, unit_map: UnitMap) -> list[MoELayer]:
    """Every MoE layer of ``model`` (see the module docstring); ValueError if none is found."""
    layers = []
    keys = set(unit_map.keys)
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.ModuleList):
            continue
        n = len(experts)
        linears = {child_name: child for child_name, child in module.named_children()
                   if isinstance(child, nn.Linear) and child.out_features == n}
        named = [linears[r] for r in ROUTER_NAMES if r in linears]
        router = named[0] if named else (next(iter(linears.values())) if len(linears) == 1 else None)
        if router is None:
            raise ValueError(f"MoE layer {name or '<model>'!r} has {n} experts but no router: give it an nn.Linear "
                             f"child named one of {list(ROUTER_NAMES)} with out_features={n}")
        prefix = f"{name}.experts." if name else "experts."
        units = []
        for j in range(n):
            key = next((k for k in unit_map.keys if k.startswith(f"{prefix}{j}.") and k in keys), None)
            unit = None if key is None else unit_map.unit_of(key)
            if unit is None:
                raise ValueError(f"expert {j} of MoE layer {name!r} has no parameter key that maps to a unit")
            units.append(unit)
        top_k = next((a for a in TOP_K_NAMES if isinstance(getattr(module, a, None), int)
                      and not isinstance(getattr(module, a), bool)), None)
        layers.append(MoELayer(name, module, router, units, top_k))
    if not layers:
        raise ValueError("the model has no MoE layer: a module with an nn.ModuleList attribute 'experts' and an "
                         "nn.Linear router")
    return layers


def _unpack(received: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """(arrays, config, kind) of a Flower ``Message`` or an NVFlare ``FLModel``."""
    if hasattr(received, "content") and hasattr(received, "metadata"):
        content = received.content
        record = content["arrays"] if "arrays" in content else {}
        arrays = {k: record[k].numpy() for k in record.keys()}
        config = dict(content["config"]) if "config" in content else {}
        return arrays, config, "flower"
    if hasattr(received, "params") and hasattr(received, "meta"):
        arrays = {str(k): (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                  for k, v in (received.params or {}).items()}
        return arrays, dict(received.meta or {}), "nvflare"
    raise TypeError(f"expected a Flower Message or an NVFlare FLModel; got {type(received).__name__}")


def _load(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into ``model`` in the model's own dtype and device, checking shapes."""
    state = model.state_dict()
    tensors = {}
    for key, value in arrays.items():
        want = state[key]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"received array {key!r} has shape {tuple(value.shape)}; the model's is "
                             f"{tuple(want.shape)}")
        tensors[key] = torch.from_numpy(np.array(value, copy=True)).to(dtype=want.dtype, device=want.device)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"received keys the model does not have: {result.unexpected_keys[:5]}")


def _reply(received: Any, kind: str, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Any:
    if kind == "flower":
        from flwr.app import Message, MetricRecord, RecordDict

        from .flower import to_record
        content = {"metrics": MetricRecord(metrics)}
        if arrays:
            content["arrays"] = to_record(arrays)
        return Message(content=RecordDict(content), reply_to=received)
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    if not arrays:
        return FLModel(params={}, metrics=metrics)
    return FLModel(params_type=ParamsType.FULL, params=arrays, metrics=metrics)


def _per_sample(outputs: torch.Tensor, targets: torch.Tensor, loss: Optional[Loss]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and accuracy (tokens averaged for sequence outputs), detached."""
    out, y = outputs.detach(), targets.detach()
    if out.shape[:-1] != y.shape:
        raise ValueError(f"outputs {tuple(out.shape)} and targets {tuple(y.shape)} do not match (expected outputs "
                         f"of shape targets + (classes,)); pass loss= and use track(..., correct=...) otherwise")
    if loss is None:
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="none")
    else:
        per = loss(out, y).reshape(-1).float()
    B = y.shape[0]
    per = per.reshape(B, -1).mean(dim=1)
    correct = (out.argmax(dim=-1) == y).float().reshape(B, -1).mean(dim=1)
    return per, correct


class AlignedClient:
    """One training round of a PyTorch MoE on a client (see the module docstring).

    ``received`` is the server's message (Flower ``Message`` or NVFlare ``FLModel``) carrying the
    arrays and ``experts`` / ``units`` (``config`` or ``meta``).  ``expert_of`` must be the mapping
    the server uses when it is not the default.  ``loss(outputs, targets)`` returns per-element
    losses (``reduction="none"``) when cross-entropy does not fit.
    """

    def __init__(self, model: nn.Module, received: Any, *, expert_of: Optional[Callable[[str], Optional[int]]] = None,
                 loss: Optional[Loss] = None) -> None:
        arrays, config, kind = _unpack(received)
        if "experts" not in config:
            raise ValueError("the received message names no 'experts' (config or meta): not a training task "
                             "of an aligned server")
        units = str(config.get("units", "expert"))
        self.model, self.received, self.kind, self.loss = model, received, kind, loss
        self.map = UnitMap(model.state_dict().keys(), units=units, expert_of=expert_of)
        self.assigned = sorted({int(e) for e in config["experts"]})
        bad = [e for e in self.assigned if not 0 <= e < self.map.num_units]
        if bad:
            raise ValueError(f"assigned units {bad} do not exist (the model has {self.map.num_units})")
        expected = set(self.map.shared_keys()) | set(self.map.keys_of(self.assigned))
        got = set(arrays)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"received arrays do not match assigned units {self.assigned}: "
                             f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        _load(model, arrays)
        self.keys = [k for k in self.map.keys if k in got]
        self.layers = moe_layers(model, self.map)
        E = self.map.num_units
        mine = torch.zeros(E, dtype=torch.bool)
        mine[self.assigned] = True
        self._masks = {layer.name: mine[layer.units] for layer in self.layers}
        self.samples, self.loss_sum, self.correct_sum = np.zeros(E), np.zeros(E), np.zeros(E)
        self.routing = np.zeros(E)
        self.num_examples, self.total_loss, self.seconds = 0, 0.0, 0.0
        self._routed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._active = False

    # ---- training ---------------------------------------------------------------------------
    def _hook(self, layer: MoELayer, k: int, k_raw: int) -> Callable[..., torch.Tensor]:
        mask = self._masks[layer.name]

        def hook(module: nn.Module, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
            m = mask.to(logits.device)
            low = torch.finfo(logits.dtype).min if logits.dtype.is_floating_point else -(2 ** 31)
            masked = logits.masked_fill(~m, low)
            with torch.no_grad():
                n = logits.shape[-1]
                B = logits.shape[0]
                raw = torch.zeros((B, n), dtype=torch.bool, device=logits.device)
                chosen = torch.zeros((B, n), dtype=torch.bool, device=logits.device)
                flat_raw = logits.detach().reshape(B, -1, n).topk(min(k_raw, n), dim=-1).indices
                flat = masked.detach().reshape(B, -1, n).topk(k, dim=-1).indices
                raw.scatter_(1, flat_raw.reshape(B, -1), True)
                chosen.scatter_(1, flat.reshape(B, -1), True)
                self._routed[layer.name] = (chosen.cpu(), raw.cpu())
            return masked
        return hook

    @contextlib.contextmanager
    def training(self) -> Iterator["AlignedClient"]:
        """Routers masked to the assigned units, top-k clamped, routing recorded; model in train mode."""
        handles, saved = [], []
        started = time.perf_counter()
        try:
            for layer in self.layers:
                assigned = int(self._masks[layer.name].sum())
                k_raw = layer.top_k
                k = max(1, min(k_raw, assigned))
                if layer.top_k_attr:
                    saved.append((layer.module, layer.top_k_attr, k_raw))
                    setattr(layer.module, layer.top_k_attr, k)
                handles.append(layer.router.register_forward_hook(self._hook(layer, k, k_raw)))
            self.model.train()
            self._active = True
            yield self
        finally:
            self._active = False
            for h in handles:
                h.remove()
            for module, attr, value in saved:
                setattr(module, attr, value)
            self.seconds += time.perf_counter() - started

    def track(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Attribute this batch (the last forward pass) to the units its samples were routed to."""
        if not self._active:
            raise RuntimeError("track() belongs inside 'with client.training():'")
        missing = [layer.name for layer in self.layers if layer.name not in self._routed]
        if missing:
            raise RuntimeError(f"no forward pass through MoE layer {missing[0]!r} since the last track(): call "
                               f"track(outputs, targets) once after each forward pass")
        per, correct = _per_sample(outputs, targets, self.loss)
        B = per.shape[0]
        E = self.map.num_units
        unit_chosen = torch.zeros((B, E), dtype=torch.bool)
        unit_raw = torch.zeros((B, E), dtype=torch.bool)
        for layer in self.layers:
            chosen, raw = self._routed.pop(layer.name)
            if chosen.shape[0] != B:
                raise ValueError(f"MoE layer {layer.name!r} routed {chosen.shape[0]} samples but the batch has {B}")
            idx = torch.tensor(layer.units)
            unit_chosen[:, idx] |= chosen
            unit_raw[:, idx] |= raw
        w = unit_chosen.float()
        self.samples += w.sum(dim=0).numpy()
        self.loss_sum += (per.cpu() @ w).numpy()
        self.correct_sum += (correct.cpu() @ w).numpy()
        self.routing += unit_raw.float().sum(dim=0).numpy()
        self.num_examples += B
        self.total_loss += float(per.sum())

    # ---- the reply --------------------------------------------------------------------------
    def metrics(self, max_experts: Optional[int] = None) -> dict[str, Any]:
        """The reply's metrics (see the module docstring)."""
        if self.num_examples == 0:
            raise RuntimeError("track() was never called: the reply would claim no samples")
        mean = self.total_loss / self.num_examples
        a = self.assigned
        n = self.samples[a]
        safe = np.maximum(n, 1)
        metrics: dict[str, Any] = {
            "num-examples": int(self.num_examples), "experts": list(a),
            "expert-samples": [int(v) for v in n],
            "expert-loss": [float(v) for v in np.where(n > 0, self.loss_sum[a] / safe, mean)],
            "expert-accuracy": [float(v) for v in np.where(n > 0, self.correct_sum[a] / safe, 0.0)],
            "train-seconds": float(self.seconds), "routing": [float(v) for v in self.routing]}
        if max_experts is not None:
            metrics["max-experts"] = int(max_experts)
        return metrics

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that go back: exactly the received keys, in the model's dtype."""
        state = self.model.state_dict()
        return {k: state[k].detach().cpu().numpy() for k in self.keys}

    def reply(self, *, max_experts: Optional[int] = None) -> Any:
        """The training reply, of the received message's kind (Flower ``Message`` or ``FLModel``)."""
        return _reply(self.received, self.kind, self.arrays(), self.metrics(max_experts))


def evaluate_reply(model: nn.Module, received: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                   loss: Optional[Loss] = None) -> Any:
    """Load the full received model, score it on ``batches`` and build the evaluate reply.

    The received keys must be exactly the model's (ValueError otherwise).  Metrics:
    ``num-examples``, ``accuracy`` and ``loss`` (per-sample means, cross-entropy by default).
    """
    arrays, _, kind = _unpack(received)
    keys = set(model.state_dict())
    if set(arrays) != keys:
        missing, extra = sorted(keys - set(arrays)), sorted(set(arrays) - keys)
        raise ValueError(f"an evaluate message must carry the whole model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    _load(model, arrays)
    model.eval()
    n, total, correct = 0, 0.0, 0.0
    with torch.no_grad():
        for x, y in batches:
            per, ok = _per_sample(model(x), y, loss)
            n += len(per)
            total += float(per.sum())
            correct += float(ok.sum())
    if n == 0:
        raise ValueError("evaluate_reply got no batch")
    return _reply(received, kind, {}, {"num-examples": n, "accuracy": correct / n, "loss": total / n})


__all__ = ["AlignedClient", "MoELayer", "evaluate_reply", "moe_layers"]
