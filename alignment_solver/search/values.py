"""The value of a plan as every search step compares them."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..problem import AlignmentProblem


def plan_value(problem: AlignmentProblem, x: np.ndarray, soft_penalty: Optional[float]) -> float:
    """The plan's objective (band misses priced at ``soft_penalty``), or -inf if it breaks a hard row
    (the band too when ``soft_penalty`` is None)."""
    count = x.sum(axis=1)
    if np.any(count < problem.min_experts_array) or np.any(count > problem.capacity_array):
        return -np.inf
    if not np.all(problem.allowed_matrix[x]):
        return -np.inf
    if problem.usage_matrix is not None and np.any((problem.usage_matrix * x).sum(axis=1) > problem.budget + 1e-9):
        return -np.inf
    w = problem.weight_matrix
    load = x.sum(axis=0) if w is None else (w * x).sum(axis=0)
    miss = float(np.maximum(problem.min_load_array - load, 0).sum() + np.maximum(load - problem.max_load_array, 0).sum())
    if soft_penalty is None:
        return -np.inf if miss > 1e-9 else float(problem.objective_matrix[x].sum())
    return float(problem.objective_matrix[x].sum()) - soft_penalty * miss


__all__ = ["plan_value"]
