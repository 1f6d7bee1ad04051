"""One client's local work in the simulation: train its experts and a router, report per expert."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .config import SimConfig
from .model import MoE, Params, expert_keys

GATE = ("gate.W", "gate.b")


def nbytes(p: Params, keys) -> int:
    """Bytes of the arrays ``keys`` of ``p`` on the wire (their in-memory size)."""
    return int(sum(p[k].nbytes for k in keys))


def local_train(model: MoE, params: Params, x: np.ndarray, y: np.ndarray, experts: list[int], cfg: SimConfig,
                rng: np.random.Generator, router: Optional[Params] = None) -> tuple[Params, dict[str, Any]]:
    """Train the assigned experts and a router on one client's data; return what to send and the report.

    Without ``router`` the global gate is trained with the mixture loss (plus ``cfg.route_weight``
    times the routing loss); it gets a gradient only with two or more experts or a routing loss,
    and with ``cfg.gate_average="updated"`` a client whose gate got none does not send it.  With
    ``router`` (the client's own gate, updated in place) that router takes the mixture gradient
    and the global gate copy is taught only the routing loss (weight ``max(route_weight, 1)``).
    The report's ``experts`` hold each expert's samples routed, loss and accuracy on the training data.
    """
    allowed = np.zeros(model.E, dtype=bool)
    allowed[experts] = True
    own = router is not None
    if own:
        gate = list(GATE) if not allowed.all() else []
    else:
        learns = len(experts) > 1 or cfg.route_weight > 0
        gate = list(GATE) if learns or cfg.gate_average == "all" else []
    keys = gate + [k for j in experts for k in expert_keys(j, model.hidden)]
    local = {k: params[k].copy() for k in keys}
    mine = {k: router[k] for k in GATE} if own else {}
    view = {**params, **local, **mine}
    train = set(keys) | set(GATE) if own else set(keys)
    for _ in range(cfg.local_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), cfg.batch_size):
            b = order[start:start + cfg.batch_size]
            _, grads, _ = model.loss_and_grad(view, x[b], y[b], allowed, train, route_weight=cfg.route_weight)
            for k, g in grads.items():
                (mine if own and k in GATE else local)[k] -= cfg.lr * g
            if own and gate:
                _, d = model.routing_loss(local, x[b], allowed)
                for k, g in model.gate_grads(x[b], d).items():
                    local[k] -= cfg.lr * max(cfg.route_weight, 1.0) * g
            view.update(local)
            view.update(mine)
    if own:
        router.update(mine)
    probs, w, q, sel = model.forward(view, x, allowed)[:4]
    per_expert = []
    for j in experts:
        routed = sel[:, j]
        n = int(routed.sum())
        if n:
            qj = q[routed, j]
            loss = float(-np.log(np.maximum(qj[np.arange(n), y[routed]], 1e-12)).mean())
            acc = float((qj.argmax(axis=1) == y[routed]).mean())
        else:
            loss, acc = 0.0, 0.0
        per_expert.append({"expert": int(j), "samples": n, "mean_loss": loss, "accuracy": acc})
    return local, {"experts": per_expert, "samples": len(y)}


def routing_histogram(model: MoE, params: Params, x: np.ndarray) -> list[float]:
    """How many of ``x`` the global gate sends to each expert first (its top logit), as floats."""
    logits = x @ params["gate.W"] + params["gate.b"]
    return np.bincount(logits.argmax(axis=1), minlength=model.E).astype(float).tolist()
