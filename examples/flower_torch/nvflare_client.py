"""NVFlare site script (Client API) for the same PyTorch MoE: the user's loop plus the aligned helpers.

``--log DIR`` appends one JSON line per training task to ``DIR/<site>.jsonl`` (assigned units, the
keys that arrived and the dtypes sent back): the site-side record the tests read.
"""

import argparse
import json
from pathlib import Path

import nvflare.client as flare
import torch
import torch.nn.functional as F
from nvflare.app_common.abstract.fl_model import FLModel

from alignment_solver.integrations.nvflare import QUERY_TASK, capacity_model
from alignment_solver.integrations.torch import AlignedClient, evaluate_reply
from flower_torch.task import Net, node_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, required=True)
    ap.add_argument("--log", default="")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per site (the simulator runs all sites "
                    "on this machine: more threads than cores make every site crawl)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    index = int(site.rpartition("-")[2]) - 1                  # site-1 -> partition 0
    capacity = 1 + index % 3
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if flare.is_train():
            model = Net()
            client = AlignedClient(model, received)
            optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
            with client.training():
                for epoch in range(2):
                    for x, y in node_batches(index, args.sites, round_=2 * int(received.current_round or 0) + epoch):
                        optimiser.zero_grad()
                        out = model(x)
                        F.cross_entropy(out, y).backward()
                        optimiser.step()
                        client.track(out, y)
            reply = client.reply(max_experts=capacity)
            if args.log:
                Path(args.log).mkdir(parents=True, exist_ok=True)
                line = {"experts": client.assigned, "received": sorted(received.params),
                        "dtypes": sorted({str(v.dtype) for v in reply.params.values()})}
                with open(Path(args.log) / f"{site}.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
            flare.send(reply)
        elif flare.is_evaluate():
            flare.send(evaluate_reply(Net(), received, node_batches(index, args.sites)))
        elif flare.get_task_name() == QUERY_TASK:
            flare.send(capacity_model(site, max_experts=capacity))
        else:
            flare.send(FLModel(params={}, metrics={}))


if __name__ == "__main__":
    main()
