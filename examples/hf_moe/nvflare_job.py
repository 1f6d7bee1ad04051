"""The same Mixtral through NVIDIA FLARE: AlignedController on the server, nvflare_client.py on the sites.

    python examples/hf_moe/nvflare_job.py --simulate runs/hf_moe/nvflare --sites 4 --rounds 3
"""

import argparse
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

from alignment_solver.integrations.nvflare import AlignedController             # aligned

HERE = Path(__file__).resolve().parent


def build(sites: int, rounds: int, *, epochs: int = 1, lr: float = 0.01, sequences: int = 128, log: str = "",
          evaluate_timeout: int = 300) -> FedJob:
    job = FedJob(name="aligned_hf_moe", min_clients=sites)
    job.set_app_packages(["alignment_solver"])
    job.to_server(AlignedController(                                             # aligned
        num_experts=8, num_rounds=rounds, initial_model="hf_moe.task:initial_model",
        central_evaluation="hf_moe.task:central_evaluation", coordinator_config={"tolerance": 0.2, "seed": 0},
        min_clients=sites, train_timeout=600, evaluate_timeout=evaluate_timeout))
    job.to_server(str(HERE / "hf_moe"))
    args = f"--epochs {epochs} --lr {lr} --sequences {sequences}" + (f" --log {log}" if log else "")
    job.to_clients(ScriptRunner(script=str(HERE / "nvflare_client.py"), script_args=args,
                                framework=FrameworkType.NUMPY))
    job.to_clients(str(HERE / "hf_moe"))
    return job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", metavar="WORKSPACE", required=True)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--log", default="", help="folder for each site's record of the tasks it received")
    args = ap.parse_args()
    log = str(Path(args.log).resolve()) if args.log else ""
    build(args.sites, args.rounds, epochs=args.epochs, lr=args.lr, sequences=args.sequences,
          log=log).simulator_run(str(Path(args.simulate).resolve()), n_clients=args.sites, threads=args.sites)


if __name__ == "__main__":
    main()
