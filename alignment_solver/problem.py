"""One round's client-expert alignment problem.

The server decides ``x[c, e]`` in {0, 1} (client ``c`` trains expert ``e`` this round)::

    maximise   sum_ce G[c,e] x[c,e]          G = fitness - switch_penalty * (not previous)
    subject to min_experts[c] <= sum_e x[c,e] <= capacity[c]
               expert_min_load[e] <= sum_c w[c,e] x[c,e] <= expert_max_load[e]
               sum_e usage[c,e] x[c,e] <= budget[c]          (only when budget is given)
               group_min_experts[c,l] <= sum_{e in l} x[c,e] <= group_capacity[c,l]
                                                             (only when expert_group is given)
               x[c,e] = 0 where not allowed[c,e]
               sum_c x[c,e] = 0  or  sum_c x[c,e] >= expert_min_group[e]
                                                             (a privacy floor: clients, not weights)

``w`` is 1 everywhere unless ``load_weight`` is given.  ``expert_group`` puts each expert (unit) in
a group ``l`` (e.g. the MoE layer of a per-layer unit); the group rows nest inside the client row
(a laminar family), so count-load problems with groups are still exact min-cost flows.

The model is immutable; its arrays are read-only numpy arrays.  Arrays may be given as numpy
arrays or nested lists; JSON round trips with ``model_dump_json()`` / ``model_validate_json()``.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Annotated, Any, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from .errors import describe

Label = Union[int, str]

#: Largest magnitude accepted for any number in a problem (fitness, penalties, weights, usage,
#: budgets, load bounds).  Inside it every backend solves to its stated tolerance; beyond it sums
#: over 100,000 x 128 pairs approach float64 overflow and solver tolerances stop meaning anything.
MAX_MAGNITUDE = 1e15
#: Largest integer accepted for ``capacity`` and ``min_experts``.
MAX_COUNT = 10 ** 9
#: Round numbers and ever-growing counters stay below this (the largest integer JSON readers keep exactly).
MAX_ROUND = 2 ** 53
#: Relative slack on a weighted load or budget row, times the row's magnitude (its largest bound or
#: coefficient): what summation order can change, far below what a plan's smallest term weighs
#: unless coefficients span more than 1e9 (which ``ill_conditioned`` names).
ROW_RTOL = 1e-9


def integer_band(fair: float, tolerance: float) -> tuple[int, int]:
    """Integer count band around ``fair``: ``(1 -/+ tolerance) * fair`` rounded inwards, widened
    just enough to always contain ``floor(fair)..ceil(fair)`` (so the band is never empty and a
    perfectly even split is always inside it)."""
    lo = math.ceil((1 - tolerance) * fair - 1e-9)
    hi = math.floor((1 + tolerance) * fair + 1e-9)
    return max(min(lo, math.floor(fair + 1e-9)), 0), max(hi, math.ceil(fair - 1e-9))


def _to_json(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


Arr = Annotated[Any, PlainSerializer(_to_json)]


def _numeric(name: str, value: Any) -> np.ndarray:
    """Convert ``value`` to a float64 array, refusing text, booleans and ragged lists."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be numeric; got {describe(value)}")
    try:
        raw = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular numeric array; got {describe(value)}") from exc
    if raw.dtype == object:
        if name == "expert_max_load":  # JSON null stands for "no cap"
            raw = np.array([np.inf if v is None else v for v in raw.ravel()], dtype=object).reshape(raw.shape)
        try:
            raw = raw.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a rectangular numeric array; got {describe(value)}") from exc
    if raw.dtype.kind == "b":
        raise ValueError(f"{name} must be numeric, not booleans; got {describe(value)}")
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric; got dtype {raw.dtype} ({describe(value)})")
    return raw.astype(np.float64, copy=False)        # not a copy: _frozen copies what is kept


def _in_range(name: str, arr: np.ndarray, limit: float = MAX_MAGNITUDE,
              why: str = "the range every backend solves to its tolerance") -> np.ndarray:
    """Refuse finite entries beyond ``limit`` in magnitude, naming the first one."""
    if arr.size and max(-float(arr.min()), float(arr.max())) <= limit:   # two reductions, no (C, E) temporaries
        return arr
    big = np.isfinite(arr) & (np.abs(arr) > limit)
    if np.any(big):
        idx = tuple(int(i) for i in np.argwhere(big)[0])
        where = f" at index {idx}" if arr.ndim else ""
        raise ValueError(f"{name} must lie within +-{limit:g} ({why}); got {arr[idx] if arr.ndim else float(arr):g}{where}")
    return arr


