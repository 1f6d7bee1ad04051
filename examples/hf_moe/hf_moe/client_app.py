"""ClientApp: the user's own PyTorch loop on a Hugging Face Mixtral; the aligned path adds the
lines marked ``# aligned``.  Flower's FedAvg (no ``experts`` in the config) takes the plain path."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from alignment_solver.integrations.flower import capacity_reply                 # aligned
from alignment_solver.integrations.torch import AlignedClient, evaluate_reply    # aligned
from hf_moe.task import build_model, local_train, node_batches, node_validation

app = ClientApp()


def capacity(context: Context) -> int:
    """Experts per MoE layer this node takes: its node config's ``max-experts``, else 2 or 3
    alternating over the partitions (the simulation gives nodes no other config)."""
    return int(context.node_config.get("max-experts", 2 + int(context.node_config["partition-id"]) % 2))


def batches(msg: Message, context: Context):
    cfg = context.run_config
    return node_batches(int(context.node_config["partition-id"]), int(cfg["seed"]), int(cfg["sequences"]),
                        int(cfg["batch-size"]), round_=int(msg.content["config"]["server-round"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = build_model(int(context.run_config["seed"]))
    epochs, lr = int(context.run_config["local-epochs"]), float(context.run_config["lr"])
    if "experts" not in msg.content["config"]:           # Flower's FedAvg: the whole model, both ways
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        tokens = local_train(model, batches(msg, context), epochs=epochs, lr=lr)
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": tokens})}), reply_to=msg)
    client = AlignedClient(model, msg)                                           # aligned
    with client.training():                                                      # aligned
        local_train(model, batches(msg, context), epochs=epochs, lr=lr, on_batch=client.track)   # aligned
    return client.reply(max_experts=capacity(context))                           # aligned


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on this node's own held-out sequences (token accuracy), for both strategies."""
    pid, seed = int(context.node_config["partition-id"]), int(context.run_config["seed"])
    return evaluate_reply(build_model(seed), msg, node_validation(pid, seed))   # aligned


@app.query()                                                                     # aligned
def query(msg: Message, context: Context) -> Message:                            # aligned
    return capacity_reply(msg, context, max_experts=capacity(context))           # aligned
