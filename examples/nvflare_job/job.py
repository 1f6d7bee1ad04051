"""Build the aligned digits job and run it in NVFlare's simulator, or export it for a deployment.

    python job.py --simulate /tmp/nvflare/sim --sites 4 --rounds 3
    python job.py --export /tmp/nvflare/jobs --sites 3 --rounds 3
"""

import argparse
import sys
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

from alignment_solver.integrations.nvflare import AlignedController

HERE = Path(__file__).resolve().parent


def build(sites: int, rounds: int, *, experts: int = 4, min_clients: int = 0, capacities: str = "1,2,3",
          train_timeout: int = 600, train_delay: float = 0.0, log: str = "", forge: str = "",
          tolerance: float = 0.2) -> FedJob:
    """The job; NVFlare aborts it when fewer than ``min_clients`` sites stay alive (0: all ``sites``)."""
    job = FedJob(name="aligned_digits", min_clients=min_clients or sites)
    job.set_app_packages(["alignment_solver"])      # installed on every site: not copied into the job
    controller = AlignedController(
        num_experts=experts, num_rounds=rounds, initial_model="digits_task:initial_model",
        central_evaluation="digits_task:central_evaluation", coordinator_config={"tolerance": tolerance, "seed": 0},
        min_clients=sites, train_timeout=train_timeout, evaluate_timeout=min(train_timeout, 120))
    job.to_server(controller)
    job.to_server(str(HERE / "digits_task.py"))
    args = f"--sites {sites} --experts {experts} --capacities {capacities}"
    if train_delay:
        args += f" --train-delay {train_delay}"
    if log:
        args += f" --log {log}"
    if forge:
        args += f" --forge {forge}"
    runner = ScriptRunner(script=str(HERE / "client.py"), script_args=args, framework=FrameworkType.NUMPY)
    job.to_clients(runner)
    job.to_clients(str(HERE / "digits_task.py"))
    return job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--simulate", metavar="WORKSPACE", help="run in the simulator, results under WORKSPACE")
    where.add_argument("--export", metavar="FOLDER", help="write the job folder FOLDER/aligned_digits")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--min-clients", type=int, default=0,
                    help="NVFlare aborts the job when fewer sites stay alive (default: all of them)")
    ap.add_argument("--capacities", default="1,2,3", help="max experts per site, cycled over site-1, site-2, ...")
    ap.add_argument("--train-timeout", type=int, default=600, help="seconds a site has for one training task")
    ap.add_argument("--train-delay", type=float, default=0.0, help="seconds each site sleeps before training")
    ap.add_argument("--log", default="", help="folder where each site records the tasks it received")
    ap.add_argument("--forge", default="", help="site that replies with NaN arrays (robustness tests)")
    args = ap.parse_args()
    job = build(args.sites, args.rounds, experts=args.experts, min_clients=args.min_clients,
                capacities=args.capacities, train_timeout=args.train_timeout,
                train_delay=args.train_delay, log=args.log, forge=args.forge)
    if args.export:
        job.export_job(args.export)
        print(f"job written to {Path(args.export) / job.name}")
    else:
        sys.exit(job.simulator_run(args.simulate, n_clients=args.sites, threads=args.sites))   # non-zero: it failed


if __name__ == "__main__":
    main()
