"""ServerApp: AlignedStrategy over the numpy mixture of experts, with a central test evaluation."""

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from alignment_solver.coordinator import CoordinatorConfig
from alignment_solver.integrations.flower import AlignedStrategy, to_numpy, to_record
from alignment_solver.training.model import MoE, init_params
from flower_app.task import settings, test_data

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings(context)
    experts, seed = int(cfg["num-experts"]), int(cfg["seed"])
    x_test, y_test, dim, classes = test_data(seed)
    model = MoE(experts)
    initial = init_params(dim, classes, experts, 0, np.random.default_rng(seed))
    strategy = AlignedStrategy(
        num_experts=experts, config=CoordinatorConfig(tolerance=float(cfg["tolerance"]), seed=seed),
        state_path=str(cfg["state-path"]) or None, min_nodes=int(cfg["min-nodes"]),
        history_path=str(cfg["history-path"]) or None)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc = float((model.predict(to_numpy(arrays), x_test) == y_test).mean())
        strategy.history.setdefault(server_round, {})["central_accuracy"] = acc
        return MetricRecord({"accuracy": acc})

    strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=int(cfg["num-server-rounds"]),
                   timeout=float(cfg["round-timeout"]), evaluate_fn=evaluate)
    strategy.history.setdefault(0, {})["initial_keys"] = sorted(initial)
    if cfg["history-path"]:
        strategy.write_history(str(cfg["history-path"]))
