"""Which training unit (the solver's "expert") owns each parameter key, framework-neutral.

A model's parameters travel as a flat dict of arrays (Flower ``ArrayRecord``, NVFlare
``FLModel.params``, a PyTorch ``state_dict``).  A key belongs to expert ``j`` when it matches one
of :data:`EXPERT_PATTERNS`:

- ``experts.{j}.`` anywhere in the key: the PyTorch convention, experts in an
  ``nn.ModuleList`` called ``experts`` (``blocks.1.moe.experts.3.fc1.weight``);
- ``expert{j}.`` at the start: the numpy MoE of :mod:`alignment_solver.training`.

Every other key is shared (embeddings, routers, heads).  Two ways to turn experts into units:

- ``units="expert"`` (default): expert ``j`` of every MoE layer is one unit ``j``; a client
  assigned unit ``j`` trains expert ``j`` in each layer.  Any ``expert_of(key) -> int | None``
  may replace the patterns.
- ``units="layer"``: each (layer, expert) pair is its own unit.  The layer is the key's prefix
  up to ``experts.`` (labels read ``blocks.1.moe.experts.3``); layers are ordered by that prefix (numbers compared as numbers) and
  units numbered layer by layer, so every party that sees the same keys numbers them alike.
  ``groups[u]`` is the layer of unit ``u``: the coordinator plans at least one unit of each layer
  for a client that trains, at most its capacity per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Literal, Optional

EXPERT_PATTERNS = (r"(?:^|\.)experts\.(\d+)\.", r"^expert(\d+)\.")
_COMPILED = tuple(re.compile(p) for p in EXPERT_PATTERNS)
Units = Literal["expert", "layer"]
UNIT_MODES = ("expert", "layer")


def expert_of(key: str) -> Optional[int]:
    """Expert id of a parameter key under :data:`EXPERT_PATTERNS`, or None for a shared key."""
    for pattern in _COMPILED:
        m = pattern.search(key)
        if m:
            return int(m.group(1))
    return None


def _layer_and_expert(key: str) -> Optional[tuple[str, int]]:
    for pattern in _COMPILED:
        m = pattern.search(key)
        if m:
            return key[:m.start(1)], int(m.group(1))
    return None


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


class UnitMap:
    """The owner of each key of one model: ``unit_of(key)`` is a unit id or None (shared).

    Raises ValueError when no key belongs to an expert (naming a sample key, the patterns tried
    and how to pass ``expert_of``), when ``units`` is unknown, or when ``num_experts`` is given
    and the model's experts are not exactly ``0..num_experts-1``.
    """

    def __init__(self, keys: Iterable[str], *, units: str = "expert",
                 expert_of: Optional[Callable[[str], Optional[int]]] = None,
                 num_experts: Optional[int] = None) -> None:
        if units not in UNIT_MODES:
            raise ValueError(f"units must be one of {list(UNIT_MODES)}; got {units!r}")
        if units == "layer" and expert_of is not None:
            raise ValueError("units='layer' reads the layer from the key (the prefix before 'experts.{j}.'); "
                             "a custom expert_of works with units='expert' only")
        self.keys = [str(k) for k in keys]
        self.units = units
        self.custom = expert_of is not None
        owner = expert_of or globals()["expert_of"]
        if units == "expert":
            found = {k: owner(k) for k in self.keys}
            self._owner = {k: (None if j is None else int(j)) for k, j in found.items()}
            ids = sorted({j for j in self._owner.values() if j is not None})
            self.groups: Optional[list[int]] = None
            self.labels = [f"expert {j}" for j in range(max(ids) + 1)] if ids else []
        else:
            pairs = {k: _layer_and_expert(k) for k in self.keys}
            layers = sorted({p[0] for p in pairs.values() if p is not None}, key=_natural)
            per_layer = {layer: sorted({p[1] for p in pairs.values() if p is not None and p[0] == layer})
                         for layer in layers}
            unit = {}
            self.groups, self.labels = [], []
            for li, layer in enumerate(layers):
                for j in per_layer[layer]:
                    unit[(layer, j)] = len(self.groups)
                    self.groups.append(li)
                    self.labels.append(f"{layer}{j}")
            self._owner = {k: (None if p is None else unit[p]) for k, p in pairs.items()}
            ids = list(range(len(self.groups)))
        if not ids:
            sample = next((k for k in self.keys if "expert" in k.lower()), self.keys[0] if self.keys else None)
            tried = "expert_of (custom)" if self.custom else "the patterns " + " and ".join(EXPERT_PATTERNS)
            raise ValueError(
                f"no parameter key belongs to an expert (e.g. {sample!r} matched none of {tried}); the aligned "
                f"strategy would silently run plain FedAvg. Keep experts in an nn.ModuleList named 'experts' "
                f"(keys '...experts.{{j}}.<name>') or prefix them 'expert{{j}}.', or pass "
                f"expert_of=callable(key) -> expert id or None")
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
        self.num_layers = 1 if self.groups is None else (max(self.groups) + 1)

    def __call__(self, key: str) -> Optional[int]:
        return self.unit_of(key)

    def unit_of(self, key: str) -> Optional[int]:
        """The unit owning ``key`` (None: shared, or a key this model does not have)."""
        return self._owner.get(key)

    def shared_keys(self) -> list[str]:
        return [k for k in self.keys if self._owner[k] is None]

    def keys_of(self, units: Iterable[int]) -> list[str]:
        """The keys of the given units, in model order."""
        wanted = set(int(u) for u in units)
        return [k for k in self.keys if self._owner[k] in wanted]


__all__ = ["EXPERT_PATTERNS", "UNIT_MODES", "UnitMap", "Units", "expert_of"]
