"""``pulp_cbc``: the general 0-1 model through PuLP and its bundled CBC binary."""

from __future__ import annotations

from typing import Any, Optional

from ._pulp import PulpBackend


class PulpCbcBackend(PulpBackend):
    name = "pulp_cbc"
    requires = ("pulp",)

    def make_solver(self, time_limit: Optional[float], seed: int) -> Any:
        import pulp

        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1, options=[f"randomCbcSeed {seed + 1}"])
