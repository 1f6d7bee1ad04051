"""A dependency-free progress bar for long-running commands (written to stderr)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``[#####.....] 5/10 label  12s``; ``step(label)`` before each unit of work, ``close()`` at the end.

    On a terminal the bar redraws in place; otherwise (a log file, CI) it prints one line per
    ``every`` seconds and at the end, so logs stay readable.
    """

    def __init__(self, total: int, width: int = 30, stream=None, every: float = 5.0) -> None:
        self.total, self.done, self.width, self.start = total, 0, width, time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.last = every, -float("inf")

    def step(self, label: str) -> None:
        now = time.perf_counter()
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        if self.tty:
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:50]:50s} {now - self.start:6.0f}s")
        elif now - self.last >= self.every or self.done >= self.total:
            self.stream.write(f"[{bar}] {self.done}/{self.total} {label[:50]} ({now - self.start:.0f} s)\n")
            self.last = now
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        self.step("done")
        if self.tty:
            self.stream.write("\n")
