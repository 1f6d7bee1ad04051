"""Problem generators and readers shared by tests, benchmarks and the demo."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import numpy as np

from .problem import AlignmentProblem


def random_problem(clients: int, experts: int, *, seed: int = 0, budget: bool = False,
                   tolerance: float = 0.1, max_capacity: int = 3) -> AlignmentProblem:
    """The benchmark family: ``fitness = 0.7 U(0,1) + 0.3 popularity[e]`` with popularity ~ Beta(2, 5)
    (so the band binds), capacity uniform in ``1..max_capacity`` (3: the coarse MoE default; 8 for
    fine-grained top-8 MoEs), ``min_experts = 1``, load band
    ``floor((1 - tol) fair)..ceil((1 + tol) fair)`` with ``fair = sum(capacity) / E``.

    ``budget=True`` adds expert sizes uniform in 1..4 units and client budgets uniform in
    ``capacity + 1 .. 3 capacity + 1`` units.
    """
    rng = np.random.default_rng(seed)
    popularity = rng.beta(2.0, 5.0, size=experts)
    fitness = 0.7 * rng.random((clients, experts)) + 0.3 * popularity[None, :]
    capacity = rng.integers(1, max_capacity + 1, size=clients)
    fair = capacity.sum() / experts
    fields = {}
    if budget:
        fields["usage"] = rng.integers(1, 5, size=experts).astype(float)
        fields["budget"] = rng.integers(capacity + 1, 3 * capacity + 2).astype(float)
    return AlignmentProblem(fitness=fitness, capacity=capacity, min_experts=1,
                            expert_min_load=math.floor((1 - tolerance) * fair),
                            expert_max_load=math.ceil((1 + tolerance) * fair), **fields)


def skewed_problem(clients: int, experts: int, *, seed: int = 0, min_group: int = 0) -> AlignmentProblem:
    """The privacy-floor family: ``fitness = 0.5 U(0,1) + popularity[e]`` with popularity ~
    Beta(0.6, 3) (a few experts most clients want, many few want), capacity uniform in 1..3,
    ``min_experts = 1``, no lower load bound and at most 1.5 times the fair share per expert, so
    unpopular experts end up with a handful of trainers unless ``expert_min_group`` says otherwise."""
    rng = np.random.default_rng(seed)
    popularity = rng.beta(0.6, 3.0, size=experts)
    fitness = 0.5 * rng.random((clients, experts)) + popularity[None, :]
    capacity = rng.integers(1, 4, size=clients)
    fair = capacity.sum() / experts
    return AlignmentProblem(fitness=fitness, capacity=capacity, min_experts=1, expert_max_load=math.ceil(1.5 * fair),
                            expert_min_group=min_group)


def read_orlib_gap(path: Union[str, Path], sense: str = "max") -> AlignmentProblem:
    """An OR-Library GAP instance as an alignment problem.

    Jobs are clients that train exactly one expert; agents are experts whose weighted load
    ``sum_c r[e][c] x[c][e]`` stays within ``b[e]``; fitness is ``c`` for ``"max"`` and ``-c``
    for ``"min"``.
    """
    if sense not in ("max", "min"):
        raise ValueError(f"sense must be 'max' or 'min'; got {sense!r}")
    nums = np.array(Path(path).read_text().split(), dtype=np.int64)
    m, n = int(nums[0]), int(nums[1])
    if len(nums) != 2 + 2 * m * n + m:
        raise ValueError(f"{path}: expected {2 + 2 * m * n + m} numbers for {m} agents x {n} jobs; got {len(nums)}")
    cost = nums[2:2 + m * n].reshape(m, n).T.astype(float)
    resource = nums[2 + m * n:2 + 2 * m * n].reshape(m, n).T.astype(float)
    cap = nums[2 + 2 * m * n:].astype(float)
    return AlignmentProblem(fitness=cost if sense == "max" else -cost, capacity=1, min_experts=1,
                            load_weight=resource, expert_max_load=cap)
