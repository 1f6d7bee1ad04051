"""Dynamic fitness scoring: how well each client's data suits each expert, learnt from training.

State per (client, expert): ``Q`` (smoothed score) and ``N`` (times measured).  After a round each
trained or probed pair gives a score ``s``: the accuracy the client reported for the expert
(``mode="accuracy"``) or ``exp(-alpha * mean_loss)`` (``mode="loss"``).  A pair's first score
replaces its prior (so measured pairs share one scale); later ones smooth it,
``Q <- (1 - beta) Q + beta s``; pairs not measured keep their value.  Untried pairs start from a
prior: the share of the client's samples the gate routes to each expert, when reported, else
``neutral``.  ``fitness(rows, round)`` adds the exploration bonus
``exploration * sqrt(ln(round + 2) / (N + 1))`` (never stored in ``Q``; 0 turns it off).
Rows are client slots handed out by the caller; arrays grow as clients appear.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ScorerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["accuracy", "loss"] = "accuracy"
    alpha: float = Field(1.0, gt=0, description="loss-driven score exp(-alpha * mean loss)")
    beta: float = Field(0.3, gt=0, le=1, description="EMA weight of the newest score")
    neutral: float = Field(0.5, ge=0, le=1, description="prior of a pair with no routing information")
    exploration: float = Field(0.05, ge=0, description="UCB bonus coefficient; 0 turns exploration off")


class FitnessScorer:
    def __init__(self, num_experts: int, config: ScorerConfig = ScorerConfig()) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1; got {num_experts}")
        self.E = num_experts
        self.config = config
        self.Q = np.zeros((0, num_experts))
        self.N = np.zeros((0, num_experts), dtype=np.int64)

    def grow(self, rows: int) -> None:
        """Make room for ``rows`` clients; new rows start at the neutral prior."""
        extra = rows - self.Q.shape[0]
        if extra > 0:
            self.Q = np.vstack([self.Q, np.full((extra, self.E), self.config.neutral)])
            self.N = np.vstack([self.N, np.zeros((extra, self.E), dtype=np.int64)])

    def set_prior(self, rows: np.ndarray, histograms: np.ndarray) -> None:
        """Cold start: untried pairs of ``rows`` take the routing share (rows of ``histograms``)."""
        hist = np.asarray(histograms, dtype=float)
        total = hist.sum(axis=1, keepdims=True)
        share = np.divide(hist, total, out=np.full_like(hist, 1.0 / self.E), where=total > 0)
        untried = self.N[rows] == 0
        self.Q[rows] = np.where(untried, share, self.Q[rows])

    def score(self, mean_loss: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
        if self.config.mode == "accuracy":
            return np.asarray(accuracy, dtype=float)
        return np.exp(-self.config.alpha * np.asarray(mean_loss, dtype=float))

    def update(self, rows: np.ndarray, experts: np.ndarray, mean_loss: np.ndarray, accuracy: np.ndarray) -> None:
        """EMA update of the measured pairs ``(rows[i], experts[i])``; each pair at most once."""
        s = self.score(mean_loss, accuracy)
        b = np.where(self.N[rows, experts] == 0, 1.0, self.config.beta)
        self.Q[rows, experts] = (1 - b) * self.Q[rows, experts] + b * s
        self.N[rows, experts] += 1

    def fitness(self, rows: np.ndarray, round_index: int) -> np.ndarray:
        """Q plus the exploration bonus, for the solver; ``Q`` itself is not changed."""
        q = self.Q[rows]
        c = self.config.exploration
        if c == 0:
            return q.copy()
        return q + c * np.sqrt(np.log(max(round_index, 0) + 2.0) / (self.N[rows] + 1.0))

    def state(self) -> dict[str, Any]:
        return {"Q": self.Q.tolist(), "N": self.N.tolist()}

    def restore(self, state: dict[str, Any], rows: int) -> None:
        self.Q = np.asarray(state["Q"], dtype=float).reshape(rows, self.E)
        self.N = np.asarray(state["N"], dtype=np.int64).reshape(rows, self.E)
