"""The simulated device clock: how long a client's round takes and whether it meets the deadline.

A client's time is download + training + upload: bytes over its bandwidth, samples processed over
its speed (``World.speed``, ``World.bandwidth``).  A round lasts as long as its slowest planned
client, at most the deadline; a client past the deadline is dropped (its update discarded), and
a client that drops out is waited for until the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ClientTime:
    """Simulated seconds of one client's round."""

    download: float
    train: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.train + self.upload

    @property
    def transfer(self) -> float:
        """Both ways: what the client reports as ``download_seconds``, so the profiler sees its whole round."""
        return self.download + self.upload


def client_time(speed: float, bandwidth: float, *, fetched: int, sent: int, samples: float) -> ClientTime:
    """Seconds to fetch ``fetched`` bytes, process ``samples`` samples and send ``sent`` bytes."""
    return ClientTime(download=fetched / bandwidth, train=samples / speed, upload=sent / bandwidth)


class RoundClock:
    """The length of one round under an optional ``deadline`` (simulated seconds)."""

    def __init__(self, deadline: Optional[float]) -> None:
        self.deadline = deadline
        self.seconds = 0.0

    def dropped(self) -> None:
        """A client dropped out: the server waits until the deadline."""
        self.seconds = max(self.seconds, self.deadline or 0.0)

    def finish(self, t: ClientTime) -> bool:
        """Record a client that ran for ``t``; whether it finished by the deadline."""
        total = t.total
        self.seconds = max(self.seconds, min(total, self.deadline or total))
        return self.deadline is None or total <= self.deadline
