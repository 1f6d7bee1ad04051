"""Data for the example: scikit-learn's bundled digits, split over the nodes (Dirichlet 0.5)."""

from functools import lru_cache

import numpy as np

from alignment_solver.training.data import load_digits, site_split


@lru_cache(maxsize=1)
def _digits(seed: int):
    rng = np.random.default_rng(seed)
    return load_digits(rng), rng


@lru_cache(maxsize=64)
def node_data(partition_id: int, num_partitions: int, seed: int = 0):
    """(x_train, y_train, x_val, y_val) of one node; every node computes the same split."""
    data, _ = _digits(seed)
    return site_split(data, partition_id, num_partitions, seed)


def test_data(seed: int = 0):
    data, _ = _digits(seed)
    return data.x_test, data.y_test, data.dim, data.classes


DEFAULTS = {"num-server-rounds": 3, "num-experts": 4, "tolerance": 0.2, "round-timeout": 60.0, "min-nodes": 2,
            "train-delay": 0.0, "state-path": "", "history-path": "", "seed": 0, "garbage-partition": -1}


def settings(context) -> dict:
    """Run config over the defaults (``run_simulation`` passes an empty run config).

    ``FLOWER_APP_HISTORY`` / ``FLOWER_APP_ROUNDS`` / ``FLOWER_APP_ROUND_TIMEOUT`` /
    ``FLOWER_APP_GARBAGE_PARTITION`` in the environment fill in the history path, the number of
    rounds, the round timeout and the partition whose client sends forged replies (robustness
    tests; -1: none) when the run config does not set them.
    """
    import os

    out = {**DEFAULTS, **dict(context.run_config)}
    if not out["history-path"]:
        out["history-path"] = os.environ.get("FLOWER_APP_HISTORY", "")
    if "num-server-rounds" not in context.run_config and os.environ.get("FLOWER_APP_ROUNDS"):
        out["num-server-rounds"] = int(os.environ["FLOWER_APP_ROUNDS"])
    if "round-timeout" not in context.run_config and os.environ.get("FLOWER_APP_ROUND_TIMEOUT"):
        out["round-timeout"] = float(os.environ["FLOWER_APP_ROUND_TIMEOUT"])
    if "garbage-partition" not in context.run_config and os.environ.get("FLOWER_APP_GARBAGE_PARTITION"):
        out["garbage-partition"] = int(os.environ["FLOWER_APP_GARBAGE_PARTITION"])
    return out
