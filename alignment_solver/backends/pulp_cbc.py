"""``pulp_cbc``: the general 0-1 model through PuLP and its bundled CBC binary.

CBC runs with its preprocessing off: with it on (PuLP's default), CBC reported "Optimal" at 385
for OR-Library GAP instance c0824_4 (minimisation) whose optimum is 384 (CP-SAT and HiGHS find
384); with it off all 120 gap1-gap12 instances solve to their known optimum, each under 1 s.
With it off CBC also exits with an error on some tiny infeasible models; then the solve is
repeated with preprocessing on (``stats["retries"]`` counts that).
"""

from __future__ import annotations

from typing import Optional

from ._pulp import GAP, PulpBackend


class PulpCbcBackend(PulpBackend):
    name = "pulp_cbc"
    requires = ("pulp",)
    child_processes = True

    def make_solvers(self, time_limit: Optional[float], seed: int) -> list:
        import pulp

        return [pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1, gapRel=GAP,
                                  options=[f"randomCbcSeed {seed + 1}", *extra])
                for extra in (["preprocess off"], [])]
