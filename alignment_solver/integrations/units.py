"""Which training unit (the solver's "expert") owns each parameter, framework-neutral.

A model's parameters travel as a flat dict of arrays (Flower ``ArrayRecord``, NVFlare
``FLModel.params``, a PyTorch ``state_dict``).  Two expert layouts are recognised:

- **One module per expert**: a key belongs to expert ``j`` when it matches one of
  :data:`EXPERT_PATTERNS`: ``experts.{j}.`` anywhere (an ``nn.ModuleList`` called ``experts``:
  ``blocks.1.moe.experts.3.fc1.weight``; transformers 4.x) or ``expert{j}.`` at the start (the
  numpy MoE of :mod:`alignment_solver.training`).  Any ``expert_of(key) -> int | None`` may
  replace the patterns.
- **Fused**: one parameter per projection with an expert axis (transformers 5:
  ``model.layers.0.mlp.experts.gate_up_proj`` of shape ``(E, 2I, H)``).  At the defaults a
  parameter held directly by a module called ``experts`` (``...experts.<name>``, name not a
  number) is split along axis 0 (with ``num_experts`` given, only when that axis has
  ``num_experts`` entries).  Other layouts are declared: ``expert_axes={regex: axis}`` splits
  every key the regex finds along ``axis`` (JetMoE: ``{r"mlp\\.(input|output)_linear\\.weight$": 0}``);
  a declaration wins over the default.  Expert ``j``'s slice of a fused key ``K`` travels as its
  own array under the **slice key** ``K[j]`` (``...experts.gate_up_proj[3]``), shape = ``K``'s
  shape without the expert axis.  :meth:`UnitMap.split` turns a model's arrays into these
  transport arrays and :meth:`UnitMap.join` puts them back together.

Every other key is shared (embeddings, attention, routers, heads).  Two ways to turn experts into
units:

- ``units="expert"`` (default): expert ``j`` of every MoE layer is one unit ``j``; a client
  assigned unit ``j`` trains expert ``j`` in each layer.
- ``units="layer"``: each (layer, expert) pair is its own unit.  The layer is the key's prefix
  up to ``experts.`` (labels read ``blocks.1.moe.experts.3``), for a declared fused key the part
  before the regex's match; layers are ordered by that prefix (numbers compared as numbers) and
  units numbered layer by layer, so every party that sees the same keys numbers them alike.
  ``groups[u]`` is the layer of unit ``u``: the coordinator plans at least one unit of each layer
  for a client that trains, at most its capacity per layer.

``UnitMap.keys`` are the transport keys (slice keys in place of fused keys); every method but
:meth:`~UnitMap.split` takes and returns transport keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np

EXPERT_PATTERNS = (r"(?:^|\.)experts\.(\d+)\.", r"^expert(\d+)\.")
FUSED_PATTERN = r"(?:^|\.)experts\.[A-Za-z_][^.]*$"
_COMPILED = tuple(re.compile(p) for p in EXPERT_PATTERNS)
_FUSED = re.compile(FUSED_PATTERN)
_SLICE = re.compile(r"^(?P<key>.+)\[(?P<j>\d+)\]$")
Units = Literal["expert", "layer"]
UNIT_MODES = ("expert", "layer")


def expert_of(key: str) -> Optional[int]:
    """Expert id of a parameter key under :data:`EXPERT_PATTERNS` or of a slice key ``K[j]``;
    None for a shared key."""
    m = _SLICE.match(key)
    if m:
        return int(m.group("j"))
    for pattern in _COMPILED:
        m = pattern.search(key)
        if m:
            return int(m.group(1))
    return None


def slice_key(key: str, expert: int) -> str:
    """The transport key of expert ``expert``'s slice of the fused parameter ``key``."""
    return f"{key}[{int(expert)}]"


def _layer_and_expert(key: str) -> Optional[tuple[str, int]]:
    for pattern in _COMPILED:
        m = pattern.search(key)
        if m:
            return key[:m.start(1)], int(m.group(1))
    return None


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


