"""The expert load band under Lagrangian prices, shared by the price searches."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..problem import AlignmentProblem


class BandRows:
    """The expert load rows under Lagrangian prices ``nu`` (E,): ``nu > 0`` prices the upper row,
    ``nu < 0`` the lower one, ``|nu| <= soft_penalty`` in soft mode."""

    def __init__(self, problem: AlignmentProblem, soft_penalty: Optional[float], share: float = 1.0) -> None:
        """``share``: the band times it, for a sample of that share of the clients."""
        self.L, self.U = problem.min_load_array * share, problem.max_load_array * share
        top = np.full(len(self.L), np.inf if soft_penalty is None else soft_penalty)
        self.hi = np.where(np.isfinite(self.U), top, 0.0)
        self.lo = np.where(self.L > 0, -top, 0.0)
        self.Uf = np.where(np.isfinite(self.U), self.U, 0.0)

    def constant(self, nu: np.ndarray) -> float:
        """The rows' term of the bound: ``sum_e nu+_e U_e - nu-_e L_e``."""
        return float(np.maximum(nu, 0) @ self.Uf) - float(np.maximum(-nu, 0) @ self.L)

    def subgradient(self, nu: np.ndarray, load: np.ndarray) -> np.ndarray:
        L, U = self.L, self.U
        return np.where(nu > 0, load - self.Uf, np.where(nu < 0, load - L, np.maximum(load - U, 0) + np.minimum(load - L, 0)))

    def step(self, nu: np.ndarray, g: np.ndarray, size: float) -> np.ndarray:
        return np.clip(nu + size * g, self.lo, self.hi)


__all__ = ["BandRows"]
