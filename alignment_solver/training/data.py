"""Datasets and client partitions for the training loop.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 samples, ships in the wheel).
- ``shifted_digits``: the same digits under concept shift: each sample belongs to one of up to six
  domains, and each domain has its own input transform (identity, mirror, inverted ink,
  transpose, upside down, rotated 180 degrees) and its own label permutation (domain 0 keeps the
  labels).  One linear model cannot fit every domain at once; one per domain can.
- ``synthetic``: clients draw from a few hidden domains, each with its own linear decision rule
  over its own region of input space, so expert specialisation is real and its truth known.

Both domain datasets set ``Dataset.domain_train`` (each training sample's domain); their domains
are equal in size or, with ``sizes="unequal"``, shared in proportion to 1, 1/2, 1/3, ...
- ``npz``: a user's own file with arrays ``x`` (N, D) and ``y`` (N,) integer labels.

Partitions of the training set over clients: ``iid``, ``dirichlet`` (per-class proportions
drawn from Dirichlet(alpha)) and ``classes`` (each client holds ``k`` classes).  The synthetic
data instead gives each client one or two domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    domain_train: Optional[np.ndarray] = None   # synthetic only: hidden domain of each sample
    name: str = ""

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])


def _split(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, test: float, name: str,
           domain: Optional[np.ndarray] = None) -> Dataset:
    order = rng.permutation(len(y))
    cut = int(round(len(y) * (1 - test)))
    tr, te = order[:cut], order[cut:]
    mean, std = x[tr].mean(axis=0), x[tr].std(axis=0) + 1e-8
    xs = (x - mean) / std
    return Dataset(xs[tr], y[tr], xs[te], y[te], int(y.max()) + 1,
                   None if domain is None else domain[tr], name)


def load_digits(rng: np.random.Generator, test: float = 0.25) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _split(d.data.astype(float), d.target.astype(np.int64), rng, test, "digits")


def load_npz(path: str | Path, rng: np.random.Generator, test: float = 0.25) -> Dataset:
    """A user's ``.npz`` with ``x`` (N, D) and ``y`` (N,); errors name what is missing or wrong."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"dataset file {path} cannot be read as .npz: {exc}") from None
    missing = [k for k in ("x", "y") if k not in data.files]
    if missing:
        raise ValueError(f"dataset file {path} must hold arrays 'x' and 'y'; missing {missing} (has {data.files})")
    x, y = np.asarray(data["x"], dtype=float), np.asarray(data["y"])
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"dataset file {path}: x must be (N, D) and y (N,) with the same N; got x {x.shape}, y {y.shape}")
    if len(y) < 10:
        raise ValueError(f"dataset file {path} has {len(y)} samples; need at least 10")
    if y.dtype.kind not in "iu" and not np.all(y == np.round(y)):
        raise ValueError(f"dataset file {path}: y must hold integer labels")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"dataset file {path}: x must be finite")
    _, y = np.unique(y, return_inverse=True)
    return _split(x, y.astype(np.int64), rng, test, Path(path).stem)


DOMAIN_TRANSFORMS = ("identity", "mirror", "invert", "transpose", "upside_down", "rotate180")


def domain_shares(domains: int, sizes: str = "equal") -> np.ndarray:
    """Share of the samples in each domain: equal, or proportional to 1, 1/2, 1/3, ..."""
    if sizes not in ("equal", "unequal"):
        raise ValueError(f"sizes must be 'equal' or 'unequal'; got {sizes!r}")
    w = np.ones(domains) if sizes == "equal" else 1.0 / np.arange(1, domains + 1)
    return w / w.sum()


def _transform(images: np.ndarray, how: str) -> np.ndarray:
    return {"identity": lambda a: a, "mirror": lambda a: a[:, :, ::-1], "invert": lambda a: 1.0 - a,
            "transpose": lambda a: np.transpose(a, (0, 2, 1)), "upside_down": lambda a: a[:, ::-1, :],
            "rotate180": lambda a: a[:, ::-1, ::-1]}[how](images)


