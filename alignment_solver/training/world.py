"""What every strategy of one run shares: the data, the clients' partitions and devices, and the random draws."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .config import SimConfig
from .data import Dataset, load_digits, load_npz, load_shifted_digits, make_synthetic, partition

#: Device profile of the population: samples per second and bytes per second (median device).
BASE_SPEED, BASE_BANDWIDTH = 100.0, 20_000.0


def load_data(cfg: SimConfig, rng: np.random.Generator) -> Dataset:
    """The data set ``cfg.dataset`` names, split into train and test with ``rng``."""
    if cfg.dataset == "digits":
        return load_digits(rng)
    if cfg.dataset == "npz":
        return load_npz(cfg.npz_path, rng)
    if cfg.dataset == "shifted_digits":
        return load_shifted_digits(rng, domains=cfg.shifted_domains, sizes=cfg.domain_sizes)
    return make_synthetic(cfg.synthetic_samples, rng, domains=cfg.synthetic_domains, sizes=cfg.domain_sizes)


class World:
    """Data, partitions, client traits and the random draws shared by every strategy of one run.

    Common random numbers: which clients are available in round r, whether client c drops out in
    round r and the order in which client c visits its data in round r come from streams keyed by
    (seed, r) and (seed, r, c) alone, so every strategy of a seed sees the same draws, whatever
    it planned.
    """

    def __init__(self, cfg: SimConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        self.data = load_data(cfg, rng)
        parts = partition(self.data, cfg.clients, cfg.partition, rng, alpha=cfg.alpha,
                          classes_per_client=cfg.classes_per_client, domains_per_client=cfg.domains_per_client)
        self.train, self.val = [], []
        for p in parts:
            p = rng.permutation(p)
            cut = max(1, int(round(0.8 * len(p))))
            self.train.append(p[:cut])
            self.val.append(p[cut:] if cut < len(p) else p[:1])
        self.capacity = rng.integers(cfg.min_capacity, cfg.max_capacity + 1, cfg.clients)
        rng.uniform(50.0, 200.0, cfg.clients)                     # kept: the draws below stay as they were
        self.expert_memory = rng.integers(1, 3, cfg.experts).astype(float)
        self.memory = self.capacity * 1.5 + rng.uniform(0.0, 1.0, cfg.clients)
        dev = np.random.default_rng([cfg.seed, 1])
        spread = 1.0 if cfg.devices == "strong" else 0.0
        self.speed = BASE_SPEED * np.exp(np.clip(dev.normal(0, spread, cfg.clients), -3, 3))
        self.bandwidth = BASE_BANDWIDTH * np.exp(np.clip(dev.normal(0, spread, cfg.clients), -3, 3))
        self.seed, self.clients = cfg.seed, cfg.clients
        self.participation, self.dropout = cfg.participation, cfg.dropout
        self.domains: Optional[dict[int, list[int]]] = None
        if self.data.domain_train is not None and cfg.partition == "domains":
            self.domains = {}
            for c, p in enumerate(parts):
                counts = np.bincount(self.data.domain_train[p])
                self.domains[c] = [int(d) for d in np.argsort(-counts, kind="stable") if counts[d] > 0]

    def available(self, r: int) -> np.ndarray:
        """The clients that take part in round ``r`` (each with probability ``participation``; at least one)."""
        rng = np.random.default_rng([self.seed, 2, r])
        available = np.flatnonzero(rng.random(self.clients) < self.participation)
        return available if len(available) else np.array([int(rng.integers(self.clients))])

    def drops(self, r: int) -> np.ndarray:
        """(clients,) bool: who drops out of round ``r`` if planned (probability ``dropout``)."""
        return np.random.default_rng([self.seed, 3, r]).random(self.clients) < self.dropout

    def local_rng(self, r: int, c: int) -> np.random.Generator:
        """Client ``c``'s stream for its local training in round ``r`` (its data order)."""
        return np.random.default_rng([self.seed, 4, r, c])
