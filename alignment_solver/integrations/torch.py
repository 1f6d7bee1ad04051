"""PyTorch client helpers for aligned rounds, one set for Flower and NVFlare (extra ``torch``).

Model conventions (:mod:`alignment_solver.integrations.units`, names in
:mod:`alignment_solver.integrations.families`).  An MoE layer is a module that holds

- its experts: an ``nn.ModuleList`` attribute ``experts`` (one module per expert), or fused
  parameters with an expert axis (a child module ``experts`` holding ``gate_up_proj (E, 2I, H)``
  and the like, as in transformers 5; other names declared with ``expert_axes``);
- a router child (named ``router``, ``gate``, ``gating``, ``w_gate`` or ``route``, or else the
  only ``nn.Linear`` child with one output per expert): an ``nn.Linear`` gate whose logits the
  layer turns into its top-k, or a TopK router module that scores (softmax or sigmoid, optional
  correction bias, group-limited choice) and picks its top-k itself;
- optionally an int attribute ``top_k`` (or ``k``, ``num_experts_per_tok``), on the layer or the
  router.

Any number of MoE layers; everything else is shared.  Hugging Face models (transformers 4.x one
module per expert, transformers 5 fused experts and TopK routers) work at the defaults; the
tested families are listed in :data:`~alignment_solver.integrations.families.FAMILIES`.

Training, inside the user's own loop and optimiser::

    client = AlignedClient(model, msg)          # a Flower Message or an NVFlare FLModel
    with client.training():                     # masks routers, clamps top-k, records routing
        for x, y in loader:
            optimiser.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimiser.step()
            client.track(out, y)                # per-unit tokens, loss, accuracy of this batch
    return client.reply()                       # Message or FLModel: only the keys it received

:class:`AlignedClient` writes exactly the shared arrays and the assigned units' arrays into the
model, in place and in the model's own dtype (a fused parameter's slice ``K[j]`` into expert
``j``'s part of ``K``; anything else is a ValueError: the server sent the wrong thing).

**Masking.**  During ``training()`` each MoE layer's forward runs under a torch function mode
that (1) sets the router's logits of unassigned experts to the dtype's lowest value as the router
computes them (its ``F.linear`` with one output per expert), so softmax gives them 0 and sigmoid
0, and (2) sets unassigned experts to ``-inf`` in every top-k over the layer's experts and clamps
that k to the number of assigned experts (the layer's and router's top-k attributes too).  So
the router's own top-k can only pick assigned experts: unassigned experts receive neither tokens
nor gradients.  While masked, a group-limited router may choose among all its groups
(``topk_group`` raised to the group count).  A layer whose experts are all assigned is not
changed at all: its output is bit-identical to the unmasked model's.

**Attribution** (:meth:`AlignedClient.track`).  Routers may see ``(batch*tokens, d)`` or
``(batch, tokens, d)``; every MoE layer must route the same tokens.  A token counts once for
each unit it was routed to in any layer.

- Token tasks: ``outputs (batch, tokens, classes)`` with ``targets (batch, tokens)`` over the
  tokens the routers saw (a causal LM passes its full logits and the labels shifted left, with
  ``ignore_index`` in the last position).  Targets equal to ``ignore_index`` (default -100) and
  positions where ``mask`` is 0 are skipped.  A unit's loss and accuracy are those of the tokens
  routed to it.
- Sequence (and sample) tasks: ``outputs (batch, classes)`` with ``targets (batch,)``.  Each
  sample's loss is shared among units by its routing mass: the share of its (unmasked by
  ``mask``) tokens routed to the unit.  With one token per sample this is per-sample attribution.

:meth:`AlignedClient.reply` reports (lists in the order of ``experts``):

===================  ===========================================================================
``num-examples``     tokens passed to ``track`` (samples when every router saw one token per
                     sample), all epochs
``counts-tokens``    1 when ``num-examples`` counts tokens, 0 when it counts samples
``experts``          every assigned unit, ascending
``expert-samples``   tokens routed to each unit; an assigned unit that got none reports 0,
                     ``expert-loss`` = the client's mean loss and ``expert-accuracy`` = 0, and its
                     arrays go back as they were received (whatever the optimiser did to them)
``expert-loss``      mean loss of those tokens (sequence tasks: weighted by routing mass)
``expert-accuracy``  accuracy of those tokens (likewise)
``train-seconds``    wall time inside ``training()``
``routing``          tokens the UNmasked routers' logits would send to each unit (cold-start prior)
``max-experts``      optional, from ``reply(max_experts=...)``
===================  ===========================================================================

:func:`evaluate_reply` loads the full model and answers an evaluate message with
``num-examples``, ``accuracy`` and ``loss`` (tokens for token tasks).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .families import GROUP_LIMITS, ROUTER_NAMES, TOP_K_NAMES, expert_count
from .units import UnitMap, slice_key

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE_INDEX = -100
_TOPK = (torch.topk, torch.Tensor.topk)


@dataclass
class MoELayer:
    """One MoE layer of a model: its path, module, router, each expert's unit id, where its top-k
    lives (``(module, attribute)`` pairs) and its group limit (``(router, attribute, groups)``)."""

    name: str
    module: nn.Module
    router: nn.Module
    units: list[int]
    top_k_attrs: list[tuple[nn.Module, str]] = field(default_factory=list)
    group_limit: Optional[tuple[nn.Module, str, int]] = None

    @property
    def top_k(self) -> int:
        return int(getattr(*self.top_k_attrs[0])) if self.top_k_attrs else 1


def _int_attr(module: nn.Module, name: str) -> bool:
    value = getattr(module, name, None)
    return isinstance(value, int) and not isinstance(value, bool)


def _router(module: nn.Module, n: int) -> Optional[nn.Module]:
    """The router child of an MoE layer with ``n`` experts (see the module docstring), or None."""
    children = dict(module.named_children())

    def scores_n(child: nn.Module) -> bool:
        if isinstance(child, nn.Linear):
            return child.out_features == n
        return any(p.ndim >= 1 and p.shape[0] == n for p in child.parameters())

    named = [children[r] for r in ROUTER_NAMES if r in children and scores_n(children[r])]
    if named:
        return named[0]
    linears = [c for c in children.values() if isinstance(c, nn.Linear) and c.out_features == n]
    return linears[0] if len(linears) == 1 else None


def moe_layers(model: nn.Module, unit_map: UnitMap) -> list[MoELayer]:
    """Every MoE layer of ``model`` (see the module docstring); ValueError if none is found or a
    layer has no router or an expert without a unit."""
    modules = dict(model.named_modules())
    found: dict[str, list[int]] = {}
    for name, module in modules.items():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.ModuleList):
            continue
        prefix = f"{name}.experts." if name else "experts."
        units = []
        for j in range(len(experts)):
            key = next((k for k in unit_map.keys if k.startswith(f"{prefix}{j}.")), None)
            unit = None if key is None else unit_map.unit_of(key)
            if unit is None:
                raise ValueError(f"expert {j} of MoE layer {name!r} has no parameter key that maps to a unit")
            units.append(unit)
        found[name] = units
    for key, fused in unit_map.fused.items():
        path = fused.layer.rstrip(".")
        while path and (path not in modules or _router(modules[path], fused.n) is None):
            path = path.rpartition(".")[0]
        if not path and _router(model, fused.n) is None:
            raise ValueError(f"the fused expert parameter {key!r} lies in no module with a router child "
                             f"(one of {list(ROUTER_NAMES)} scoring {fused.n} experts)")
        units = [unit_map.unit_of(slice_key(key, j)) for j in range(fused.n)]
        if found.setdefault(path, units) != units:
            raise ValueError(f"the fused parameters of MoE layer {path!r} map their experts to different units")
    layers = []
    for name, units in found.items():
        module = modules[name]
        router = _router(module, len(units))
        if router is None:
            raise ValueError(f"MoE layer {name or '<model>'!r} has {len(units)} experts but no router: give it a child "
                             f"named one of {list(ROUTER_NAMES)} scoring {len(units)} experts (an nn.Linear with "
                             f"out_features={len(units)} or a TopK router with a ({len(units)}, hidden) weight)")
        attrs = [(m, a) for m in (module, router) for a in TOP_K_NAMES if _int_attr(m, a)]
        limit = next(((router, chosen, int(getattr(router, groups))) for chosen, groups in GROUP_LIMITS
                      if _int_attr(router, chosen) and _int_attr(router, groups)), None)
        layers.append(MoELayer(name, module, router, units, attrs, limit))
    if not layers:
        raise ValueError("the model has no MoE layer: a module with an nn.ModuleList attribute 'experts' or fused "
                         "expert parameters (a child module 'experts', or declared with expert_axes), and a router")
    return sorted(layers, key=lambda layer: list(modules).index(layer.name))


class _LayerRouting:
    """One MoE layer's mask while training and what its last forward pass routed."""

    def __init__(self, layer: MoELayer, mask: torch.Tensor, k_raw: int) -> None:
        self.layer, self.mask, self.k_raw = layer, mask, k_raw
        self.n = len(layer.units)
        self.assigned = int(mask.sum())
        self.full = self.assigned == self.n
        self.in_router = self.depth = 0
        self.logits: Optional[torch.Tensor] = None
        self.chosen: Optional[torch.Tensor] = None

    def begin(self) -> None:
        self.logits, self.chosen = None, None

    @contextlib.contextmanager
    def masked(self) -> Iterator[None]:
        """The masking mode around this layer's code, entered once however the calls nest."""
        if self.depth:
            yield
            return
        self.depth += 1
        try:
            with _Masked(self):
                yield
        finally:
            self.depth -= 1

    def record(self, indices: torch.Tensor) -> None:
        flat = indices.detach().reshape(-1, indices.shape[-1]).cpu()
        chosen = torch.zeros((flat.shape[0], self.n), dtype=torch.bool)
        self.chosen = chosen.scatter_(1, flat, True)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, raw) routing of the last forward pass, each ``(tokens, n)``; RuntimeError if none."""
        if self.chosen is None and self.logits is None:
            raise RuntimeError(f"no forward pass through MoE layer {self.layer.name!r} since the last track() (or its "
                               f"router computed no {self.n} logits): call track(outputs, targets) once after each "
                               f"forward pass")
        logits = None if self.logits is None else self.logits.reshape(-1, self.n).float().cpu()
        if self.chosen is None:
            masked = logits.masked_fill(~self.mask, float("-inf"))
            self.record(masked.topk(max(1, min(self.layer.top_k, self.assigned)), dim=-1).indices)
        chosen = self.chosen
        raw = chosen if logits is None or logits.shape[0] != chosen.shape[0] else torch.zeros_like(chosen).scatter_(
            1, logits.topk(min(self.k_raw, self.n), dim=-1).indices, True)
        self.logits, self.chosen = None, None
        return chosen, raw


class _Masked(TorchFunctionMode):
    """Inside one MoE layer's forward: masks the router's logits and every top-k over the layer's
    experts (clamping k), and records the experts chosen (see the module docstring)."""

    def __init__(self, routing: _LayerRouting) -> None:
        super().__init__()
        self.routing = routing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = self.routing
        if func is F.linear and r.in_router:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.ndim >= 1 and out.shape[-1] == r.n:
                r.logits = out.detach()
                if not r.full:
                    out = out.masked_fill(~r.mask.to(out.device), torch.finfo(out.dtype).min)
            return out
        if func in _TOPK:
            names = ("input", "k", "dim", "largest", "sorted")
            call = {**dict(zip(names, args)), **kwargs}
            x, dim = call.get("input"), call.get("dim", -1)
            if (set(call) <= set(names) and isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 1
                    and call.get("largest", True) and dim % x.ndim == x.ndim - 1 and x.shape[-1] == r.n):
                k = int(call["k"])
                if not r.full:
                    x = x.masked_fill(~r.mask.to(x.device), float("-inf"))
                    k = min(k, r.assigned)
                result = torch.topk(x, k, dim=dim, largest=True, sorted=call.get("sorted", True))
                r.record(result.indices)
                return result
        return func(*args, **kwargs)


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


def _target(state: Mapping[str, torch.Tensor], unit_map: Optional[UnitMap], key: str) -> torch.Tensor:
    """The model tensor (or expert slice of a fused one) that transport key ``key`` names
    (``unit_map`` None: every key is a model key)."""
    full, j = (key, None) if unit_map is None else unit_map.source(key)
    tensor = state[full]
    return tensor if j is None else tensor.select(unit_map.fused[full].axis, j)


def _load(model: nn.Module, arrays: Mapping[str, np.ndarray], unit_map: Optional[UnitMap]) -> None:
    """Write transport ``arrays`` into ``model`` in place, in the model's dtype and device, checking
    shapes (``unit_map`` None: the arrays are the model's own keys)."""
    state = model.state_dict()
    unknown = [k for k in arrays if (k if unit_map is None else unit_map.source(k)[0]) not in state]
    if unknown:
        raise ValueError(f"received keys the model does not have: {unknown[:5]}")
    targets = {k: _target(state, unit_map, k) for k in arrays}
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(targets[key].shape):
            raise ValueError(f"received array {key!r} has shape {tuple(value.shape)}; the model's is "
                             f"{tuple(targets[key].shape)}")
    with torch.no_grad():
        for key, value in arrays.items():
            targets[key].copy_(torch.from_numpy(np.array(value, copy=True)))


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


def _logits(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or a Hugging Face ``ModelOutput``'s ``logits``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"outputs must be a tensor of logits (or a model output with .logits); got "
                    f"{type(outputs).__name__}")


def _elementwise(outputs: Any, targets: torch.Tensor, loss: Optional[Loss],
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, correctness and validity of each target element (shape ``targets.shape``), detached, on the CPU."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor; got {type(targets).__name__}")
    out, y = _logits(outputs).detach(), targets.detach()
    if y.ndim == 0 or out.shape[:-1] != y.shape:
        raise ValueError(f"outputs {tuple(out.shape)} and targets {tuple(y.shape)} do not match (expected outputs "
                         f"of shape targets + (classes,), targets (batch,) or (batch, tokens)); pass loss= otherwise")
    valid = torch.ones_like(y, dtype=torch.bool) if y.is_floating_point() else y != ignore_index
    if loss is None:
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="none",
                              ignore_index=ignore_index).reshape(y.shape)
    else:
        per = loss(out, y).detach().float()
        if per.numel() != y.numel():
            raise ValueError(f"loss(outputs, targets) must return one loss per target element ({tuple(y.shape)}, "
                             f"reduction='none'); got shape {tuple(per.shape)}")
        per = per.reshape(y.shape)
    correct = (out.argmax(dim=-1) == y) & valid
    return per.masked_fill(~valid, 0.0).cpu(), correct.float().cpu(), valid.cpu()