def _integers(name: str, value: Any) -> np.ndarray:
    arr = _numeric(name, value)
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        bad = arr[~np.isfinite(arr) | (arr != np.round(arr))].ravel()[:3]
        raise ValueError(f"{name} must hold integers; got {bad.tolist()}")
    _in_range(name, arr, MAX_COUNT, "a count of experts")
    return arr.astype(np.int64)


def _booleans(name: str, value: Any) -> np.ndarray:
    raw = np.asarray(value)
    if raw.dtype.kind == "b":
        return raw                                   # _frozen copies it
    if raw.dtype.kind in "iuf" and np.all((raw == 0) | (raw == 1)):
        return raw.astype(bool)
    raise ValueError(f"{name} must be booleans (or 0/1); got {describe(value)}")


def _distinct_keys(ids: list) -> bool:
    """True when the labels are certainly distinct, also as JSON keys (their ``str``), checked
    in numpy: ints become an int64 array (distinct ints have distinct texts), strings or a mix
    a unicode array of their texts (numpy writes ints as ``str`` does).  False means "not
    shown" (a duplicate, or labels numpy cannot hold exactly): the caller's loop decides and
    names the culprit."""
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError, OverflowError):
        return False
    if arr.ndim != 1 or arr.dtype.kind not in "iuU" or len(arr) != len(ids):
        return False
    keys = np.sort(arr)
    return not bool(np.any(keys[1:] == keys[:-1]))


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, copy=True)
    arr.setflags(write=False)
    return arr


def _scalar_or(arr: np.ndarray) -> Any:
    """Keep scalars as Python numbers (compact JSON), arrays as read-only arrays."""
    if arr.ndim == 0:
        item = arr.item()
        return int(item) if arr.dtype.kind in "iu" else float(item)
    return _frozen(arr)


