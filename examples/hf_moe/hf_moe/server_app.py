"""ServerApp: AlignedStrategy (or Flower's FedAvg on the full model, ``strategy="fedavg"``) with a
central evaluation on the held-out sequences of all four languages.  Each round's accuracy and
the array bytes moved for training and for evaluation (counted here, for both strategies, from
the messages themselves) go to ``out`` (JSON), rewritten after every round."""

import json
import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from alignment_solver.coordinator import CoordinatorConfig                       # aligned
from alignment_solver.integrations.flower import AlignedStrategy                 # aligned
from alignment_solver.integrations.flower import array_bytes                     # (the byte counts, for both strategies)
from alignment_solver.integrations.torch import AlignedClient                    # (the nodes' view, below)
from hf_moe.task import EXPERTS, build_model, central_accuracy, initial_arrays, node_validation, token_scores

app = ServerApp()


class Measured:
    """Counts the array bytes of every training and evaluation message, both ways, per round
    (``train_down``, ``train_up``, ``eval_down``, ``eval_up`` in ``self.measured``)."""

    def _count(self, server_round, key, messages):
        entry = self.measured.setdefault(server_round, {})
        entry[key] = entry.get(key, 0) + array_bytes(messages)
        if key.endswith("_down"):
            entry[key.replace("_down", "_messages")] = entry.get(key.replace("_down", "_messages"), 0) + len(messages)

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._count(server_round, "train_down", messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._count(server_round, "train_up", replies)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._count(server_round, "eval_down", messages)
        return messages

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self._count(server_round, "eval_up", replies)
        result = super().aggregate_evaluate(server_round, replies)
        if result is not None:
            self.measured.setdefault(server_round, {})["federated"] = dict(result)
        return result


class MeasuredAligned(Measured, AlignedStrategy):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.measured = {}


class MeasuredFedAvg(Measured, FedAvg):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.measured, self.history = {}, {}


def node_views(arrays: dict[str, np.ndarray], seed: int, nodes: int, strategy) -> dict[str, float]:
    """Token accuracy of the model each node holds, on held-out sequences of its own language.

    FedAvg: every node holds the full global model.  Aligned: a node holds the shared arrays and
    its experts (this round's plan), with routing restricted to them, as in its own training (the
    library's masking, through ``AlignedClient`` on a message like the one the node got).
    """
    if isinstance(strategy, FedAvg):
        model = build_model(seed)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        return {f"partition-{p}": token_scores(model, node_validation(p, seed))[0] for p in range(nodes)}
    plan = strategy.history.get(strategy.current_round, {}).get("plan", {}) if strategy.unit_map else {}
    wire = strategy.unit_map.split(arrays) if plan else {}
    views = {}
    for entry in plan.values():
        experts, pid = entry["experts"], int(str(entry["label"]).rpartition("-")[2])
        mine = {k: Array(np.ascontiguousarray(v)) for k, v in wire.items() if strategy.expert_of(k) in (None, *experts)}
        msg = Message(content=RecordDict({"arrays": ArrayRecord(mine), "config": ConfigRecord({"experts": experts})}),
                      message_type=MessageType.TRAIN, dst_node_id=0)
        model = build_model(seed)
        with AlignedClient(model, msg).training():
            views[f"partition-{pid}"] = token_scores(model, node_validation(pid, seed))[0]
    return views


def wait_for_nodes(grid: Grid, wanted: int, seconds: float = 120.0) -> int:
    stop = time.time() + seconds
    while len(list(grid.get_node_ids())) < wanted and time.time() < stop:
        time.sleep(0.2)
    return len(list(grid.get_node_ids()))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    name, seed, rounds = str(cfg["strategy"]), int(cfg["seed"]), int(cfg["num-server-rounds"])
    nodes = wait_for_nodes(grid, int(cfg["num-nodes"]))
    evaluate = {} if float(cfg["fraction-evaluate"]) < 0 else {"fraction_evaluate": float(cfg["fraction-evaluate"])}
    if name == "aligned":
        strategy = MeasuredAligned(num_experts=EXPERTS, min_nodes=nodes, **evaluate,            # aligned
                                   config=CoordinatorConfig(tolerance=float(cfg["tolerance"]), seed=seed))   # aligned
    elif name == "fedavg":
        strategy = MeasuredFedAvg(fraction_train=1.0, min_available_nodes=nodes, min_train_nodes=nodes, **evaluate)
    else:
        raise ValueError(f"strategy must be 'aligned' or 'fedavg'; got {name!r}")
    started = time.time()
    initial = initial_arrays(seed)

    def dump(final=None) -> None:
        if not cfg["out"]:
            return
        rounds_ = sorted(set(strategy.history) | set(strategy.measured))
        data = {"strategy": name, "nodes": nodes, "rounds": rounds,
                "history": {str(r): {**strategy.history.get(r, {}), "measured": strategy.measured.get(r, {})}
                            for r in rounds_}}
        if final is not None:
            data["final_model"] = final
        tmp = f"{cfg['out']}.tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, default=float)
        os.replace(tmp, str(cfg["out"]))

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        full = {k: v.numpy() for k, v in arrays.items()}
        acc, loss = central_accuracy(full, seed)
        strategy.current_round = server_round
        views = node_views(full, seed, nodes, strategy) if server_round else {}
        view = float(np.mean(list(views.values()))) if views else None
        strategy.history.setdefault(server_round, {}).update(central_accuracy=acc, central_loss=loss, node_views=views,
                                                             node_view_accuracy=view, seconds=time.time() - started)
        print(f"[{name}] round {server_round}/{rounds}: central token accuracy {acc:.3f} (loss {loss:.3f})"
              + (f", nodes' own view {view:.3f}" if view is not None else "") + f", {time.time() - started:.0f} s",
              flush=True)
        dump()
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}), num_rounds=rounds,
                            timeout=float(cfg["round-timeout"]), evaluate_fn=central)
    final = {k: result.arrays[k].numpy() for k in result.arrays.keys()}
    dump({"keys": {k: list(v.shape) for k, v in final.items()}, "dtypes": sorted({str(v.dtype) for v in final.values()}),
          "finite": bool(all(np.isfinite(v).all() for v in final.values())),
          "changed": sorted(k for k in final if k in initial and not np.array_equal(final[k], initial[k]))})
