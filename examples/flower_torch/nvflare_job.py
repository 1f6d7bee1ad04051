"""The same PyTorch MoE through NVIDIA FLARE: AlignedController on the server, nvflare_client.py on the sites.

    python examples/flower_torch/nvflare_job.py --simulate /tmp/nvflare/torch --sites 4 --rounds 3
"""

import argparse
import sys
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

from alignment_solver.integrations.nvflare import AlignedController

HERE = Path(__file__).resolve().parent


def build(sites: int, rounds: int, *, units: str = "expert", log: str = "") -> FedJob:
    job = FedJob(name="aligned_torch", min_clients=sites)
    job.set_app_packages(["alignment_solver"])
    job.to_server(AlignedController(
        num_experts=8, num_rounds=rounds, units=units, initial_model="flower_torch.task:initial_model",
        central_evaluation="flower_torch.task:central_evaluation", coordinator_config={"tolerance": 0.2, "seed": 0},
        min_clients=sites, train_timeout=600, evaluate_timeout=120))
    job.to_server(str(HERE / "flower_torch"))
    args = f"--sites {sites}" + (f" --log {log}" if log else "")
    job.to_clients(ScriptRunner(script=str(HERE / "nvflare_client.py"), script_args=args,
                                framework=FrameworkType.NUMPY))
    job.to_clients(str(HERE / "flower_torch"))
    return job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", metavar="WORKSPACE", required=True)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--units", choices=["expert", "layer"], default="expert")
    ap.add_argument("--log", default="", help="folder for each site's record of the tasks it received")
    args = ap.parse_args()
    code = build(args.sites, args.rounds, units=args.units, log=args.log).simulator_run(
        args.simulate, n_clients=args.sites, threads=args.sites)
    sys.exit(code)                       # the simulator's status: non-zero when the workflow failed


if __name__ == "__main__":
    main()
