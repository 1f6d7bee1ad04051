"""Client side of an aligned round for the numpy MoE, framework-neutral.

Both adapters' client helpers (Flower's ``train_reply``, NVFlare's ``train_model``) call these:

- :func:`received_experts` tells which experts a site was sent, from the keys it received;
- :func:`train_arrays` trains the gate and the assigned experts and returns the arrays to send
  back with the reply metrics documented in :mod:`alignment_solver.integrations.replies`;
- :func:`evaluate_arrays` scores the full model (``accuracy``, ``loss``, ``num-examples``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..training.model import MoE, expert_of


def received_experts(params: Mapping[str, np.ndarray]) -> list[int]:
    """The experts whose arrays are among ``params``, sorted."""
    return sorted({j for k in params if (j := expert_of(k)) is not None})


def train_arrays(params: Mapping[str, np.ndarray], experts: list[int], x: np.ndarray, y: np.ndarray, *,
                 num_experts: int, server_round: int, hidden: int = 0, top_k: int = 2, lr: float = 0.5,
                 epochs: int = 2, batch_size: int = 32, max_experts: Optional[int] = None,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the gate and ``experts`` on ``(x, y)``; return (trained arrays, reply metrics).

    The random stream depends only on ``seed`` and ``server_round``, so a replayed round trains
    the same way.  The arrays are every shared array received and those of ``experts``; an expert
    routed no sample after training (``expert-samples`` 0) goes back unchanged.
    """
    from ..training.client import local_train, routing_histogram
    from ..training.config import SimConfig

    params = {k: np.asarray(v) for k, v in params.items()}
    model = MoE(num_experts, hidden=hidden, top_k=top_k)
    cfg = SimConfig(lr=lr, local_epochs=epochs, batch_size=batch_size, experts=num_experts,
                    max_capacity=min(3, num_experts), min_capacity=1)
    rng = np.random.default_rng([seed, int(server_round)])
    started = time.perf_counter()
    local, rep = local_train(model, params, x, y, experts, cfg, rng)
    seconds = time.perf_counter() - started
    idle = {int(j) for j, e in zip(experts, rep["experts"]) if e["samples"] == 0}
    for k, v in params.items():            # every array sent goes back (replies.ReplyChecker):
        if expert_of(k) is None and k not in local:
            local[k] = v.copy()            # shared ones this client did not train, unchanged,
        elif expert_of(k) in idle:
            local[k] = v.copy()            # and those of an expert reported with 0 samples
    metrics: dict[str, Any] = {
        "num-examples": int(len(y)), "experts": [int(e) for e in experts],
        "expert-samples": [e["samples"] for e in rep["experts"]],
        "expert-loss": [e["mean_loss"] for e in rep["experts"]],
        "expert-accuracy": [e["accuracy"] for e in rep["experts"]],
        "train-seconds": float(seconds), "routing": routing_histogram(model, {**params, **local}, x),
        "received-keys": len(params)}
    if max_experts is not None:
        metrics["max-experts"] = int(max_experts)
    return local, metrics


def evaluate_arrays(params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, num_experts: int,
                    hidden: int = 0, top_k: int = 2) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and sample count of the full model on ``(x, y)``."""
    params = {k: np.asarray(v) for k, v in params.items()}
    model = MoE(num_experts, hidden=hidden, top_k=top_k)
    probs = model.forward(params, x)[0]
    loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
    acc = float((probs.argmax(axis=1) == y).mean())
    return {"accuracy": acc, "loss": loss, "num-examples": int(len(y))}


__all__ = ["evaluate_arrays", "received_experts", "train_arrays"]
