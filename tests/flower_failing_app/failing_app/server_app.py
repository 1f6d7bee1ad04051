"""ServerApp: AlignedStrategy over the numpy mixture of experts; every node will fail."""

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from alignment_solver.integrations.flower import AlignedStrategy, to_record
from alignment_solver.training.model import init_params

app = ServerApp()
DEFAULTS = {"num-server-rounds": 6, "max-failed-rounds": 2, "min-nodes": 2, "round-timeout": 600.0, "history-path": ""}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = {**DEFAULTS, **dict(context.run_config)}          # run_simulation passes no run config
    strategy = AlignedStrategy(num_experts=4, min_nodes=int(cfg["min-nodes"]),
                               max_failed_rounds=int(cfg["max-failed-rounds"]),
                               history_path=str(cfg["history-path"]) or None)
    strategy.start(grid=grid, initial_arrays=to_record(init_params(5, 3, 4, 0, np.random.default_rng(0))),
                   num_rounds=int(cfg["num-server-rounds"]), timeout=float(cfg["round-timeout"]))
