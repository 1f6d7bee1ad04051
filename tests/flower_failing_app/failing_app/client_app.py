"""ClientApp: training always raises (as a token-routed model did in issue 35); no query handler."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()
REASON = "MoE layer 'blocks.0.moe' routed 256 samples but the batch has 32"


@app.train()
def train(msg: Message, context: Context) -> Message:
    raise ValueError(REASON)
