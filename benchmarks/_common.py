"""Helpers shared by the benchmark scripts: isolated runs with peak memory, tables."""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
from typing import Any, Callable, Optional

from alignment_solver.progress import Progress  # noqa: F401  (re-exported for the scripts)


def _target(conn: Any, fn: Callable[..., dict], args: tuple) -> None:
    try:
        out = fn(*args)
    except Exception as exc:  # reported in the table, not hidden
        out = {"error": f"{type(exc).__name__}: {exc}"}
    for proc in mp.active_children():   # the deadline runner kills its worker without waiting: reap it,
        proc.join(timeout=60)           # so its peak memory counts in RUSAGE_CHILDREN
    out["peak_mb"] = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)) / 1024
    conn.send(out)


def isolated(fn: Callable[..., dict], *args: Any, timeout: Optional[float] = None) -> dict:
    """Run ``fn(*args)`` in a fresh process; adds its peak resident memory (``peak_mb``)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_target, args=(child, fn, args))
    proc.start()
    child.close()
    out = parent.recv() if parent.poll(timeout) else {"error": f"killed after {timeout:g} s"}
    proc.kill()
    proc.join()
    return out


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-3:
                return f"{v:.1e}"
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import ortools

    return (f"{platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}, "
            f"OR-Tools {ortools.__version__}")


def publish(text: str, out: str) -> None:
    """Print a results page and write it to ``out``."""
    from pathlib import Path

    print(text)
    Path(out).write_text(text)
