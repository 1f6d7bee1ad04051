"""Site script (NVFlare Client API): trains the experts the server assigned, evaluates the model.

``--forge SITE`` makes that site answer every training task with NaN arrays (robustness tests:
the server must reject the reply and go on).  ``--log DIR`` appends one JSON line per received
training task to ``DIR/<site>.jsonl`` (round, assigned experts, experts whose arrays arrived,
process id): the site-side record the tests read.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from digits_task import site_data, site_index
from nvflare.app_common.abstract.fl_model import FLModel

from alignment_solver.integrations.local import received_experts
from alignment_solver.integrations.nvflare import run_client


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, required=True, help="number of sites the data is split over")
    ap.add_argument("--experts", type=int, required=True, help="number of experts of the model")
    ap.add_argument("--capacities", default="1,2,3", help="max experts per site, cycled over site-1, site-2, ...")
    ap.add_argument("--train-delay", type=float, default=0.0, help="seconds to sleep before training (tests)")
    ap.add_argument("--log", default="", help="folder for the per-site record of received tasks")
    ap.add_argument("--forge", default="", help="site that replies with NaN arrays (robustness tests)")
    args = ap.parse_args()
    caps = [int(c) for c in args.capacities.split(",")]

    def on_train(site, model):
        if args.log:
            Path(args.log).mkdir(parents=True, exist_ok=True)
            line = {"round": model.current_round, "experts": model.meta.get("experts"),
                    "received": received_experts(model.params), "pid": os.getpid()}
            with open(Path(args.log) / f"{site}.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
        if args.train_delay:
            time.sleep(args.train_delay)

    def data(site):
        return site_data(site, args.sites)

    def capacity(site):
        return caps[site_index(site) % len(caps)]

    def forged(site, reply):
        if site != args.forge:
            return reply
        return FLModel(params={k: np.full_like(v, np.nan) for k, v in reply.params.items()}, metrics=reply.metrics)

    run_client(data, num_experts=args.experts, max_experts=capacity, on_train=on_train, on_reply=forged)


if __name__ == "__main__":
    main()
