"""ClientApp: trains the experts the server assigned, evaluates the full model."""

import time

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from alignment_solver.integrations.flower import capacity_reply, evaluate_reply, to_numpy, to_record, train_reply
from flower_app.task import node_data, settings

app = ClientApp()


def _ids(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def garbage(msg: Message, server_round: int, num_experts: int) -> Message:
    """A misbehaving client (for the robustness tests): a different forged reply each round."""
    arrays = to_numpy(msg.content["arrays"])
    experts = [int(e) for e in msg.content["config"]["experts"]]
    metrics = {"num-examples": 10 ** 12, "experts": experts, "expert-samples": [10] * len(experts),
               "expert-loss": [0.1] * len(experts), "expert-accuracy": [1.0] * len(experts)}
    kind = server_round % 4
    if kind == 1:
        arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
        metrics["num-examples"] = 10
    elif kind == 2:
        arrays = {f"expert{j}.{n}": np.full((64, 10) if n == "W" else (10,), 777.0)
                  for j in range(num_experts) for n in ("W", "b")}
        arrays["gate.W"] = np.full((64, num_experts), 777.0)
    elif kind == 3:
        arrays = {**arrays, "backdoor.W": np.ones(3)}
        metrics["num-examples"] = 10
    else:
        arrays = {**arrays, "gate.W": np.ones((1, 1))}
        metrics["num-examples"] = 10
    return Message(content=RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid, parts = _ids(context)
    if int(context.node_config.get("garbage", 0)) or pid == int(settings(context)["garbage-partition"]):
        return garbage(msg, int(msg.content["config"]["server-round"]), int(settings(context)["num-experts"]))
    x, y, _, _ = node_data(pid, parts, int(settings(context)["seed"]))
    delay = float(settings(context)["train-delay"])
    if delay:
        time.sleep(delay)
    max_experts = int(context.node_config.get("max-experts", 1 + pid % 3))
    return train_reply(msg, x, y, num_experts=int(settings(context)["num-experts"]), max_experts=max_experts,
                       seed=int(settings(context)["seed"]) + pid)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid, parts = _ids(context)
    _, _, xv, yv = node_data(pid, parts, int(settings(context)["seed"]))
    return evaluate_reply(msg, xv, yv, num_experts=int(settings(context)["num-experts"]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The capacity query before a node's first round: what its node config declares."""
    pid, _ = _ids(context)
    return capacity_reply(msg, context, max_experts=int(context.node_config.get("max-experts", 1 + pid % 3)))
