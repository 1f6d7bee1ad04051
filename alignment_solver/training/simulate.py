"""The light federated MoE training loop, run once per strategy on identical data and clients.

The pieces, in the order one run uses them:

- :mod:`.config`: :class:`SimConfig`, every option, validated;
- :mod:`.world`: data, partitions and device profiles shared by every strategy of the run;
- :mod:`.loop`: one strategy's rounds (plan, local training on the device clock of :mod:`.clock`,
  aggregation, evaluation), one metrics row per round;
- :mod:`.metrics`: the summary per strategy and its table; :mod:`.output`: files and plots.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from ..progress import Progress
from .config import SimConfig
from .loop import run_strategy
from .metrics import summarise, table
from .output import write as write_run
from .world import World


def simulate(cfg: SimConfig, *, write: bool = True, show_progress: bool = True,
             progress: Optional[Progress] = None) -> dict[str, Any]:
    """Run every strategy of ``cfg`` on one :class:`World`; ``{"config", "summary", "rows", "seconds"}``.

    With ``write`` the run also writes ``metrics.csv``, ``summary.json`` and the plots to
    ``cfg.output/cfg.run_name`` (``result["folder"]``, ``result["plots"]``).  One seed, ``cfg.seed``:
    ``cfg.seeds > 1`` is :func:`~.compare.compare`'s.  ``progress``: a bar to advance (else its own).
    """
    if cfg.seeds != 1:
        raise ValueError(f"simulate runs one seed; got seeds={cfg.seeds} (compare() runs several, paired)")
    started = time.perf_counter()
    world = World(cfg)
    own = progress is None and show_progress
    progress = Progress(cfg.rounds * len(cfg.strategies)) if own else progress
    rows = [row for s in cfg.strategies for row in run_strategy(cfg, world, s, progress)]
    if own:
        progress.close()
    result: dict[str, Any] = {"config": cfg.model_dump(), "summary": summarise(cfg, rows), "rows": rows,
                              "seconds": time.perf_counter() - started}
    if write:
        write_run(cfg, result)
    return result


__all__ = ["SimConfig", "simulate", "table"]
