"""Client capacity profiling: how many experts (and how much memory) each client can take.

What a client reports (memory, throughput in samples/s, bandwidth in bytes/s, its sample count,
the most experts it will take) and what the server observes (seconds per expert trained,
seconds per expert downloaded, whether it finished) give, per client::

    seconds_per_expert = q-quantile of observed train + download seconds per expert
                         (from the report only while nothing was observed)
    capacity = min(limit, floor(deadline / seconds_per_expert), declared max, max_capacity)

``q`` (``quantile``, default 0.8) is pessimistic on purpose: a client is planned for its slow
rounds, not its average.  An unfinished round's seconds count too when the client reports them, so
a device too slow for even one expert before the deadline gets capacity 0.  Observation overrides
the report, so a client claiming 10x the speed it delivers is planned by what it delivered.  A
client never planned gets ``default_capacity`` (a safe default), the capacity its operator
configured (``configured``: node or site configuration, not a reply), or what its report
supports against the deadline.  After that ``limit`` rules: a client that finishes keeps at least what it
was given; one that fails to finish drops to one expert fewer than it was given; after
``recovery_rounds`` consecutive early finishes (within ``early_fraction`` of the deadline) it
gains one more.  The memory budget is the ``1 - q`` quantile of reported memory
(``default_memory`` until a client reports).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class CapacityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    default_capacity: int = Field(1, ge=0, description="experts for a client never seen")
    max_capacity: int = Field(3, ge=1, description="no client trains more experts than this")
    quantile: float = Field(0.8, ge=0.5, le=1.0, description="pessimistic quantile of observed seconds")
    window: int = Field(10, ge=1, le=1000, description="observations kept per client")
    recovery_rounds: int = Field(2, ge=1, description="early finishes in a row to regain one expert")
    early_fraction: float = Field(0.7, gt=0, le=1, description="finished within this share of the deadline")
    expert_bytes: Optional[float] = Field(None, gt=0, description="bytes to download one expert")
    default_memory: float = Field(0.0, ge=0, description="memory budget of a client that never reported")


class CapacityProfiler:
    def __init__(self, config: CapacityConfig = CapacityConfig()) -> None:
        self.config = config
        W = config.window
        self.train = np.zeros((0, W))        # observed train seconds per expert (NaN: empty slot)
        self.download = np.zeros((0, W))     # observed download seconds per expert
        self.memory = np.zeros((0, W))       # reported memory
        self.slot = np.zeros(0, dtype=np.int64)
        self.mem_slot = np.zeros(0, dtype=np.int64)
        self.limit = np.zeros(0, dtype=np.int64)
        self.streak = np.zeros(0, dtype=np.int64)
        self.declared = np.zeros(0, dtype=np.int64)       # -1: not declared
        self.throughput = np.zeros(0)                     # NaN: not reported
        self.bandwidth = np.zeros(0)
        self.samples = np.zeros(0)
        self.planned = np.zeros(0, dtype=np.int64)
        self.finished = np.zeros(0, dtype=np.int64)

    def grow(self, rows: int) -> None:
        extra = rows - len(self.limit)
        if extra <= 0:
            return
        W = self.config.window
        nan = np.full((extra, W), np.nan)
        self.train, self.download, self.memory = (np.vstack([a, nan]) for a in (self.train, self.download, self.memory))
        self.slot = np.r_[self.slot, np.zeros(extra, np.int64)]
        self.mem_slot = np.r_[self.mem_slot, np.zeros(extra, np.int64)]
        self.limit = np.r_[self.limit, np.full(extra, self.config.default_capacity, np.int64)]
        self.streak = np.r_[self.streak, np.zeros(extra, np.int64)]
        self.declared = np.r_[self.declared, np.full(extra, -1, np.int64)]
        self.throughput, self.bandwidth, self.samples = (np.r_[a, np.full(extra, np.nan)]
                                                         for a in (self.throughput, self.bandwidth, self.samples))
        self.planned = np.r_[self.planned, np.zeros(extra, np.int64)]
        self.finished = np.r_[self.finished, np.zeros(extra, np.int64)]

    # ---- inputs -----------------------------------------------------------------------------
    def report(self, row: int, *, memory: Optional[float] = None, throughput: Optional[float] = None,
               bandwidth: Optional[float] = None, samples: Optional[float] = None,
               max_experts: Optional[int] = None, configured: Optional[int] = None) -> None:
        """What a client says about itself (any subset); ``configured`` sets a new client's start."""
        if memory is not None:
            self.memory[row, self.mem_slot[row] % self.config.window] = memory
            self.mem_slot[row] += 1
        if throughput is not None:
            self.throughput[row] = throughput
        if bandwidth is not None:
            self.bandwidth[row] = bandwidth
        if samples is not None:
            self.samples[row] = samples
        if max_experts is not None:
            self.declared[row] = max_experts
        if configured is not None:
            if self.planned[row] == 0:
                self.limit[row] = configured
            self.declared[row] = configured if max_experts is None else min(configured, max_experts)

    def observe(self, row: int, *, assigned: int, train_seconds: float, download_seconds: float,
                finished: bool, deadline: Optional[float]) -> None:
        """What the server saw of one planned client in one round."""
        self.planned[row] += 1
        if assigned > 0 and (finished or train_seconds + download_seconds > 0):
            i = self.slot[row] % self.config.window
            self.train[row, i] = train_seconds / assigned
            self.download[row, i] = download_seconds / assigned
            self.slot[row] += 1
        if not finished:
            self.limit[row] = max(1, min(self.limit[row], assigned - 1))
            self.streak[row] = 0
            return
        self.finished[row] += 1
        self.limit[row] = max(self.limit[row], assigned)
        early = deadline is None or train_seconds + download_seconds <= self.config.early_fraction * deadline
        self.streak[row] = self.streak[row] + 1 if early else 0
        if self.streak[row] >= self.config.recovery_rounds and self.limit[row] < self.config.max_capacity:
            self.limit[row] += 1
            self.streak[row] = 0

    def dropout(self, row: int, assigned: int) -> None:
        """A planned client that sent nothing: it did not finish."""
        self.planned[row] += 1
        self.limit[row] = max(1, min(self.limit[row], assigned - 1))
        self.streak[row] = 0

    # ---- estimates --------------------------------------------------------------------------
    def observed(self, rows: np.ndarray) -> np.ndarray:
        return self.slot[rows] > 0

    def seconds_per_expert(self, rows: np.ndarray) -> np.ndarray:
        """Pessimistic seconds to download and train one expert; NaN when nothing is known."""
        q = self.config.quantile
        out = np.full(len(rows), np.nan)
        seen = self.observed(rows)
        if seen.any():
            r = rows[seen]
            out[seen] = (np.nanquantile(self.train[r], q, axis=1) + np.nanquantile(self.download[r], q, axis=1))
        rep = ~seen & (self.throughput[rows] > 0) & (self.samples[rows] > 0)
        if rep.any():
            r = rows[rep]
            dl = 0.0
            if self.config.expert_bytes:
                dl = np.where(self.bandwidth[r] > 0, self.config.expert_bytes / self.bandwidth[r], 0.0)
            out[rep] = self.samples[r] / self.throughput[r] + dl
        return out

    def capacity(self, rows: np.ndarray, deadline: Optional[float]) -> np.ndarray:
        """Experts each client can finish before ``deadline`` (seconds; None: no time limit)."""
        cap = np.minimum(self.limit[rows], self.config.max_capacity)
        if deadline is not None:
            spe = self.seconds_per_expert(rows)
            fresh = (self.planned[rows] == 0) & np.isfinite(spe)
            cap = np.where(fresh, self.config.max_capacity, cap)      # a new client's report sets its start
            known = np.isfinite(spe) & (spe > 0)
            timed = np.floor(deadline / np.where(known, spe, 1.0)).astype(np.int64)
            cap = np.where(known, np.minimum(cap, timed), cap)
        declared = self.declared[rows]
        cap = np.where(declared >= 0, np.minimum(cap, declared), cap)
        return np.maximum(cap, 0).astype(np.int64)

    def budget(self, rows: np.ndarray) -> np.ndarray:
        mem = self.memory[rows]
        has = np.isfinite(mem).any(axis=1)
        out = np.full(len(rows), self.config.default_memory)
        if has.any():
            out[has] = np.nanquantile(mem[has], 1 - self.config.quantile, axis=1)
        return out

    def completion_rate(self, rows: np.ndarray) -> np.ndarray:
        return np.divide(self.finished[rows], self.planned[rows], out=np.ones(len(rows)),
                         where=self.planned[rows] > 0)

    # ---- state ------------------------------------------------------------------------------
    _ARRAYS = ("train", "download", "memory", "slot", "mem_slot", "limit", "streak", "declared", "throughput",
               "bandwidth", "samples", "planned", "finished")

    def state(self) -> dict[str, Any]:
        return {name: np.where(np.isnan(a), None, a).tolist() if a.dtype.kind == "f" else a.tolist()
                for name in self._ARRAYS for a in [getattr(self, name)]}

    def restore(self, state: dict[str, Any], rows: int) -> None:
        for name in self._ARRAYS:
            current = getattr(self, name)
            raw = state[name]
            if current.dtype.kind == "f":
                arr = np.array(raw, dtype=object)
                arr = np.where(arr == None, np.nan, arr).astype(float)  # noqa: E711
            else:
                arr = np.asarray(raw, dtype=np.int64)
            expected = (rows, self.config.window) if current.ndim == 2 else (rows,)
            arr = arr.reshape(expected)
            setattr(self, name, arr)
