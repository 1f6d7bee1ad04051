"""``pulp_highs``: the general 0-1 model through PuLP and HiGHS (highspy, in process)."""

from __future__ import annotations

from typing import Any, Optional

from ._pulp import GAP, PulpBackend


class PulpHighsBackend(PulpBackend):
    name = "pulp_highs"
    requires = ("pulp", "highspy")

    def make_solvers(self, time_limit: Optional[float], seed: int) -> list:
        import pulp

        return [pulp.HiGHS(msg=False, timeLimit=time_limit, random_seed=seed, threads=1, gapRel=GAP)]

    @staticmethod
    def dual_bound(prob: Any) -> Optional[float]:
        model = getattr(prob, "solverModel", None)
        if model is None:
            return None
        bound = float(model.getInfo().mip_dual_bound)
        return bound if abs(bound) < 1e300 else None
