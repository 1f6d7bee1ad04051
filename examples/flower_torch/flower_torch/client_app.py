"""ClientApp: the user's own PyTorch loop; the aligned path adds nine lines (marked ``# aligned``)."""

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from alignment_solver.integrations.flower import capacity_reply                 # aligned
from alignment_solver.integrations.torch import AlignedClient                    # aligned
from flower_torch.task import Net, node_batches, settings

app = ClientApp()


def local_train(model, context, server_round, on_batch=lambda out, y: None) -> int:
    """Plain PyTorch training on this node's data; returns the number of samples seen."""
    pid, nodes = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    epochs, lr = int(settings(context)["local-epochs"]), float(settings(context)["lr"])
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    seen = 0
    for epoch in range(epochs):
        for x, y in node_batches(pid, nodes, int(settings(context)["seed"]), round_=server_round * epochs + epoch):
            optimiser.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimiser.step()
            on_batch(out, y)
            seen += len(y)
    return seen


def capacity(context: Context) -> int:
    """Experts per MoE layer this node takes: its node config's ``max-experts``, else 1, 2 or 3
    cycled over the partitions (the simulation gives nodes no other config)."""
    return int(context.node_config.get("max-experts", 1 + int(context.node_config["partition-id"]) % 3))


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    server_round = int(msg.content["config"]["server-round"])
    if "experts" not in msg.content["config"]:           # Flower's FedAvg: the whole model, both ways
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        n = local_train(model, context, server_round)
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
    client = AlignedClient(model, msg)                                           # aligned
    with client.training():                                                      # aligned
        local_train(model, context, server_round, on_batch=client.track)       # aligned
    return client.reply(max_experts=capacity(context))                           # aligned


@app.query()                                                                     # aligned
def query(msg: Message, context: Context) -> Message:                            # aligned
    return capacity_reply(msg, context, max_experts=capacity(context))           # aligned
