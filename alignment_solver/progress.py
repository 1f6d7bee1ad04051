"""A dependency-free progress bar for long-running commands (written to stderr)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``[#####.....] 5/10 label  12s``; ``step(label)`` before each unit of work, ``close()`` at the end."""

    def __init__(self, total: int, width: int = 30, stream=None) -> None:
        self.total, self.done, self.width, self.start = total, 0, width, time.perf_counter()
        self.stream = stream or sys.stderr

    def step(self, label: str) -> None:
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:50]:50s} {time.perf_counter() - self.start:6.0f}s")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        self.step("done")
        self.stream.write("\n")