def load_shifted_digits(rng: np.random.Generator, *, domains: int = 4, sizes: str = "equal",
                        test: float = 0.25) -> Dataset:
    """Digits under concept shift: per domain an input transform and a label permutation."""
    from sklearn.datasets import load_digits as sk_digits

    if not 1 <= domains <= len(DOMAIN_TRANSFORMS):
        raise ValueError(f"shifted_digits has 1..{len(DOMAIN_TRANSFORMS)} domains; got {domains}")
    d = sk_digits()
    images = d.images / 16.0
    domain = rng.choice(domains, size=len(images), p=domain_shares(domains, sizes))
    perms = np.stack([np.arange(10)] + [rng.permutation(10) for _ in range(domains - 1)])
    x = np.empty((len(images), 64))
    for k in range(domains):
        rows = domain == k
        x[rows] = _transform(images[rows], DOMAIN_TRANSFORMS[k]).reshape(-1, 64)
    y = perms[domain, d.target]
    return _split(x, y.astype(np.int64), rng, test, "shifted_digits", domain)


def make_synthetic(samples: int, rng: np.random.Generator, *, domains: int = 4, dim: int = 20, classes: int = 5,
                   test: float = 0.2, sizes: str = "equal") -> Dataset:
    """Samples from ``domains`` hidden domains, each a Gaussian blob with its own linear labeller."""
    centres = rng.normal(0, 3.0, (domains, dim))
    rules = rng.normal(0, 1.0, (domains, dim, classes))
    domain = rng.choice(domains, size=samples, p=domain_shares(domains, sizes)) if sizes != "equal" \
        else rng.integers(0, domains, samples)
    x = centres[domain] + rng.normal(0, 1.0, (samples, dim))
    y = np.einsum("nd,ndc->nc", x - centres[domain], rules[domain]).argmax(axis=1)
    return _split(x, y.astype(np.int64), rng, test, "synthetic", domain)


def partition(data: Dataset, clients: int, how: str, rng: np.random.Generator, *, alpha: float = 0.3,
              classes_per_client: int = 2, domains_per_client: int = 2) -> list[np.ndarray]:
    """Indices of the training samples held by each client (every client gets at least 2).

    ``domains``: each client owns 1..``domains_per_client`` domains (1: exactly one) and shares
    each domain's samples evenly with the other clients that own it.
    """
    y = data.y_train
    n = len(y)
    if how == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif how == "dirichlet":
        parts_l: list[list[int]] = [[] for _ in range(clients)]
        for c in range(data.classes):
            idx = rng.permutation(np.flatnonzero(y == c))
            share = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(share) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts_l[k].extend(chunk.tolist())
        parts = [np.array(p, dtype=np.int64) for p in parts_l]
    elif how == "classes":
        k = min(classes_per_client, data.classes)
        owned = [rng.choice(data.classes, size=k, replace=False) for _ in range(clients)]
        parts = _deal(y, data.classes, owned, rng)
    elif how == "domains":
        if data.domain_train is None:
            raise ValueError("partition 'domains' needs a dataset with domains (synthetic or shifted_digits)")
        D = int(data.domain_train.max()) + 1
        most = min(domains_per_client, D)
        owned = [rng.choice(D, size=int(rng.integers(1, most + 1)), replace=False) for _ in range(clients)]
        parts = _deal(data.domain_train, D, owned, rng)
    else:
        raise ValueError(f"partition must be one of ['iid', 'dirichlet', 'classes', 'domains']; got {how!r}")
    out = []
    for p in parts:
        if len(p) < 2:                          # top up tiny shards so every client can train
            p = np.concatenate([p, rng.choice(n, size=2 - len(p), replace=False)])
        out.append(np.sort(p))
    return out


def site_split(data: Dataset, index: int, sites: int, seed: int, *, alpha: float = 0.5,
               train: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_val, y_val)`` of site ``index`` of ``sites`` in a federated example.

    The training set is split Dirichlet(``alpha``) by label (seeded by ``seed + 1``, so every
    process computes the same split); the site's share is shuffled (``seed + 2 + index``) and cut
    ``train`` / rest (at least one sample each).
    """
    parts = partition(data, sites, "dirichlet", np.random.default_rng(seed + 1), alpha=alpha)
    idx = np.random.default_rng(seed + 2 + index).permutation(parts[index])
    cut = max(1, int(train * len(idx)))
    tr, va = idx[:cut], idx[cut:] if cut < len(idx) else idx[:1]
    return data.x_train[tr], data.y_train[tr], data.x_train[va], data.y_train[va]


def _deal(group: np.ndarray, groups: int, owned: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Split each group's samples evenly among the clients that own that group."""
    parts: list[list[int]] = [[] for _ in owned]
    for g in range(groups):
        who = [i for i, o in enumerate(owned) if g in o]
        if not who:
            continue
        for i, chunk in zip(who, np.array_split(rng.permutation(np.flatnonzero(group == g)), len(who))):
            parts[i].extend(chunk.tolist())
    return [np.array(p, dtype=np.int64) for p in parts]
