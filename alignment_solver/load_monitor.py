"""Global expert load monitoring: how much each expert has been trained, and who is starving.

Per round and cumulatively, per expert: load in clients and in samples.  The coefficient of
variation (CV = std / mean, population std; 0 when the mean is 0) and the max/min ratio of the
load; rounds since each expert was last trained.  The deficit of expert ``e`` accumulates its
shortfall against the fair share and decays::

    deficit <- max(0, decay * deficit + (fair - load))      fair = (sum of loads) / E

``bounds(total_capacity, tolerance)`` gives the next round's load band around
``fair = total_capacity / E``: the integer band of :func:`~alignment_solver.problem.integer_band`
(rounded inwards, always containing ``floor(fair)..ceil(fair)``) with ``gain * deficit`` added to
the lower end (never above the upper), so starved experts catch up (``deficit_mode="bound"``);
with ``deficit_mode="fitness"`` the band stays plain and ``fitness_boost()`` adds
``gain * deficit / fair`` to each expert's fitness column instead.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .problem import integer_band


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    decay: float = Field(0.8, ge=0, le=1, description="deficit carried into the next round")
    gain: float = Field(0.5, ge=0, description="how much of the deficit is added to the lower bound")
    deficit_mode: Literal["bound", "fitness"] = "bound"


def cv(load: np.ndarray) -> float:
    mean = float(np.mean(load)) if len(load) else 0.0
    return float(np.std(load) / mean) if mean > 0 else 0.0


def max_min_ratio(load: np.ndarray) -> float:
    low = float(np.min(load)) if len(load) else 0.0
    return float(np.max(load) / low) if low > 0 else math.inf


class ExpertLoadMonitor:
    def __init__(self, num_experts: int, config: MonitorConfig = MonitorConfig()) -> None:
        self.E = num_experts
        self.config = config
        self.round_clients = np.zeros(num_experts)
        self.round_samples = np.zeros(num_experts)
        self.total_clients = np.zeros(num_experts)
        self.total_samples = np.zeros(num_experts)
        self.last_trained = np.full(num_experts, -1, dtype=np.int64)
        self.deficit = np.zeros(num_experts)
        self.last_round = -1
        self.history: list[list[float]] = []       # clients per expert, one row per observed round

    def record(self, round_index: int, clients: np.ndarray, samples: np.ndarray) -> None:
        """Loads actually trained in ``round_index`` (clients and samples per expert)."""
        clients = np.asarray(clients, dtype=float)
        samples = np.asarray(samples, dtype=float)
        self.round_clients, self.round_samples = clients, samples
        self.total_clients = self.total_clients + clients
        self.total_samples = self.total_samples + samples
        self.last_trained = np.where(clients > 0, round_index, self.last_trained)
        fair = clients.sum() / self.E
        self.deficit = np.maximum(0.0, self.config.decay * self.deficit + (fair - clients))
        self.last_round = round_index
        self.history.append(clients.tolist())

    def rounds_since_trained(self, round_index: int) -> np.ndarray:
        """Rounds since each expert was last trained (``round_index + 1`` if never)."""
        return np.where(self.last_trained >= 0, round_index - self.last_trained, round_index + 1)

    def stats(self) -> dict[str, float]:
        return {"cv_round": cv(self.round_clients), "cv_cumulative": cv(self.total_clients),
                "max_min_round": max_min_ratio(self.round_clients),
                "max_min_cumulative": max_min_ratio(self.total_clients),
                "cv_round_samples": cv(self.round_samples)}

    def bounds(self, total_capacity: float, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
        """(L, U) for the next round from the fair share of ``total_capacity``."""
        lo, hi = integer_band(total_capacity / self.E, tolerance)
        upper = np.full(self.E, float(hi))
        boost = self.config.gain * self.deficit if self.config.deficit_mode == "bound" else 0.0
        lower = np.floor(lo + boost + 1e-9)
        return np.minimum(np.maximum(lower, 0.0), upper), upper

    def fitness_boost(self, total_capacity: float) -> np.ndarray:
        if self.config.deficit_mode != "fitness":
            return np.zeros(self.E)
        fair = max(total_capacity / self.E, 1e-12)
        return self.config.gain * self.deficit / fair

    def state(self) -> dict[str, Any]:
        return {"round_clients": self.round_clients.tolist(), "round_samples": self.round_samples.tolist(),
                "total_clients": self.total_clients.tolist(), "total_samples": self.total_samples.tolist(),
                "last_trained": self.last_trained.tolist(), "deficit": self.deficit.tolist(),
                "last_round": self.last_round, "history": self.history}

    def restore(self, state: dict[str, Any]) -> None:
        for name in ("round_clients", "round_samples", "total_clients", "total_samples", "deficit"):
            arr = np.asarray(state[name], dtype=float)
            if arr.shape != (self.E,):
                raise ValueError(f"load monitor state {name} has shape {arr.shape}, expected ({self.E},)")
            setattr(self, name, arr)
        self.last_trained = np.asarray(state["last_trained"], dtype=np.int64)
        self.last_round = int(state["last_round"])
        self.history = [list(map(float, row)) for row in state["history"]]