@dataclass(frozen=True)
class Fused:
    """A fused parameter: its expert ``axis``, expert count ``n``, full ``shape`` and ``layer`` prefix."""

    axis: int
    n: int
    shape: tuple[int, ...]
    layer: str


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _fused_params(shapes: Mapping[str, Optional[tuple[int, ...]]], expert_axes: Mapping[str, int],
                  num_experts: Optional[int]) -> dict[str, Fused]:
    declared = []
    for pattern, axis in expert_axes.items():
        if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
            raise ValueError(f"expert_axes[{pattern!r}] must be an axis index >= 0; got {axis!r}")
        try:
            declared.append((re.compile(pattern), axis, pattern))
        except re.error as exc:
            raise ValueError(f"expert_axes key {pattern!r} is not a regular expression: {exc}") from None
    fused = {}
    for key, shape in shapes.items():
        hit = next(((m, axis, p) for rx, axis, p in declared if (m := rx.search(key))), None)
        if hit is not None:
            m, axis, pattern = hit
            if shape is None:
                raise ValueError(f"expert_axes needs the arrays, not just their keys: cannot split {key!r}")
            if axis >= len(shape):
                raise ValueError(f"expert_axes[{pattern!r}] = {axis}, but {key!r} has shape {shape}")
            fused[key] = Fused(axis, shape[axis], shape, key[:m.start()])
        elif shape and _FUSED.search(key) and (num_experts is None or shape[0] == num_experts):
            fused[key] = Fused(0, shape[0], shape, key[:key.rindex("experts.") + len("experts.")])
    return fused


