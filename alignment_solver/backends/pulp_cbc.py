"""``pulp_cbc``: the general 0-1 model through PuLP and its bundled CBC binary.

The binary is run through ``COIN_CMD`` with its path (PuLP 3.3 deprecates ``PULP_CBC_CMD``; PuLP
4.0 will ship no binary, hence ``pulp<4`` in the extra); a ``cbc`` on the PATH is used where
PuLP has none.

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

        return [pulp.COIN_CMD(path=cbc_path(), msg=False, timeLimit=time_limit, threads=1, gapRel=GAP,
                              options=[f"randomCbcSeed {seed + 1}", *extra])
                for extra in (["preprocess off"], [])]


def cbc_path() -> str:
    """The CBC binary bundled with PuLP 3 (made executable if needed), else ``cbc`` on the PATH."""
    import os
    import shutil
    import stat

    from pulp.apis import coin_api

    bundled = os.path.normpath(coin_api.pulp_cbc_path)
    if os.path.isfile(bundled):
        if not os.access(bundled, os.X_OK):
            os.chmod(bundled, os.stat(bundled).st_mode | stat.S_IXUSR)
        return bundled
    found = shutil.which("cbc")
    if found is None:
        raise RuntimeError("no CBC binary: PuLP bundles none (PuLP 4?) and there is no 'cbc' on the PATH")
    return found
