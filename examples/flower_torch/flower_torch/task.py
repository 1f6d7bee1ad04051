"""The model and the data: a PyTorch MoE with two MoE blocks on concept-shifted digits.

Every process (server, each node) builds the same data split from the seed: scikit-learn's
bundled digits under four domains (input transform + label permutation per domain), one domain
per node.  Nothing is downloaded.
"""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignment_solver.training.data import load_shifted_digits, partition

EXPERTS, TOP_K, DIM, HIDDEN = 8, 2, 32, 32


class MoEBlock(nn.Module):
    """A residual MoE layer: ``router`` picks the top-k of ``experts`` for each sample."""

    def __init__(self, dim: int, experts: int, top_k: int, hidden: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
                                     for _ in range(experts))
        self.top_k = top_k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(h).topk(self.top_k, dim=-1)
        weights = weights.softmax(dim=-1)
        out = torch.zeros_like(h)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                rows = chosen[:, slot] == e
                if rows.any():
                    out[rows] += weights[rows, slot, None] * expert(h[rows])
        return h + out


class Net(nn.Module):
    """Shared embedding and head around two MoE blocks."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(64, DIM)
        self.blocks = nn.ModuleList(MoEBlock(DIM, EXPERTS, TOP_K, HIDDEN) for _ in range(2))
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def initial_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """The initial model as numpy arrays (float32), the same in every process."""
    return {k: v.numpy() for k, v in Net(seed).state_dict().items()}


@lru_cache(maxsize=4)
def _data(nodes: int, seed: int):
    rng = np.random.default_rng(seed)
    data = load_shifted_digits(rng, domains=4)
    parts = partition(data, nodes, "domains", rng, domains_per_client=1)
    return data, parts


def node_batches(partition_id: int, nodes: int, seed: int = 0, batch: int = 32, round_: int = 0):
    """The node's training batches, shuffled per round (seeded): a list of (x, y) tensors."""
    data, parts = _data(nodes, seed)
    idx = np.random.default_rng([seed, partition_id, round_]).permutation(parts[partition_id])
    x = torch.tensor(data.x_train[idx], dtype=torch.float32)
    y = torch.tensor(data.y_train[idx])
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(idx), batch)]


def test_set(nodes: int, seed: int = 0):
    data, _ = _data(nodes, seed)
    return torch.tensor(data.x_test, dtype=torch.float32), torch.tensor(data.y_test)


def accuracy(arrays: dict[str, np.ndarray], nodes: int, seed: int = 0) -> float:
    """Accuracy of ``arrays`` on the held-out test set (central evaluation)."""
    model = Net(seed)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    model.eval()
    x, y = test_set(nodes, seed)
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


DEFAULTS = {"strategy": "aligned", "units": "expert", "num-server-rounds": 10, "num-nodes": 8, "local-epochs": 2,
            "lr": 0.1, "tolerance": 0.2, "seed": 0, "out": ""}


def settings(context) -> dict:
    """The run config (``pyproject.toml``'s ``[tool.flwr.app.config]``, with ``flwr run --run-config``
    on top) over :data:`DEFAULTS`."""
    return {**DEFAULTS, **dict(context.run_config)}


def initial_model(num_experts: int = EXPERTS) -> dict[str, np.ndarray]:
    """NVFlare's ``initial_model`` hook (the controller names it ``flower_torch.task:initial_model``)."""
    return initial_arrays(0)


def central_evaluation(arrays: dict) -> dict:
    """NVFlare's ``central_evaluation`` hook: accuracy on the held-out test set."""
    return {"accuracy": accuracy(arrays, 1)}