def check_expert_axes(value: Any) -> dict[str, int]:
    """``expert_axes`` as a dict ``{regex: axis >= 0}`` (None: ``{}``); ValueError naming the bad entry."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"expert_axes must be a dict {{regex: axis}}; got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ValueError(f"expert_axes keys must be regular expressions (str); got {bad[0]!r}")
    _fused_params({}, dict(value), None)
    return dict(value)


class UnitMap:
    """The owner of each transport key of one model: ``unit_of(key)`` is a unit id or None (shared).

    ``keys`` is the model's keys or, to split fused parameters, its arrays (anything with a
    ``shape``).  Raises ValueError when no key belongs to an expert (naming a sample key, the
    patterns tried and how to pass ``expert_of`` or ``expert_axes``), when ``units`` is unknown,
    or when ``num_experts`` is given and the model's experts are not exactly ``0..num_experts-1``.
    """

    def __init__(self, keys: Iterable[str] | Mapping[str, Any], *, units: str = "expert",
                 expert_of: Optional[Callable[[str], Optional[int]]] = None,
                 num_experts: Optional[int] = None, expert_axes: Optional[Mapping[str, int]] = None) -> None:
        if units not in UNIT_MODES:
            raise ValueError(f"units must be one of {list(UNIT_MODES)}; got {units!r}")
        if units == "layer" and expert_of is not None:
            raise ValueError("units='layer' reads the layer from the key (the prefix before 'experts.{j}.'); "
                             "a custom expert_of works with units='expert' only")
        if expert_axes is not None and not isinstance(expert_axes, Mapping):
            raise ValueError(f"expert_axes must be a dict {{regex: axis}}; got {type(expert_axes).__name__}")
        shapes = {str(k): _shape(v) for k, v in keys.items()} if isinstance(keys, Mapping) \
            else {str(k): None for k in keys}
        self.full_keys = list(shapes)
        self.fused = _fused_params(shapes, dict(expert_axes or {}), num_experts)
        self._source: dict[str, tuple[str, int]] = {}
        self.keys = []
        for key in self.full_keys:
            if key in self.fused:
                for j in range(self.fused[key].n):
                    self._source[slice_key(key, j)] = (key, j)
                    self.keys.append(slice_key(key, j))
            else:
                self.keys.append(key)
        self.units = units
        self.custom = expert_of is not None
        owner = expert_of or globals()["expert_of"]
        pairs = {k: self._layer_and_expert(k) for k in self.keys}
        self.layer_names = sorted({p[0] for p in pairs.values() if p is not None}, key=_natural)
        if units == "expert":
            found = {k: (self._source[k][1] if k in self._source else owner(k)) for k in self.keys}
            self._owner = {k: (None if j is None else int(j)) for k, j in found.items()}
            ids = sorted({j for j in self._owner.values() if j is not None})
            self.groups: Optional[list[int]] = None
            self.labels = [f"expert {j}" for j in range(max(ids) + 1)] if ids else []
        else:
            per_layer = {layer: sorted({p[1] for p in pairs.values() if p is not None and p[0] == layer})
                         for layer in self.layer_names}
            unit = {}
            self.groups, self.labels = [], []
            for li, layer in enumerate(self.layer_names):
                for j in per_layer[layer]:
                    unit[(layer, j)] = len(self.groups)
                    self.groups.append(li)
                    self.labels.append(f"{layer}{j}")
            self._owner = {k: (None if p is None else unit[p]) for k, p in pairs.items()}
            ids = list(range(len(self.groups)))
        near = next(((k, shape) for k, shape in shapes.items() if shape and num_experts is not None
                     and k not in self.fused and _FUSED.search(k) and shape[0] != num_experts), None)
        if not ids and near is not None:
            raise ValueError(f"no parameter key belongs to an expert: {near[0]!r} looks like a fused expert parameter, "
                             f"but its first axis has {near[1][0]} entries, not num_experts={num_experts}; pass the "
                             f"model's experts per layer as num_experts")
        if not ids:
            sample = next((k for k in self.keys if "expert" in k.lower()), self.keys[0] if self.keys else None)
            tried = "expert_of (custom)" if self.custom else \
                "the patterns " + " and ".join(EXPERT_PATTERNS) + f" and fused parameters {FUSED_PATTERN}"
            raise ValueError(
                f"no parameter key belongs to an expert (e.g. {sample!r} matched none of {tried}); the aligned "
                f"strategy would silently run plain FedAvg. Keep experts in an nn.ModuleList named 'experts' "
                f"(keys '...experts.{{j}}.<name>'), or fused in a module named 'experts' (pass the arrays, not "
                f"just the keys), or prefix them 'expert{{j}}.', or pass expert_of=callable(key) -> expert id or "
                f"None, or expert_axes={{regex: axis}} for fused parameters of another name")
        if units == "expert" and num_experts is not None and ids != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(ids))
            extra = sorted(set(ids) - set(range(num_experts)))
            raise ValueError(f"num_experts={num_experts}, but the model's keys name experts {ids}"
                             + (f" (missing {missing})" if missing else "") + (f" (beyond: {extra})" if extra else ""))
        if units == "layer" and num_experts is not None:
            bad = [layer for layer, js in per_layer.items() if js != list(range(num_experts))]
            if bad:
                raise ValueError(f"num_experts={num_experts} per layer, but layer {bad[0]!r} has experts "
                                 f"{per_layer[bad[0]]}")
        self.num_units = len(ids) if units == "layer" else max(ids) + 1
        self.num_layers = max(1, len(self.layer_names))

    def _layer_and_expert(self, key: str) -> Optional[tuple[str, int]]:
        if key in self._source:
            full, j = self._source[key]
            return self.fused[full].layer, j
        return _layer_and_expert(key)

    def __call__(self, key: str) -> Optional[int]:
        return self.unit_of(key)

    def unit_of(self, key: str) -> Optional[int]:
        """The unit owning transport key ``key`` (None: shared, or a key this model does not have)."""
        return self._owner.get(key)

    def source(self, key: str) -> tuple[str, Optional[int]]:
        """``(model key, expert index)`` of a slice key; ``(key, None)`` for any other key."""
        return self._source.get(key, (key, None))

    def shared_keys(self) -> list[str]:
        return [k for k in self.keys if self._owner[k] is None]

    def keys_of(self, units: Iterable[int]) -> list[str]:
        """The transport keys of the given units, in model order."""
        wanted = set(int(u) for u in units)
        return [k for k in self.keys if self._owner[k] in wanted]

    def split(self, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The transport arrays of a model's ``arrays`` (numpy): each fused parameter replaced by
        its per-expert slices (contiguous copies), in :attr:`keys` order.  ValueError when a key
        is missing, unknown, or a fused parameter's shape differs from the map's."""
        got = set(arrays)
        if got != set(self.full_keys):
            missing, extra = sorted(set(self.full_keys) - got), sorted(got - set(self.full_keys))
            raise ValueError(f"the arrays do not match the unit map: missing {missing[:3]}, unexpected {extra[:3]}")
        out = {}
        for key in self.full_keys:
            value = np.asarray(arrays[key])
            f = self.fused.get(key)
            if f is None:
                out[key] = value
                continue
            if value.shape != f.shape:
                raise ValueError(f"fused parameter {key!r} has shape {value.shape}; the unit map's is {f.shape}")
            for j in range(f.n):
                out[slice_key(key, j)] = np.ascontiguousarray(np.take(value, j, axis=f.axis))
        return out

    def join(self, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The model's arrays from transport ``arrays`` (every transport key present), in model order."""
        missing = [k for k in self.keys if k not in arrays]
        if missing:
            raise ValueError(f"cannot join: transport arrays {missing[:3]} are missing")
        out = {}
        for key in self.full_keys:
            f = self.fused.get(key)
            out[key] = np.asarray(arrays[key]) if f is None else \
                np.stack([np.asarray(arrays[slice_key(key, j)]) for j in range(f.n)], axis=f.axis)
        return out


__all__ = ["EXPERT_PATTERNS", "FUSED_PATTERN", "UNIT_MODES", "Fused", "UnitMap", "Units", "check_expert_axes",
           "expert_of", "slice_key"]
