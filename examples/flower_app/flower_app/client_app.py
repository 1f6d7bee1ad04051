"""ClientApp: trains the experts the server assigned, evaluates the full model."""

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from alignment_solver.integrations.flower import evaluate_reply, train_reply
from flower_app.task import node_data, settings

app = ClientApp()


def _ids(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid, parts = _ids(context)
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