class AlignmentProblem(BaseModel):
    """One round's assignment problem; see the module docstring for the maths.

    Shapes: C clients, E experts.  Scalars broadcast to every client or expert.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, ser_json_inf_nan="constants",
                              extra="forbid")

    fitness: Arr = Field(description="(C, E) finite floats; higher is better.")
    capacity: Arr = Field(description="int or (C,) ints >= 0: most experts client c trains.")
    min_experts: Arr = Field(0, description="int or (C,) ints, 0 <= min_experts <= capacity.")
    expert_min_load: Arr = Field(0.0, description="number or (E,): lower bound on each expert's load.")
    expert_max_load: Arr = Field(None, description="number or (E,) (inf or null: no cap).")
    load_weight: Arr = Field(None, description="None (count clients), (C,) or (C, E) weights >= 0.")
    usage: Arr = Field(None, description="(E,) or (C, E) resource use >= 0; needs budget.")
    budget: Arr = Field(None, description="(C,) resource budget >= 0; needs usage.")
    allowed: Arr = Field(None, description="(C, E) bool eligibility mask (default: all allowed).")
    previous: Arr = Field(None, description="(C, E) bool: who held which expert last round.")
    expert_group: Arr = Field(None, description="(E,) ints in [0, E): group (e.g. MoE layer) of each expert.")
    group_capacity: Arr = Field(None, description="int, (C,) or (C, L) ints >= 0: most experts per client per group.")
    group_min_experts: Arr = Field(0, description="int, (C,) or (C, L) ints: fewest experts per client per group.")
    expert_min_group: Arr = Field(0, description="int or (E,) ints >= 0: each expert is trained by no client or by "
                                                 "at least this many (a privacy floor, counting clients whatever the "
                                                 "load weights); 0 or 1: no floor.")
    switch_penalty: float = Field(0.0, description="subtracted per newly held (c, e) pair; >= 0.")
    client_ids: Optional[list[Label]] = Field(None, description="unique labels (default 0..C-1).")
    expert_ids: Optional[list[Label]] = Field(None, description="unique labels (default 0..E-1).")

    # ---- field-level conversion -------------------------------------------------------------
    @field_validator("fitness", mode="before")
    @classmethod
    def _v_fitness(cls, v: Any) -> np.ndarray:
        arr = _numeric("fitness", v)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"fitness must be a 2-D (C, E) array with C >= 1 and E >= 1; got shape {arr.shape}")
        lo, hi = float(arr.min()), float(arr.max())       # two reductions: NaN and inf show here
        if not (math.isfinite(lo) and math.isfinite(hi)):
            idx = np.argwhere(~np.isfinite(arr))[0]
            raise ValueError(f"fitness must be finite; got {arr[tuple(idx)]} at (client {idx[0]}, expert {idx[1]})")
        if max(-lo, hi) > MAX_MAGNITUDE:
            _in_range("fitness", arr)
        return _frozen(arr)

    @field_validator("capacity", "min_experts", "group_capacity", "group_min_experts", "expert_min_group",
                     mode="before")
    @classmethod
    def _v_int_vec(cls, v: Any, info: Any) -> Any:
        grouped = info.field_name.startswith("group_")
        if v is None and info.field_name == "group_capacity":
            return None
        shapes = ("an integer, a (C,) or a (C, L) array" if grouped else
                  "an integer or an (E,) array" if info.field_name == "expert_min_group" else "an integer or a (C,) array")
        if v is None:
            raise ValueError(f"{info.field_name} must be {shapes}; got None")
        arr = _integers(info.field_name, v)
        if arr.ndim > (2 if grouped else 1):
            raise ValueError(f"{info.field_name} must be {shapes}; got shape {arr.shape}")
        if np.any(arr < 0):
            raise ValueError(f"{info.field_name} must be >= 0; got {int(arr.min())}")
        return _scalar_or(arr)

    @field_validator("expert_min_load", "expert_max_load", mode="before")
    @classmethod
    def _v_load(cls, v: Any, info: Any) -> Any:
        if v is None:
            if info.field_name == "expert_min_load":
                raise ValueError("expert_min_load must be a number or an (E,) array; got None")
            return None
        arr = _numeric(info.field_name, v)
        if arr.ndim > 1:
            raise ValueError(f"{info.field_name} must be a number or an (E,) array; got shape {arr.shape}")
        if np.any(np.isnan(arr)) or np.any(arr < 0):
            raise ValueError(f"{info.field_name} must be >= 0 and not NaN; got {describe(v)}")
        if info.field_name == "expert_min_load" and not np.all(np.isfinite(arr)):
            raise ValueError(f"expert_min_load must be finite; got {describe(v)}")
        return _scalar_or(_in_range(info.field_name, arr))

    @field_validator("load_weight", "usage", "budget", mode="before")
    @classmethod
    def _v_nonneg(cls, v: Any, info: Any) -> Any:
        if v is None:
            return None
        arr = _numeric(info.field_name, v)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"{info.field_name} must be finite and >= 0; got {describe(v)}")
        return _frozen(_in_range(info.field_name, arr))

    @field_validator("expert_group", mode="before")
    @classmethod
    def _v_group(cls, v: Any) -> Any:
        if v is None:
            return None
        arr = _integers("expert_group", v)
        if arr.ndim != 1 or np.any(arr < 0):
            raise ValueError(f"expert_group must be an (E,) array of integers >= 0; got {describe(v)}")
        return _frozen(arr)

    @field_validator("allowed", "previous", mode="before")
    @classmethod
    def _v_mask(cls, v: Any, info: Any) -> Any:
        return None if v is None else _frozen(_booleans(info.field_name, v))

    @field_validator("switch_penalty", mode="before")
    @classmethod
    def _v_switch(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"switch_penalty must be a number >= 0; got {describe(v)}")
        if not math.isfinite(float(v)) or v < 0:
            raise ValueError(f"switch_penalty must be finite and >= 0; got {v}")
        return float(_in_range("switch_penalty", np.float64(v)))

    # ---- cross-field rules ------------------------------------------------------------------
    @model_validator(mode="after")
    def _v_shapes(self) -> "AlignmentProblem":
        C, E = self.fitness.shape

        def shape_ok(name: str, value: Any, shapes: list[tuple[int, ...]]) -> None:
            if isinstance(value, np.ndarray) and value.shape not in shapes:
                allowed = " or ".join(str(s) for s in shapes)
                raise ValueError(f"{name} must have shape {allowed} for C={C} clients, E={E} experts; "
                                 f"got shape {value.shape}")

        shape_ok("capacity", self.capacity, [(C,)])
        shape_ok("min_experts", self.min_experts, [(C,)])
        shape_ok("expert_min_load", self.expert_min_load, [(E,)])
        shape_ok("expert_max_load", self.expert_max_load, [(E,)])
        shape_ok("expert_min_group", self.expert_min_group, [(E,)])
        shape_ok("load_weight", self.load_weight, [(C,), (C, E)])
        shape_ok("usage", self.usage, [(E,), (C, E)])
        shape_ok("budget", self.budget, [(C,)])
        shape_ok("allowed", self.allowed, [(C, E)])
        shape_ok("previous", self.previous, [(C, E)])
        if self.expert_group is not None:
            shape_ok("expert_group", self.expert_group, [(E,)])
            if int(self.expert_group.max()) >= E:
                e = int(np.argmax(self.expert_group >= E))
                raise ValueError(f"expert_group must lie in [0, {E - 1}] (at most one group per expert); got "
                                 f"{int(self.expert_group[e])} for expert {self.expert_label(e)!r}")
            L = self.n_groups
            shape_ok("group_capacity", self.group_capacity, [(C,), (C, L)])
            shape_ok("group_min_experts", self.group_min_experts, [(C,), (C, L)])
            glo, gk = self.group_min_matrix, self.group_capacity_matrix
            if np.any(glo > gk):
                c, g = (int(i) for i in np.argwhere(glo > gk)[0])
                raise ValueError(f"group_min_experts must be <= group_capacity for every client and group; client "
                                 f"{self.client_label(c)!r} has {glo[c, g]} > {gk[c, g]} in group {g}")
        elif self.group_capacity is not None or not (np.ndim(self.group_min_experts) == 0
                                                      and self.group_min_experts == 0):
            raise ValueError("group_capacity and group_min_experts need expert_group (the group of each expert); "
                             "got expert_group=None")
        if (self.usage is None) != (self.budget is None):
            given, missing = ("usage", "budget") if self.budget is None else ("budget", "usage")
            raise ValueError(f"{given} was given without {missing}; the resource row needs both")
        low, cap = self.min_experts_array, self.capacity_array
        if np.any(low > cap):
            c = int(np.argmax(low > cap))
            raise ValueError(f"min_experts must be <= capacity for every client; client "
                             f"{self.client_label(c)!r} has min_experts={low[c]} > capacity={cap[c]}")
        lo_load, hi_load = self.min_load_array, self.max_load_array
        if np.any(lo_load > hi_load):
            e = int(np.argmax(lo_load > hi_load))
            raise ValueError(f"expert_min_load must be <= expert_max_load for every expert; expert "
                             f"{self.expert_label(e)!r} has {lo_load[e]} > {hi_load[e]}")
        for name, ids, n in (("client_ids", self.client_ids, C), ("expert_ids", self.expert_ids, E)):
            if ids is None:
                continue
            if len(ids) != n:
                raise ValueError(f"{name} must have {n} labels; got {len(ids)}")
            if _distinct_keys(ids):
                continue
            if len(set(ids)) != n:
                seen: set[Label] = set()
                dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
                raise ValueError(f"{name} must be unique; {dup!r} appears more than once")
            texts: dict[str, Label] = {}
            for i in ids:
                if str(i) in texts:
                    raise ValueError(f"{name} must stay distinct as JSON keys; {texts[str(i)]!r} and {i!r} "
                                     f"both become {str(i)!r}")
                texts[str(i)] = i
        if self.previous is None or self.switch_penalty == 0:
            return self                      # G is the fitness, checked above
        if float(self.fitness.min()) - self.switch_penalty >= -MAX_MAGNITUDE:
            return self                      # fitness - switch_penalty <= G <= fitness: one reduction, no (C, E) temporaries
        G = self.objective_matrix
        if np.any(np.abs(G) > MAX_MAGNITUDE):
            c, e = (int(i) for i in np.argwhere(np.abs(G) > MAX_MAGNITUDE)[0])
            raise ValueError(f"fitness - switch_penalty must lie within +-{MAX_MAGNITUDE:g}; got {G[c, e]:g} for "
                             f"client {self.client_label(c)!r}, expert {self.expert_label(e)!r}")
        return self

    # ---- convenience constructors -----------------------------------------------------------
    @classmethod
    def balanced(cls, fitness: Any, capacity: Any, *, tolerance: float = 0.1, **fields: Any) -> "AlignmentProblem":
        """Problem whose load band is ``fair * (1 -/+ tolerance)`` around the fair share.

        ``fair = sum_c capacity[c] * mean_e w[c, e] / E``.  With count loads the band is rounded
        inwards to integers and always contains ``floor(fair)..ceil(fair)`` (:func:`integer_band`);
        e.g. 4 clients x 4 experts, capacity 1, tolerance 0.2 give 1..1.  Other fields pass through.
        """
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance:
            raise ValueError(f"tolerance must be a number >= 0; got {describe(tolerance)}")
        base = cls(fitness=fitness, capacity=capacity, **fields)
        C, E = base.fitness.shape
        weight = base.weight_matrix
        per_client = np.ones(C) if weight is None else weight.mean(axis=1)
        fair = float((base.capacity_array * per_client).sum()) / E
        lo, hi = (1 - tolerance) * fair, (1 + tolerance) * fair
        if weight is None:
            lo, hi = integer_band(fair, tolerance)
        fields.update(expert_min_load=max(lo, 0), expert_max_load=hi)
        return cls(fitness=base.fitness, capacity=base.capacity, **fields)

    def model_copy(self, *, update: Optional[dict[str, Any]] = None, deep: bool = False) -> "AlignmentProblem":
        """A new, re-validated problem with ``update`` applied (derived arrays recomputed)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        fields.update(update or {})
        return type(self)(**fields)

    # ---- derived, read-only views -----------------------------------------------------------
    @property
    def n_clients(self) -> int:
        return int(self.fitness.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.fitness.shape[1])

    def client_label(self, c: int) -> Label:
        return self.client_ids[c] if self.client_ids is not None else c

    def expert_label(self, e: int) -> Label:
        return self.expert_ids[e] if self.expert_ids is not None else e

    def client_index(self, label: Label) -> int:
        """Row of the client with this label; raises KeyError naming the label."""
        if self.client_ids is None:
            if isinstance(label, (int, np.integer)) and 0 <= int(label) < self.n_clients:
                return int(label)
        elif label in self._client_pos:
            return self._client_pos[label]
        raise KeyError(f"client_id {label!r} is not in this problem")

    @cached_property
    def _client_pos(self) -> dict[Label, int]:
        return {lab: i for i, lab in enumerate(self.client_ids or [])}

    def _vec(self, value: Any, n: int, dtype: type, default: float) -> np.ndarray:
        if value is None:
            return _frozen(np.full(n, default, dtype=dtype))
        if isinstance(value, np.ndarray):
            return value.astype(dtype, copy=False)
        return _frozen(np.full(n, value, dtype=dtype))

    @cached_property
    def capacity_array(self) -> np.ndarray:
        return self._vec(self.capacity, self.n_clients, np.int64, 0)

    @cached_property
    def min_experts_array(self) -> np.ndarray:
        return self._vec(self.min_experts, self.n_clients, np.int64, 0)

    @cached_property
    def min_load_array(self) -> np.ndarray:
        return self._vec(self.expert_min_load, self.n_experts, np.float64, 0.0)

    @cached_property
    def max_load_array(self) -> np.ndarray:
        return self._vec(self.expert_max_load, self.n_experts, np.float64, np.inf)

    @cached_property
    def min_group_array(self) -> np.ndarray:
        """(E,) privacy floor: each expert has 0 clients or at least this many."""
        return self._vec(self.expert_min_group, self.n_experts, np.int64, 0)

    @property
    def has_min_group(self) -> bool:
        """True when some expert's floor binds (``expert_min_group`` above 1)."""
        return bool(np.any(self.min_group_array > 1))

    def floor_breaks(self, assignment: np.ndarray) -> np.ndarray:
        """Experts trained by some clients but fewer than their ``expert_min_group``."""
        n = np.asarray(assignment, dtype=bool).sum(axis=0)
        return np.flatnonzero((n > 0) & (n < self.min_group_array))

    @property
    def n_groups(self) -> int:
        """Number of expert groups L (1 without ``expert_group``)."""
        return 1 if self.expert_group is None else int(self.expert_group.max()) + 1

    @cached_property
    def group_array(self) -> np.ndarray:
        """(E,) group of each expert (all 0 without ``expert_group``)."""
        if self.expert_group is None:
            return _frozen(np.zeros(self.n_experts, dtype=np.int64))
        return self.expert_group

    def _per_group(self, value: Any, default: int) -> np.ndarray:
        C, L = self.n_clients, self.n_groups
        if value is None:
            return _frozen(np.full((C, L), default, dtype=np.int64))
        arr = np.asarray(value, dtype=np.int64)
        return _frozen(np.broadcast_to(arr[:, None] if arr.ndim == 1 else arr, (C, L)))

    @cached_property
    def group_capacity_matrix(self) -> np.ndarray:
        """(C, L) most experts per client per group (``MAX_COUNT`` where unbounded)."""
        return self._per_group(self.group_capacity, MAX_COUNT)

    @cached_property
    def group_min_matrix(self) -> np.ndarray:
        """(C, L) fewest experts per client per group."""
        return self._per_group(self.group_min_experts, 0)

    @property
    def has_groups(self) -> bool:
        """True when per-group rows constrain anything (``expert_group`` with a cap or a minimum)."""
        return self.expert_group is not None and (self.group_capacity is not None
                                                  or bool(np.any(self.group_min_matrix > 0)))

    def group_counts(self, assignment: np.ndarray) -> np.ndarray:
        """(C, L) experts each client trains in each group under ``assignment``."""
        out = np.zeros((self.n_clients, self.n_groups), dtype=np.int64)
        rows, cols = np.nonzero(assignment)
        np.add.at(out, (rows, self.group_array[cols]), 1)
        return out

    @cached_property
    def allowed_matrix(self) -> np.ndarray:
        return self.allowed if self.allowed is not None else _frozen(np.ones(self.fitness.shape, dtype=bool))

    @cached_property
    def objective_matrix(self) -> np.ndarray:
        """G = fitness - switch_penalty * (not previous): the objective coefficient of x[c, e]."""
        if self.previous is None or self.switch_penalty == 0:
            return self.fitness
        return _frozen(self.fitness - self.switch_penalty * (~self.previous))

    @cached_property
    def max_abs_objective(self) -> float:
        """Largest ``|G[c, e]|`` over the allowed pairs (0 when none is allowed)."""
        G, allowed = self.objective_matrix, self.allowed_matrix
        if self.allowed is None:
            return float(np.abs(G).max())
        return float(np.abs(G[allowed]).max()) if allowed.any() else 0.0

    @cached_property
    def weight_matrix(self) -> Optional[np.ndarray]:
        """(C, E) load weights, or None when every client counts 1 (count loads)."""
        w = self.load_weight
        if w is None or np.all(w == 1):
            return None
        return _frozen(np.broadcast_to(w[:, None] if w.ndim == 1 else w, self.fitness.shape))

    @cached_property
    def usage_matrix(self) -> Optional[np.ndarray]:
        if self.usage is None:
            return None
        return _frozen(np.broadcast_to(self.usage, self.fitness.shape))

    @property
    def has_budget(self) -> bool:
        return self.budget is not None

    @property
    def is_flow(self) -> bool:
        """True when the problem is a min-cost flow (count loads, no budget; group rows are laminar)."""
        return self.weight_matrix is None and not self.has_budget

    @cached_property
    def load_tolerance(self) -> np.ndarray:
        """(E,) slack allowed on each expert's load row: ``ROW_RTOL`` times the row's magnitude
        (its largest finite bound or allowed weight; 0 for count loads, which are exact)."""
        w = self.weight_matrix
        if w is None:
            return _frozen(np.zeros(self.n_experts))
        big = np.where(self.allowed_matrix, w, 0.0).max(axis=0)
        bounds = np.maximum(self.min_load_array, np.where(np.isfinite(self.max_load_array), self.max_load_array, 0.0))
        return _frozen(ROW_RTOL * np.maximum(big, bounds))

    @cached_property
    def budget_tolerance(self) -> Optional[np.ndarray]:
        """(C,) slack allowed on each budget row, relative to the row's magnitude like ``load_tolerance``."""
        if self.budget is None:
            return None
        big = np.where(self.allowed_matrix, self.usage_matrix, 0.0).max(axis=1)
        return _frozen(ROW_RTOL * np.maximum(big, self.budget))

    def objective_value(self, assignment: np.ndarray) -> float:
        return float(self.objective_matrix[assignment].sum())
