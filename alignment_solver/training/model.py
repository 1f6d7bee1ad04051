"""A small mixture-of-experts classifier in numpy, with hand-written gradients.

Gate: ``logits = x Wg + bg`` over E experts.  Routing: per sample, the ``top_k`` largest logits
among the experts the caller allows (the others are masked); mixture weights ``w`` are the
softmax of the logits restricted to that set.  Experts: softmax regression (``hidden=0``) or a
one-hidden-layer ReLU MLP.  Prediction ``p = sum_j w_j softmax(f_j(x))``; loss ``-log p_y``.

Gradients (``r_j = w_j q_jy / p_y`` is expert j's responsibility for the true class)::

    dL/dlogit_j = w_j - r_j            (selected experts; 0 elsewhere)
    dL/dz_jc    = r_j (q_jc - [c = y])  (expert j's output logits)

Parameters live in a dict of arrays: ``gate.W``, ``gate.b`` and ``expert{j}.W1`` ... so a
client can receive and send only some experts.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np

Params = dict[str, np.ndarray]
_EXPERT_KEY = re.compile(r"^expert(\d+)\.")


def expert_of(key: str) -> Optional[int]:
    """Expert id owning a parameter key (``expert3.W`` -> 3), or None for shared arrays."""
    m = _EXPERT_KEY.match(key)
    return int(m.group(1)) if m else None


def average_by_owner(current: Params, updates: list[tuple[Params, float, dict[int, float]]],
                     owner: Callable[[str], Optional[int]] = expert_of) -> tuple[Params, set[int]]:
    """Federated averaging per owner of each key.

    ``updates`` holds, per client, the arrays it trained, its weight for shared arrays (samples)
    and its weight per expert (samples routed there; at least 1).  Each key is averaged over the
    clients that sent it; keys nobody sent keep their ``current`` value.  Returns the new
    parameters and the experts that somebody trained.
    """
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for arrays, shared, per_expert in updates:
        for k, v in arrays.items():
            j = owner(k)
            w = shared if j is None else max(float(per_expert.get(j, 0.0)), 1.0)
            sums[k] = sums.get(k, 0.0) + w * v
            weights[k] = weights.get(k, 0.0) + w
    new = dict(current)
    for k, total in sums.items():
        new[k] = total / weights[k]
    return new, {j for k in sums if (j := owner(k)) is not None}


def expert_keys(j: int, hidden: int) -> list[str]:
    return [f"expert{j}.W1", f"expert{j}.b1", f"expert{j}.W2", f"expert{j}.b2"] if hidden else \
        [f"expert{j}.W", f"expert{j}.b"]


def init_params(dim: int, classes: int, experts: int, hidden: int, rng: np.random.Generator) -> Params:
    p: Params = {"gate.W": rng.normal(0, 0.01, (dim, experts)), "gate.b": np.zeros(experts)}
    for j in range(experts):
        if hidden:
            p[f"expert{j}.W1"] = rng.normal(0, np.sqrt(2.0 / dim), (dim, hidden))
            p[f"expert{j}.b1"] = np.zeros(hidden)
            p[f"expert{j}.W2"] = rng.normal(0, np.sqrt(1.0 / hidden), (hidden, classes))
            p[f"expert{j}.b2"] = np.zeros(classes)
        else:
            p[f"expert{j}.W"] = rng.normal(0, 0.01, (dim, classes))
            p[f"expert{j}.b"] = np.zeros(classes)
    return p


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


class MoE:
    """Forward pass, loss and gradients for the parameter dict layout above."""

    def __init__(self, experts: int, hidden: int = 0, top_k: int = 2) -> None:
        self.E, self.hidden, self.top_k = experts, hidden, top_k

    def route(self, p: Params, x: np.ndarray, allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Gate logits and the (N, E) bool mask of each sample's selected experts."""
        logits = x @ p["gate.W"] + p["gate.b"]
        masked = logits if allowed is None else np.where(allowed[None, :], logits, -np.inf)
        k = min(self.top_k, self.E if allowed is None else int(allowed.sum()))
        top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
        sel = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(sel, top, True, axis=1)
        return logits, sel

    def _expert(self, p: Params, j: int, x: np.ndarray):
        if self.hidden:
            pre = x @ p[f"expert{j}.W1"] + p[f"expert{j}.b1"]
            h = np.maximum(pre, 0.0)
            return h @ p[f"expert{j}.W2"] + p[f"expert{j}.b2"], h
        return x @ p[f"expert{j}.W"] + p[f"expert{j}.b"], None

    def forward(self, p: Params, x: np.ndarray, allowed: Optional[np.ndarray] = None):
        logits, sel = self.route(p, x, allowed)
        w = _softmax(np.where(sel, logits, -np.inf), axis=1)
        experts = np.flatnonzero(sel.any(axis=0))
        q = np.zeros((x.shape[0], self.E, self._classes(p)))
        cache = {}
        for j in experts:
            z, h = self._expert(p, j, x)
            q[:, j] = _softmax(z, axis=1)
            cache[j] = h
        probs = np.einsum("ne,nec->nc", w, q)
        return probs, w, q, sel, cache

    def _classes(self, p: Params) -> int:
        suffix = ".W2" if self.hidden else ".W"
        key = next(k for k in p if k.startswith("expert") and k.endswith(suffix))
        return p[key].shape[1]

    def predict(self, p: Params, x: np.ndarray, allowed: Optional[np.ndarray] = None) -> np.ndarray:
        return self.forward(p, x, allowed)[0].argmax(axis=1)

    def routing_loss(self, p: Params, x: np.ndarray, allowed: np.ndarray) -> tuple[float, np.ndarray]:
        """``mean(-log sum_{j allowed} softmax(logits)_j)`` and its gradient in the gate logits."""
        full = _softmax(x @ p["gate.W"] + p["gate.b"], axis=1)
        inside = np.where(allowed[None, :], full, 0.0)
        mass = np.maximum(inside.sum(axis=1, keepdims=True), 1e-300)
        return float(-np.log(mass).mean()), (full - inside / mass) / x.shape[0]

    @staticmethod
    def gate_grads(x: np.ndarray, dlogits: np.ndarray) -> Params:
        """Gradients of ``gate.W`` and ``gate.b`` from the gradient in the gate logits."""
        return {"gate.W": x.T @ dlogits, "gate.b": dlogits.sum(axis=0)}

    def expert_scores(self, p: Params, x: np.ndarray, y: np.ndarray, experts: list[int]) -> list[dict]:
        """Each expert alone on ``(x, y)``: ``{"expert", "mean_loss", "accuracy"}`` (no routing)."""
        out = []
        for j in experts:
            q = _softmax(self._expert(p, j, x)[0], axis=1)
            py = np.maximum(q[np.arange(len(y)), y], 1e-12)
            out.append({"expert": int(j), "mean_loss": float(-np.log(py).mean()),
                        "accuracy": float((q.argmax(axis=1) == y).mean())})
        return out

    def loss_and_grad(self, p: Params, x: np.ndarray, y: np.ndarray, allowed: Optional[np.ndarray] = None,
                      train: Optional[set[str]] = None, route_weight: float = 0.0):
        """Mean loss and gradients of the parameters in ``train`` (None: all).

        ``route_weight`` > 0 adds ``route_weight * mean(-log sum_{j allowed} softmax(logits)_j)``,
        a routing loss over all E experts that pulls the gate towards the allowed experts; unlike
        the mixture loss it has a gradient when only one expert is allowed.
        """
        n = x.shape[0]
        probs, w, q, sel, cache = self.forward(p, x, allowed)
        py = np.maximum(probs[np.arange(n), y], 1e-300)
        loss = float(-np.log(py).mean())
        qy = q[np.arange(n), :, y]                              # (N, E)
        r = w * qy / py[:, None]
        grads: Params = {}
        want = (lambda k: True) if train is None else (lambda k: k in train)
        dlogits = np.where(sel, w - r, 0.0) / n
        if route_weight and allowed is not None:
            rloss, rlogits = self.routing_loss(p, x, allowed)
            loss += route_weight * rloss
            dlogits = dlogits + route_weight * rlogits
        grads.update({k: g for k, g in self.gate_grads(x, dlogits).items() if want(k)})
        for j in cache:
            keys = expert_keys(j, self.hidden)
            if not any(want(k) for k in keys):
                continue
            dz = r[:, j, None] * q[:, j]
            dz[np.arange(n), y] -= r[:, j]
            dz /= n
            if self.hidden:
                h = cache[j]
                grads[keys[2]] = h.T @ dz
                grads[keys[3]] = dz.sum(axis=0)
                dh = (dz @ p[keys[2]].T) * (h > 0)
                grads[keys[0]] = x.T @ dh
                grads[keys[1]] = dh.sum(axis=0)
            else:
                grads[keys[0]] = x.T @ dz
                grads[keys[1]] = dz.sum(axis=0)
        return loss, grads, (probs, w, q, sel)
