"""ServerApp: AlignedStrategy (or Flower's FedAvg on the full model, ``strategy="fedavg"``) with a
central evaluation on the held-out test set; each round's accuracy and the array bytes moved for
training go to ``out`` (JSON) when the last round is done.  Federated evaluation is off."""

import json
import os
import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from alignment_solver.coordinator import CoordinatorConfig                       # aligned
from alignment_solver.integrations.flower import AlignedStrategy, array_bytes, to_record   # aligned
from flower_torch.task import accuracy, initial_arrays, settings

app = ServerApp()


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg, counting the array bytes it sends and receives per round."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.history = {}

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.history.setdefault(server_round, {})["bytes_down"] = array_bytes(messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.history.setdefault(server_round, {})["bytes_up"] = array_bytes(replies)
        return super().aggregate_train(server_round, replies)


def wait_for_nodes(grid: Grid, wanted: int, seconds: float = 120.0) -> int:
    """The number of connected nodes, once ``wanted`` are there (or after ``seconds``)."""
    stop = time.time() + seconds
    while len(list(grid.get_node_ids())) < wanted and time.time() < stop:
        time.sleep(0.2)
    return len(list(grid.get_node_ids())) or 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings(context)
    nodes = wait_for_nodes(grid, int(cfg["num-nodes"]))
    seed = int(cfg["seed"])
    if cfg["strategy"] == "aligned":
        strategy = AlignedStrategy(num_experts=8, units=str(cfg["units"]), fraction_evaluate=0.0, min_nodes=nodes,   # aligned
                                   config=CoordinatorConfig(tolerance=float(cfg["tolerance"]), seed=seed))
    elif cfg["strategy"] == "fedavg":
        strategy = MeasuredFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=nodes,
                                  min_train_nodes=nodes)
    else:
        raise ValueError(f"strategy must be 'aligned' or 'fedavg'; got {cfg['strategy']!r}")
    started = time.time()

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc = accuracy({k: v.numpy() for k, v in arrays.items()}, nodes, seed)
        entry = strategy.history.setdefault(server_round, {})
        entry.update(central_accuracy=acc, seconds=time.time() - started)
        print(f"[{cfg['strategy']}] round {server_round}: central accuracy {acc:.3f}", flush=True)
        return MetricRecord({"accuracy": acc})

    strategy.start(grid=grid, initial_arrays=to_record(initial_arrays(seed)),
                   num_rounds=int(cfg["num-server-rounds"]), timeout=3600.0, evaluate_fn=central)
    if cfg["out"]:                                       # written once the last round is done
        tmp = f"{cfg['out']}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"strategy": cfg["strategy"], "units": cfg["units"], "nodes": nodes,
                       "history": {str(k): v for k, v in sorted(strategy.history.items())}}, fh, indent=1,
                      default=float)
        os.replace(tmp, str(cfg["out"]))
