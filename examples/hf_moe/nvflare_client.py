"""NVFlare site script (Client API) for the same Mixtral: the user's loop plus the aligned lines
(marked ``# aligned``).

``--log DIR`` appends one JSON line per task to ``DIR/<site>.jsonl`` (the task, the assigned
units, the keys that arrived, the array bytes received and sent back, the dtypes sent back): the
site-side record that run.py and the tests read.
"""

import argparse
import json
from pathlib import Path

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from alignment_solver.integrations.nvflare import QUERY_TASK, capacity_model     # aligned
from alignment_solver.integrations.torch import AlignedClient, evaluate_reply    # aligned
from hf_moe.task import build_model, local_train, node_batches, node_validation


def nbytes(params) -> int:
    return int(sum(getattr(v, "nbytes", 0) for v in (params or {}).values()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default="")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per site (the simulator runs all sites "
                    "on this machine: more threads than cores make every site crawl)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    index = int(site.rpartition("-")[2]) - 1                  # site-1 -> partition 0 (language 0)
    capacity = 2 + index % 2

    def log(**line) -> None:
        if args.log:
            Path(args.log).mkdir(parents=True, exist_ok=True)
            with open(Path(args.log) / f"{site}.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        r = int(received.current_round or 0)
        if flare.is_train():
            model = build_model(0)
            batches = node_batches(index, 0, args.sequences, args.batch_size, round_=r + 1)   # Flower's round r + 1
            client = AlignedClient(model, received)                                          # aligned
            with client.training():                                                          # aligned
                local_train(model, batches, epochs=args.epochs, lr=args.lr, on_batch=client.track)   # aligned
            reply = client.reply(max_experts=capacity)                                       # aligned
            log(task="train", round=r, experts=client.assigned, received=sorted(received.params),
                bytes_down=nbytes(received.params), bytes_up=nbytes(reply.params),
                dtypes=sorted({str(v.dtype) for v in reply.params.values()}))
            flare.send(reply)
        elif flare.is_evaluate():
            reply = evaluate_reply(build_model(0), received, node_validation(index, 0))       # aligned
            log(task="evaluate", round=r, received=len(received.params or {}), bytes_down=nbytes(received.params),
                bytes_up=nbytes(reply.params), accuracy=reply.metrics.get("accuracy"))
            flare.send(reply)
        elif flare.get_task_name() == QUERY_TASK:                                            # aligned
            flare.send(capacity_model(site, max_experts=capacity))                           # aligned
        else:
            flare.send(FLModel(params={}, metrics={}))


if __name__ == "__main__":
    main()
