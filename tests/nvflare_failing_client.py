"""Site script for tests/test_nvflare.py: every training task fails on the site.

By default the site runs :func:`alignment_solver.integrations.nvflare.run_client`, which answers
the failed task with ``error_model`` (the exception text reaches the server).  ``--crash`` is a
plain Client API loop instead, whose exception ends the script (NVFlare passes the server only a
return code).
"""

import argparse

from digits_task import site_data

from alignment_solver.integrations.nvflare import QUERY_TASK, capacity_model, run_client

REASON = "MoE layer 'blocks.0.moe' routed 256 samples but the batch has 32"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--crash", action="store_true", help="let the exception end the script")
    args = ap.parse_args()
    if args.crash:
        import nvflare.client as flare

        flare.init()
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            if flare.get_task_name() == QUERY_TASK:
                flare.send(capacity_model(flare.get_site_name()))
                continue
            raise ValueError(REASON)
        return

    def fail(site, model):
        raise ValueError(REASON)

    run_client(lambda site: site_data(site, args.sites), num_experts=args.experts, on_train=fail)


if __name__ == "__main__":
    main()
