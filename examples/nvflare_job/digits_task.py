"""Data and model hooks of the example job: scikit-learn's bundled digits over the sites.

Site ``site-k`` of ``sites`` gets the k-th part of a Dirichlet(0.5) label split (every process
computes the same split from the seed); 80 % of it trains, 20 % validates.  The server calls
``initial_model`` and ``central_evaluation`` (named in the job as ``digits_task:<function>``).
"""

from functools import lru_cache

import numpy as np

from alignment_solver.training.data import load_digits, site_split
from alignment_solver.training.model import MoE, init_params

SEED = 0


@lru_cache(maxsize=1)
def _digits(seed: int = SEED):
    return load_digits(np.random.default_rng(seed))


def site_index(site: str) -> int:
    """``site-3`` -> 2; ValueError for any other name."""
    prefix, _, number = site.rpartition("-")
    if prefix != "site" or not number.isdigit() or int(number) < 1:
        raise ValueError(f"site names must be 'site-<k>' with k >= 1; got {site!r}")
    return int(number) - 1


def site_data(site: str, sites: int, seed: int = SEED):
    """(x_train, y_train, x_val, y_val) of one site."""
    k = site_index(site)
    if k >= sites:
        raise ValueError(f"site {site!r} is outside the {sites} sites of the split")
    return site_split(_digits(seed), k, sites, seed)


def initial_model(num_experts: int) -> dict:
    data = _digits()
    return init_params(data.dim, data.classes, num_experts, 0, np.random.default_rng(SEED))


def central_evaluation(arrays: dict) -> dict:
    """Accuracy of the global model on the digits test split (held out from every site)."""
    data = _digits()
    experts = len({k.split(".")[0] for k in arrays if k.startswith("expert")})
    return {"accuracy": float((MoE(experts).predict(arrays, data.x_test) == data.y_test).mean())}