def _declared_axes(value: Any) -> dict[str, int]:
    """The server's ``expert-axes`` (JSON text or a dict ``{regex: axis}``); ValueError otherwise."""
    try:
        axes = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise ValueError(f"the received 'expert-axes' is not JSON: {exc}") from None
    if not isinstance(axes, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in axes.items()):
        raise ValueError(f"the received 'expert-axes' must map regular expressions to axes; got {value!r}")
    return axes


class AlignedClient:
    """One training round of a PyTorch MoE on a client (see the module docstring).

    ``received`` is the server's message (Flower ``Message`` or NVFlare ``FLModel``) carrying the
    transport arrays and ``experts`` / ``units`` / ``num-experts`` (``config`` or ``meta``).
    ``expert_of`` must be the mapping the server uses when it is not the default;
    ``expert_axes`` defaults to the server's declaration (config ``expert-axes``).
    ``loss(outputs, targets)`` returns per-element losses (``reduction="none"``) when
    cross-entropy does not fit; ``ignore_index`` marks targets to skip.
    """

    def __init__(self, model: nn.Module, received: Any, *, expert_of: Optional[Callable[[str], Optional[int]]] = None,
                 expert_axes: Optional[Mapping[str, int]] = None, loss: Optional[Loss] = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        arrays, config, kind = _unpack(received)
        if "experts" not in config:
            raise ValueError("the received message names no 'experts' (config or meta): not a training task "
                             "of an aligned server")
        units = str(config.get("units", "expert"))
        self.model, self.received, self.kind, self.loss = model, received, kind, loss
        self.ignore_index = int(ignore_index)
        declared = config.get("num-experts")
        num_experts = int(declared) if declared is not None else expert_count(getattr(model, "config", None))
        if expert_axes is None and config.get("expert-axes"):
            expert_axes = _declared_axes(config["expert-axes"])
        state = model.state_dict()
        self.map = UnitMap(state, units=units, expert_of=expert_of, expert_axes=expert_axes,
                           num_experts=num_experts)
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
        _load(model, arrays, self.map)
        self.keys = [k for k in self.map.keys if k in got]
        self._received = {k: v for k, v in arrays.items() if self.map.unit_of(k) is not None}
        self.layers = moe_layers(model, self.map)
        E = self.map.num_units
        mine = torch.zeros(E, dtype=torch.bool)
        mine[self.assigned] = True
        self._masks = {layer.name: mine[layer.units] for layer in self.layers}
        empty = [layer.name for layer in self.layers if not self._masks[layer.name].any()]
        if empty:
            raise ValueError(f"no assigned unit in MoE layer {empty[0]!r} (assigned: {self.assigned}): its router "
                             f"would have to route to unassigned experts")
        self.samples, self.loss_sum, self.correct_sum, self.mass = (np.zeros(E) for _ in range(4))
        self.routing = np.zeros(E)
        self.num_examples, self.total_loss, self.loss_count, self.seconds = 0, 0.0, 0, 0.0
        self.counts_tokens: Optional[bool] = None
        self._routing: dict[str, _LayerRouting] = {}
        self._active = False

    # ---- training ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self) -> Iterator["AlignedClient"]:
        """Routers masked to the assigned units, top-k clamped, routing recorded; model in train
        mode.  Everything is restored on exit."""
        saved: list[tuple[nn.Module, str, Any, bool]] = []     # (module, attribute, old value, was in __dict__)

        def override(module: nn.Module, attr: str, value: Any) -> None:
            saved.append((module, attr, module.__dict__.get(attr), attr in module.__dict__))
            setattr(module, attr, value)

        started = time.perf_counter()
        try:
            for layer in self.layers:
                routing = _LayerRouting(layer, self._masks[layer.name], layer.top_k)
                self._routing[layer.name] = routing
                if not routing.full:
                    k = max(1, min(layer.top_k, routing.assigned))
                    for module, attr in layer.top_k_attrs:
                        override(module, attr, min(int(getattr(module, attr)), k))
                    if layer.group_limit is not None:
                        override(layer.group_limit[0], layer.group_limit[1], layer.group_limit[2])
                override(layer.module, "forward", self._layer_forward(layer.module.forward, routing))
                override(layer.router, "forward", self._router_forward(layer.router.forward, routing))
            self.model.train()
            self._active = True
            yield self
        finally:
            self._active = False
            for module, attr, old, had in reversed(saved):
                if had:
                    module.__dict__[attr] = old
                else:
                    delattr(module, attr)
            self.seconds += time.perf_counter() - started

    @staticmethod
    def _layer_forward(forward: Callable[..., Any], routing: _LayerRouting) -> Callable[..., Any]:
        def masked_forward(*args: Any, **kwargs: Any) -> Any:
            routing.begin()
            with routing.masked():
                return forward(*args, **kwargs)
        return masked_forward

    @staticmethod
    def _router_forward(forward: Callable[..., Any], routing: _LayerRouting) -> Callable[..., Any]:
        def router_forward(*args: Any, **kwargs: Any) -> Any:
            routing.in_router += 1
            try:
                with routing.masked():             # a layer that calls its router outside its forward
                    return forward(*args, **kwargs)
            finally:
                routing.in_router -= 1
        return router_forward

    def _routed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, raw) units of each routed token of the last forward pass, each ``(tokens, units)``."""
        E = self.map.num_units
        chosen_all = raw_all = None
        for layer in self.layers:
            chosen, raw = self._routing[layer.name].result()
            idx = torch.tensor(layer.units)
            unit_chosen = torch.zeros((chosen.shape[0], E), dtype=torch.bool)
            unit_raw = torch.zeros_like(unit_chosen)
            unit_chosen[:, idx] = chosen
            unit_raw[:, idx] = raw
            if chosen_all is None:
                chosen_all, raw_all, first = unit_chosen, unit_raw, layer.name
            elif chosen_all.shape[0] != unit_chosen.shape[0]:
                raise ValueError(f"MoE layers {first!r} and {layer.name!r} routed {chosen_all.shape[0]} and "
                                 f"{unit_chosen.shape[0]} tokens: every MoE layer must route the same tokens")
            else:
                chosen_all |= unit_chosen
                raw_all |= unit_raw
        return chosen_all, raw_all

    def track(self, outputs: Any, targets: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> None:
        """Attribute this batch (the last forward pass) to the units its tokens were routed to.

        ``outputs`` are the logits (or a Hugging Face model output, whose ``logits`` are used).

        Token tasks: ``outputs (batch, tokens, classes)``, ``targets (batch, tokens)``; sequence
        tasks: ``outputs (batch, classes)``, ``targets (batch,)`` (see the module docstring).
        ``mask`` (optional, ``(batch, tokens)``, e.g. an attention mask) marks the tokens that count.
        """
        if not self._active:
            raise RuntimeError("track() belongs inside 'with client.training():'")
        chosen, raw = self._routed()
        per, correct, valid = _elementwise(outputs, targets, self.loss, self.ignore_index)
        N, B = chosen.shape[0], per.shape[0]
        token_task = per.ndim >= 2
        if token_task and N != per.numel():
            raise ValueError(f"the MoE layers routed {N} tokens but the targets {tuple(per.shape)} have {per.numel()}: "
                             f"for a token task pass outputs and targets over the tokens the routers saw (a causal LM: "
                             f"its full logits and the labels shifted left, ignore_index in the last position)")
        if not token_task and N % B:
            raise ValueError(f"the MoE layers routed {N} tokens, which is not a whole number per sample of the "
                             f"batch of {B}")
        T = N // B
        counted = valid.reshape(B, -1).expand(B, T) if not token_task else valid.reshape(B, T)
        if mask is not None:
            m = mask.detach().cpu()
            if m.numel() != N:
                raise ValueError(f"mask has {m.numel()} entries; the MoE layers routed {N} tokens ({B} x {T})")
            counted = counted & m.reshape(B, T).bool()
        tokens = token_task or T > 1
        if self.counts_tokens is not None and self.counts_tokens != tokens:
            raise ValueError("track() got token batches and one-token-per-sample batches in one round: num-examples "
                             "must count one kind")
        self.counts_tokens = tokens
        on = counted.reshape(N, 1)
        hits = (chosen & on).reshape(B, T, -1).float()              # (batch, tokens, units)
        self.samples += hits.sum(dim=(0, 1)).numpy()
        self.routing += (raw & on).reshape(B, T, -1).float().sum(dim=(0, 1)).numpy()
        if token_task:
            weight = hits                                             # each token's own loss
            self.loss_sum += torch.einsum("bt,btu->u", per.reshape(B, T), weight).numpy()
            self.correct_sum += torch.einsum("bt,btu->u", correct.reshape(B, T), weight).numpy()
            self.mass += weight.sum(dim=(0, 1)).numpy()
            self.total_loss += float(per.sum())
            self.loss_count += int(valid.sum())
        else:
            share = hits.sum(dim=1) / counted.float().sum(dim=1, keepdim=True).clamp(min=1)   # (batch, units)
            self.loss_sum += (per @ share).numpy()
            self.correct_sum += (correct @ share).numpy()
            self.mass += share.sum(dim=0).numpy()
            self.total_loss += float(per.sum())
            self.loss_count += B
        self.num_examples += int(counted.sum()) if tokens else B

    # ---- the reply --------------------------------------------------------------------------
    def metrics(self, max_experts: Optional[int] = None) -> dict[str, Any]:
        """The reply's metrics (see the module docstring)."""
        if self.num_examples == 0:
            raise RuntimeError("track() was never called (or counted no token): the reply would claim no samples")
        mean = self.total_loss / max(self.loss_count, 1)
        a = self.assigned
        n, w = self.samples[a], self.mass[a]
        safe = np.where(w > 0, w, 1.0)
        metrics: dict[str, Any] = {
            "num-examples": int(self.num_examples), "counts-tokens": int(bool(self.counts_tokens)),
            "experts": list(a), "expert-samples": [int(round(v)) for v in n],
            "expert-loss": [float(v) for v in np.where(w > 0, self.loss_sum[a] / safe, mean)],
            "expert-accuracy": [float(min(max(v, 0.0), 1.0)) for v in np.where(w > 0, self.correct_sum[a] / safe, 0.0)],
            "train-seconds": float(self.seconds), "routing": [float(v) for v in self.routing]}
        if max_experts is not None:
            metrics["max-experts"] = int(max_experts)
        return metrics

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that go back: exactly the received transport keys, in the model's dtype; an
        assigned unit no token reached goes back as it was received (an optimiser's weight decay
        may have moved it, but it learnt nothing from this node's data)."""
        state = self.model.state_dict()
        odd = sorted({str(state[self.map.source(k)[0]].dtype) for k in self.keys} & {"torch.bfloat16"})
        if odd:
            raise ValueError(f"the model holds {odd[0]} parameters, which cannot travel as numpy arrays: train in "
                             f"float32 (or float16), or cast the model before AlignedClient")
        idle = {u for u in self.assigned if self.samples[u] == 0}
        out = {}
        for k in self.keys:
            tensor = _target(state, self.map, k).detach().cpu()
            out[k] = np.array(self._received[k], dtype=torch.empty(0, dtype=tensor.dtype).numpy().dtype) \
                if self.map.unit_of(k) in idle else tensor.numpy().copy()
        return out

    def reply(self, *, max_experts: Optional[int] = None) -> Any:
        """The training reply, of the received message's kind (Flower ``Message`` or ``FLModel``)."""
        return _reply(self.received, self.kind, self.arrays(), self.metrics(max_experts))


def evaluate_reply(model: nn.Module, received: Any, batches: Iterable[tuple[Any, torch.Tensor]], *,
                   loss: Optional[Loss] = None, ignore_index: int = IGNORE_INDEX) -> Any:
    """Load the full received model, score it on ``batches`` and build the evaluate reply.

    Each batch is ``(inputs, targets)``; ``inputs`` is passed to the model as ``model(inputs)``,
    or as ``model(**inputs)`` when it is a dict (Hugging Face: ``{"input_ids": ids}``); a model
    output with ``logits`` is scored by them.  The received keys must be exactly the model's
    (ValueError otherwise).  Metrics:
    ``num-examples``, ``accuracy`` and ``loss``: means over samples, or over the non-ignored
    tokens for token tasks (``counts-tokens`` says which); cross-entropy by default.
    """
    arrays, _, kind = _unpack(received)
    keys = set(model.state_dict())
    if set(arrays) != keys:
        missing, extra = sorted(keys - set(arrays)), sorted(set(arrays) - keys)
        raise ValueError(f"an evaluate message must carry the whole model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    _load(model, arrays, None)
    model.eval()
    n, total, correct, tokens = 0, 0.0, 0.0, False
    with torch.no_grad():
        for x, y in batches:
            per, ok, valid = _elementwise(model(**x) if isinstance(x, Mapping) else model(x), y, loss, ignore_index)
            tokens = tokens or per.ndim >= 2
            n += int(valid.sum())
            total += float(per.sum())
            correct += float(ok.sum())
    if n == 0:
        raise ValueError("evaluate_reply got no batch (or no target that counts)")
    return _reply(received, kind, {}, {"num-examples": n, "counts-tokens": int(tokens), "accuracy": correct / n,
                                       "loss": total / n})


__all__ = ["AlignedClient", "IGNORE_INDEX", "MoELayer", "evaluate_reply", "moe_layers"]
