"""The coordinator's state file: a schema check for every field, and an exclusive lock.

``check_state(raw)`` checks a decoded state file completely (types, shapes, ranges, indices,
unique client ids, the pending plan) before anything is restored, and raises
:class:`~alignment_solver.errors.StateError` naming the field, the rule and the value received.

``locked(path)`` holds an exclusive advisory lock (``flock`` on ``<path>.lock``) for a
load -> modify -> save cycle; it is re-entrant within a process (per thread), so ``save`` can
take it again inside.  ``write_atomic`` writes through a temporary file in the same folder
(fsync, rename), and under the lock removes temporaries that killed writers left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .errors import StateError, describe
from .paths import regular_target, replace_regular
from .problem import MAX_COUNT, MAX_ROUND

STATE_VERSION = 1
MAX_EXPERTS = 100_000           # experts a coordinator (or a state file) may declare
MAX_CLIENTS = 10_000_000


# ---- schema ----------------------------------------------------------------------------------
def _get(state: Any, where: str) -> Any:
    node = state
    path = ""
    for part in where.split("."):
        if not isinstance(node, dict):
            raise StateError(f"state field {path or 'state'} must be a JSON object; got {describe(node)}")
        path = f"{path}.{part}" if path else part
        if part not in node:
            raise StateError(f"state field {path} is missing")
        node = node[part]
    return node


def _numbers(raw: Any, where: str, shape: tuple[int, ...], *, integer: bool, low: float, high: float,
             nullable: bool = False) -> np.ndarray:
    """``raw`` as an array of ``shape`` with every (non-null) entry in ``[low, high]``."""
    if not isinstance(raw, list):
        raise StateError(f"state field {where} must be a list; got {describe(raw)}")
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError):
        raise StateError(f"state field {where} must be a rectangular {shape} array; got a ragged list") from None
    if arr.size == 0 and 0 in shape:
        return np.zeros(shape, dtype=np.int64 if integer else float)
    if arr.dtype.kind in "iub" or arr.dtype == object:
        rows = raw if len(shape) == 2 and arr.ndim == 2 else [raw]
        if any(bool in set(map(type, row)) for row in rows):         # JSON true/false would pass as 1/0
            raise StateError(f"state field {where} must hold {'integers' if integer else 'numbers'}, "
                             f"not booleans; got {next(v for row in rows for v in row if isinstance(v, bool))}")
        flat = [v for row in rows for v in row] if arr.dtype == object else []
        if arr.dtype == object and integer and all(isinstance(v, int) for v in flat):
            arr = np.array([v if abs(v) < 2 ** 62 else (2 ** 62 if v > 0 else -2 ** 62) for v in flat],
                           dtype=np.int64).reshape(arr.shape)
            if arr.shape == shape and (np.abs(arr) == 2 ** 62).any():
                idx = tuple(int(i) for i in np.argwhere(np.abs(arr) == 2 ** 62)[0])
                raise StateError(f"state field {where}{list(idx)} must lie in [{low:g}, {high:g}]; "
                                 f"got {describe(np.asarray(raw, dtype=object)[idx])}")
    null = np.zeros(arr.shape, dtype=bool)
    if arr.dtype == object and nullable and not integer:
        null = np.vectorize(lambda v: v is None, otypes=[bool])(arr) if arr.size else null
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arr[~null].ravel()):
            arr = np.where(null, np.nan, arr).astype(float)
    if arr.shape != shape:
        raise StateError(f"state field {where} must be a {shape} array; got shape {arr.shape}")
    kinds = "iu" if integer else "iuf"
    if arr.dtype.kind not in kinds:
        what = "integers" if integer else "numbers" + (" or null" if nullable else "")
        bad = next((v for v in arr.ravel().tolist() if not isinstance(v, (int, float))
                    or (integer and not isinstance(v, int))), arr.ravel()[0])
        raise StateError(f"state field {where} must hold {what}; got {describe(bad)}")
    values = arr.astype(float)
    wrong = ~null & ~((values >= low) & (values <= high))
    if wrong.any():
        idx = tuple(int(i) for i in np.argwhere(wrong)[0])
        raise StateError(f"state field {where}{list(idx)} must lie in [{low:g}, {high:g}]; "
                         f"got {describe(arr[idx].item())}")
    return arr.astype(np.int64) if integer else values


def _integer(raw: Any, where: str, low: int, high: float) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise StateError(f"state field {where} must be an integer in [{low}, {high:g}]; got {describe(raw)}")
    return raw


def check_state(state: Any, *, window: int) -> dict[str, Any]:
    """Check every field of a decoded state; returns the arrays restored from it.

    ``window`` is the profiler's observation window from the (already validated) config.
    """
    if not isinstance(state, dict):
        raise StateError(f"state must be a JSON object; got {describe(state)}")
    generation = state.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation < MAX_ROUND:
        raise StateError(f"state field generation must be an integer in [0, 2**53); got {describe(generation)}")
    version = _get(state, "version")
    if version != STATE_VERSION:
        raise StateError(f"state field version must be {STATE_VERSION}; got {describe(version)}")
    E = _integer(_get(state, "num_experts"), "num_experts", 1, MAX_EXPERTS)
    ids = _get(state, "client_ids")
    if not isinstance(ids, list) or len(ids) > MAX_CLIENTS:
        raise StateError(f"state field client_ids must be a list of at most {MAX_CLIENTS:g} labels; "
                         f"got {describe(ids)}")
    for i, cid in enumerate(ids):
        if isinstance(cid, bool) or not isinstance(cid, (int, str)):
            raise StateError(f"state field client_ids[{i}] must be an integer or a string; got {describe(cid)}")
    if len(set(map(str, ids))) != len(ids):
        seen: set[str] = set()
        dup = next(c for c in ids if str(c) in seen or seen.add(str(c)))
        raise StateError(f"state field client_ids must be unique (also as JSON keys); {dup!r} appears twice")
    n = len(ids)
    out: dict[str, Any] = {"E": E, "client_ids": ids, "generation": generation}

    held = _get(state, "held")
    if not isinstance(held, list) or len(held) != 2:
        raise StateError(f"state field held must be [rows, experts]; got {describe(held)}")
    count = len(held[0]) if isinstance(held[0], list) else -1
    out["held_rows"] = _numbers(held[0], "held[0] (rows)", (count,), integer=True, low=0, high=n - 1)
    out["held_experts"] = _numbers(held[1], "held[1] (experts)", (count,), integer=True, low=0, high=E - 1)

    out["Q"] = _numbers(_get(state, "scorer.Q"), "scorer.Q", (n, E), integer=False, low=-MAX_COUNT, high=MAX_COUNT)
    out["N"] = _numbers(_get(state, "scorer.N"), "scorer.N", (n, E), integer=True, low=0, high=MAX_ROUND)

    mon: dict[str, Any] = {}
    for name in ("round_clients", "round_samples", "total_clients", "total_samples", "deficit"):
        mon[name] = _numbers(_get(state, f"monitor.{name}"), f"monitor.{name}", (E,), integer=False,
                             low=0, high=1e18)
    last_round = _integer(_get(state, "monitor.last_round"), "monitor.last_round", -1, MAX_ROUND - 1)
    mon["last_round"] = last_round
    mon["last_trained"] = _numbers(_get(state, "monitor.last_trained"), "monitor.last_trained", (E,),
                                   integer=True, low=-1, high=last_round)
    history = _get(state, "monitor.history")
    rows = len(history) if isinstance(history, list) else -1
    mon["history"] = _numbers(history, "monitor.history", (rows, E), integer=False, low=0, high=MAX_COUNT).tolist()
    out["monitor"] = mon

    prof: dict[str, Any] = {}
    for name in ("train", "download", "memory"):
        prof[name] = _numbers(_get(state, f"profiler.{name}"), f"profiler.{name}", (n, window), integer=False,
                              low=0, high=1e15, nullable=True)
    for name in ("slot", "mem_slot", "streak", "planned", "finished"):       # counters: they only grow
        prof[name] = _numbers(_get(state, f"profiler.{name}"), f"profiler.{name}", (n,), integer=True,
                              low=0, high=MAX_ROUND)
    prof["limit"] = _numbers(_get(state, "profiler.limit"), "profiler.limit", (n,), integer=True, low=0, high=MAX_COUNT)
    prof["declared"] = _numbers(_get(state, "profiler.declared"), "profiler.declared", (n,), integer=True,
                                low=-1, high=MAX_COUNT)
    for name in ("throughput", "bandwidth", "samples"):
        prof[name] = _numbers(_get(state, f"profiler.{name}"), f"profiler.{name}", (n,), integer=False,
                              low=0, high=1e15, nullable=True)
    out["profiler"] = prof

    pending = _get(state, "pending")
    if pending is not None:
        if not isinstance(pending, dict) or not {"round", "deadline", "experts"} <= set(pending) \
                or not set(pending) <= {"round", "deadline", "experts", "probes"}:
            raise StateError("state field pending must be null or an object with keys round, deadline, experts "
                             f"(and optionally probes); got {describe(pending)}")
        _integer(pending["round"], "pending.round", last_round + 1, MAX_ROUND - 1)
        deadline = pending["deadline"]
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                     or not 0 < deadline < 1e15):
            raise StateError(f"state field pending.deadline must be null or seconds > 0; got {describe(deadline)}")
        for field in ("experts", "probes"):
            _check_rows(pending.get(field, {}), f"pending.{field}", n, E)
    out["pending"] = pending
    return out


def _check_rows(table: Any, field: str, n: int, E: int) -> None:
    """``table`` maps client rows ("0".."n-1") to lists of distinct experts 0..E-1."""
    if not isinstance(table, dict):
        raise StateError(f"state field {field} must be an object; got {describe(table)}")
    for key, planned in table.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < n and str(int(key)) == key):
            raise StateError(f"state field {field} has key {key!r}; keys are client rows 0..{n - 1}")
        arr = _numbers(planned, f"{field}[{key!r}]", (len(planned) if isinstance(planned, list) else -1,),
                       integer=True, low=0, high=E - 1)
        if len(set(arr.tolist())) != len(arr):
            raise StateError(f"state field {field}[{key!r}] lists an expert twice: {planned}")


# ---- lock and atomic write -------------------------------------------------------------------
NO_WAIT_LIMIT = 1e7              # seconds (about 116 days): a longer lock timeout means no limit
_guard = threading.Lock()
_locks: dict[str, list] = {}       # real path -> [RLock, fd, depth]


def _lock_path(path: Path) -> str:
    """The lock file of the state file ``path`` after symlinks: one lock for a link and its target."""
    return os.path.realpath(path) + ".lock"


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, timeout: Optional[float] = 60.0) -> Iterator[None]:
    """Hold the exclusive lock of the state file ``path`` (wait up to ``timeout`` seconds).

    Raises StateError when another process still holds it after ``timeout`` (None, inf or
    ``NO_WAIT_LIMIT`` seconds and more: wait forever).
    """
    if timeout is not None and not timeout < NO_WAIT_LIMIT:
        timeout = None
    regular_target(path, "state file", StateError)
    key = _lock_path(Path(path))
    with _guard:
        entry = _locks.setdefault(key, [threading.RLock(), None, 0])
    rlock: threading.RLock = entry[0]
    if not rlock.acquire(timeout=-1 if timeout is None else timeout):
        raise StateError(f"state file {path} is locked by another thread (waited {timeout:g} s)")
    try:
        if entry[2] == 0:
            try:
                fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StateError(f"state file {path}: cannot open its lock file {key}: {exc.strerror}") from None
            start = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if timeout is not None and time.monotonic() - start >= timeout:
                        os.close(fd)
                        raise StateError(f"state file {path} is locked by another process "
                                         f"(waited {timeout:g} s; lock file {key})") from None
                    time.sleep(0.01)
            entry[1] = fd
        entry[2] += 1
        try:
            yield
        finally:
            entry[2] -= 1
            if entry[2] == 0:
                fcntl.flock(entry[1], fcntl.LOCK_UN)
                os.close(entry[1])
                entry[1] = None
    finally:
        rlock.release()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees the old or the new file, never a part.

    Runs under :func:`locked`; temporaries of writers of this very file killed mid-save are
    removed first.  Regular files only (:func:`~alignment_solver.paths.regular_target`): a
    symbolic link stays a link and its target is written; a directory, FIFO, device or socket is
    refused.  Raises StateError naming the file when it cannot be written (it is unchanged then).
    """
    target = regular_target(path, "state file", StateError)
    with locked(path):
        own = re.compile(rf"{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")      # mkstemp's names for this file only
        try:
            for stale in target.parent.glob(f"{glob.escape(target.name)}.*.tmp"):
                if own.fullmatch(stale.name):
                    stale.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot write state file {path}: cannot remove a stale temporary in {target.parent}: "
                             f"{exc.strerror}") from None
        replace_regular(path, text, "state file", StateError, fsync=True)


_GENERATION = re.compile(rb'\s*\{\s*"generation"\s*:\s*(\d{1,16})\s*[,}]')


def generation_on_disk(path: str | os.PathLike) -> Optional[int]:
    """The ``generation`` a state file starts with (0 for files written before it existed), or
    None when there is no file.  Reads only its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(128)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"state file {path} cannot be read: {exc.strerror}") from None
    m = _GENERATION.match(head)
    return int(m.group(1)) if m else 0
