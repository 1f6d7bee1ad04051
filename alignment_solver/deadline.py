"""Hard wall-clock limits: a backend runs in a worker process that is killed when time is up.

Contract of :func:`run` (used by :func:`~alignment_solver.solve` whenever ``time_limit`` is set,
and always for backends that start processes of their own):

- it stops waiting for the worker ``GRACE`` seconds after ``time_limit`` (counted from the
  start of ``solve``, model building included), whatever the backend does; with the greedy
  fallback and the hand-over it returns within ``time_limit`` + 0.5 s, also on a loaded machine
  and beside a busy thread in the caller (``benchmarks/time_limits.py``);
- the answer is the backend's own if it arrived in time with a plan (or a proof of
  infeasibility); otherwise the best plan seen so far: an incumbent the backend reported
  (``SolveRequest.report``) or the greedy plan a sibling process of the worker computes
  meanwhile (bounded by the limit); its status is at most FEASIBLE, ``bound`` is the best valid
  bound the backend reported (or None), and ``stats["deterministic"]`` is False;
- the worker leads its own process group (the greedy fallback and solver subprocesses such as
  CBC included); the whole group is killed at the limit, on an exception or interrupt in the
  caller, and when the caller itself is killed.  Backends that start solver processes
  (``child_processes``) get a private temporary directory, removed in every one of those cases;
  one a killed process could not remove (``alignment-solver-<pid>-*`` of a dead pid) is reaped
  by the next run.

No worker ever imports the caller's ``__main__`` (multiprocessing's spawn and fork server do,
re-running an unguarded user script).  How the worker starts (``isolation()``, recorded in
``stats["isolation"]``):

- ``"fork"``: ``os.fork`` of the caller, the fastest, used while that is safe: no other Python
  thread runs and gRPC and Ray are not loaded (a ``multiprocessing.Pool`` worker included);
- ``"helper"``: otherwise (threads alive: tqdm, a Flower or NVFlare server): one long-lived
  helper per caller process, a fresh interpreter
  started through the package's own entry point (``python -c "from alignment_solver.deadline
  import ..."``) that preloads the solvers and forks a single-threaded worker per solve.  The
  task travels in an in-memory file handed over a Unix socket with the result pipes, so nothing
  waits on the caller's Python once it is sent; the helper kills the worker's group at the limit
  and removes its temporary directory, and when the caller dies (its end of the socket closes)
  it kills every worker and exits.  Starting it costs about a second once per caller
  (:func:`warm_up` starts it ahead, off any limit); a solve sent before it is ready computes the
  greedy fallback in the caller.

Only where neither is possible (no ``fork``: Windows) does the backend run in-process with a
cooperative deadline, ``stats["isolation"] = "in-process"``.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import multiprocessing as mp
import os
import pickle
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

import numpy as np

from .backends.base import Backend, SolveRequest
from .problem import AlignmentProblem
from .result import AlignmentResult, SolveStatus

GRACE = 0.3          # seconds past the limit spent collecting the answer and stopping the worker
#: a time limit of this many seconds (about 116 days) or more, infinity included, means no limit
NO_LIMIT = 1e7
_LONGEST_WAIT = 3600.0  # seconds of one wait for the worker
MARGIN = 0.15        # the worker is asked to finish this long before the limit
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: modules whose background threads make a plain fork unsafe (a lock held by one of them at fork
#: time stays locked in the child forever)
_FORK_UNSAFE = ("grpc", "ray")
#: modules the helper imports once, so each worker it forks starts with them loaded
_PRELOAD = ["alignment_solver.backends.flow", "alignment_solver.backends.cpsat", "alignment_solver.backends.greedy",
            "ortools.sat.python.cp_model"]
_TMP_PREFIX = "alignment-solver-"
_children: list[int] = []          # forked workers killed by this process, reaped at the next run and at exit


def effective_limit(time_limit: Optional[float]) -> Optional[float]:
    """``time_limit`` as used: None for None and for limits too large to matter (>= ``NO_LIMIT``
    seconds, infinity included), else the limit as a float.  The caller has checked it is > 0."""
    if time_limit is None or not time_limit < NO_LIMIT:
        return None
    return float(time_limit)


def available() -> bool:
    """Whether workers can be forked from the caller safely here: ``fork`` exists, no other Python
    thread runs and no module known to keep background threads (gRPC, Ray) is loaded (a daemonic
    ``multiprocessing.Pool`` worker may fork too: ``os.fork``, not ``multiprocessing``)."""
    return ("fork" in mp.get_all_start_methods() and threading.active_count() == 1
            and not any(m in sys.modules for m in _FORK_UNSAFE))


def isolation() -> str:
    """How a worker starts here: ``"fork"``, ``"helper"`` or ``"in-process"`` (module docstring)."""
    if "fork" not in mp.get_all_start_methods() or not hasattr(socket, "send_fds") or not hasattr(os, "memfd_create"):
        return "in-process"
    return "fork" if available() else "helper"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap() -> None:
    """Collect the exit status of killed forked workers, and remove the temporary directories of
    processes that died before they could (``alignment-solver-<pid>-*`` of a pid no longer alive)."""
    for pid in list(_children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _children.remove(pid)
    _reap_stale_dirs()


def _reap_stale_dirs() -> None:
    folder = tempfile.gettempdir()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(rf"{_TMP_PREFIX}(\d+)-\w+", name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


@atexit.register
def _reap_all() -> None:
    until = time.monotonic() + 1.0
    while _children and time.monotonic() < until:
        _reap()
        time.sleep(0.01)


def _pack(x: np.ndarray) -> tuple[tuple[int, int], bytes]:
    return x.shape, np.packbits(x, axis=None).tobytes()


def _unpack(packed: tuple[tuple[int, int], bytes]) -> np.ndarray:
    shape, data = packed
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=shape[0] * shape[1])
    return bits.reshape(shape).astype(bool)


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def _worker(conn: Any, impl: Backend, problem: AlignmentProblem, request: SolveRequest, tmpdir: str,
            parent: int) -> None:
    """Solve in this process and send the answer (and incumbents) through ``conn``.  ``parent``:
    the pid whose death must end this worker."""
    if impl.child_processes:
        def stop(signum: int, frame: Any) -> None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            os.killpg(os.getpgrp(), signal.SIGKILL)

        signal.signal(signal.SIGTERM, stop)
        _die_with_parent(signal.SIGTERM)
    else:
        _die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:            # the parent died before the death signal was armed
        os._exit(1)
    if tmpdir:
        os.environ["TMPDIR"] = tmpdir
        tempfile.tempdir = tmpdir

    def report(x: np.ndarray, bound: Optional[float]) -> None:
        conn.send(("incumbent", {"x": _pack(np.asarray(x, dtype=bool)), "bound": bound}))

    try:
        result = impl.solve(problem, replace(request, report=report))
        conn.send(("final", {
            "status": result.status.value, "x": _pack(result.assignment) if result.has_solution else None,
            "bound": result.bound, "solve_seconds": result.solve_seconds, "build_seconds": result.build_seconds,
            "explanation": result.explanation, "soft_penalty": result.soft_penalty, "stats": result.stats}))
    except Exception as exc:  # reported to the caller as NO_SOLUTION_FOUND with the reason
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _leader(result_fd: int, fallback_fd: int, impl: Backend, problem: AlignmentProblem, request: SolveRequest,
            tmpdir: str, fallback_until: Optional[float], parent: int) -> None:
    """A freshly forked, single-threaded task process: lead a new process group, fork the greedy
    fallback (when ``fallback_until`` is set) and run the worker; never returns."""
    try:
        os.setpgrp()
        if fallback_until is not None:
            leader = os.getpid()
            if os.fork() == 0:
                try:
                    os.close(result_fd)
                    _die_with_parent(signal.SIGKILL)
                    if os.getppid() == leader:
                        _fallback(Connection(fallback_fd, readable=False), problem, request, fallback_until)
                finally:
                    os._exit(0)
        os.close(fallback_fd)
        _worker(Connection(result_fd, readable=False), impl, problem, request, tmpdir, parent)
    finally:
        os._exit(0)


def _fallback(conn: Connection, problem: AlignmentProblem, request: SolveRequest, until: float) -> None:
    """Send the greedy plan (bounded by ``until``, a ``time.perf_counter()`` value) through ``conn``."""
    from .backends.greedy import GreedyBackend

    try:
        result = GreedyBackend().solve(problem, replace(request, deadline=until, report=None))
        conn.send(("fallback", {"x": _pack(result.assignment) if result.has_solution else None,
                                "explanation": result.explanation}))
    except Exception as exc:
        conn.send(("fallback", {"x": None, "explanation": f"{type(exc).__name__}: {exc}"}))
    finally:
        conn.close()


# ---- the helper: one fresh interpreter per caller, started through the package's entry point ----
class _Helper:
    """The caller's end of the helper process (see the module docstring)."""

    CODE = "import sys; from alignment_solver.deadline import _helper_main; _helper_main(int(sys.argv[1]))"

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL,
                                     env=env)
        theirs.close()
        self.sock = ours
        self.owner = os.getpid()
        self.ready = False
        self.tasks = 0
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_ready(self) -> bool:
        """Whether the helper has preloaded the solvers (it says so once, without blocking here)."""
        if not self.ready and select.select([self.sock], [], [], 0)[0]:
            self.ready = self.sock.recv(16) == b"ready"
        return self.ready

    def submit(self, data: bytes, result_w: int, fallback_w: int, op: dict[str, Any]) -> int:
        """Hand a pickled task and the write ends of its result pipes to the helper; the task id."""
        memfd = os.memfd_create("alignment-solver-task", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(memfd, view):]
            os.lseek(memfd, 0, os.SEEK_SET)
            with self.lock:
                self.tasks += 1
                task = self.tasks
                socket.send_fds(self.sock, [json.dumps({**op, "op": "run", "id": task}).encode()],
                                [memfd, result_w, fallback_w])
        finally:
            os.close(memfd)
        return task

    def cancel(self, task: int) -> None:
        try:
            self.sock.send(json.dumps({"op": "cancel", "id": task}).encode())
        except OSError:
            pass


_helper: Optional[_Helper] = None
_helper_lock = threading.Lock()


def _get_helper() -> _Helper:
    global _helper
    with _helper_lock:
        if _helper is None or not _helper.alive() or _helper.owner != os.getpid():
            _helper = _Helper()
        return _helper


def _forget_helper() -> None:
    """In a forked child: drop the parent's helper socket, so that only the parent's death closes it."""
    global _helper
    if _helper is not None:
        _helper.sock.close()
        _helper = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper)


def warm_up() -> None:
    """Start the helper now (where workers come from it, :func:`isolation`), so the first
    time-limited solve does not pay its start-up (about a second).  Idempotent; returns at once."""
    if isolation() == "helper":
        _get_helper()


def _helper_main(fd: int) -> None:
    """The helper process: preload, then fork one worker per task received on socket ``fd``; kill
    a task's group at its ``kill_at`` or when cancelled, remove its temporary directory when it
    ends, and kill every task and exit when the caller's end of the socket closes."""
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # the caller decides; a terminal's ^C is for it
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)   # orphans (CBC) are reaped here
    except (OSError, AttributeError):
        pass
    for module in _PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    _reap_stale_dirs()
    try:
        sock.send(b"ready")
    except OSError:                            # the caller is gone already
        os._exit(0)
    tasks: dict[int, dict[str, Any]] = {}      # id -> {"pid", "kill_at", "tmpdir"}

    def finish(task: dict[str, Any]) -> None:
        try:
            os.killpg(task["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if task["tmpdir"]:
            shutil.rmtree(task["tmpdir"], ignore_errors=True)

    while True:
        now = time.perf_counter()
        due = [t["kill_at"] - now for t in tasks.values() if t["kill_at"] is not None]
        timeout = min([0.5, *due])
        if select.select([sock], [], [], max(timeout, 0.0))[0]:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 4096, 3)
            except OSError:                    # the caller is gone (a reset, when it left "ready" unread)
                msg = b""
            if not msg:
                break
            op = json.loads(msg)
            if op["op"] == "run":
                tasks[op["id"]] = _helper_start(sock, fds, op)
            elif op["op"] == "cancel" and op["id"] in tasks:
                finish(tasks.pop(op["id"]))
        now = time.perf_counter()
        for key in [k for k, t in tasks.items() if t["kill_at"] is not None and now >= t["kill_at"]]:
            finish(tasks.pop(key))
        while True:                            # reap: a task whose leader ended is finished
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            for key in [k for k, t in tasks.items() if t["pid"] == pid]:
                finish(tasks.pop(key))
    for task in tasks.values():
        finish(task)
    os._exit(0)


def _helper_start(sock: socket.socket, fds: list[int], op: dict[str, Any]) -> dict[str, Any]:
    """Fork the leader of one task in the helper (see :func:`_helper_main`)."""
    task_fd, result_w, fallback_w = fds
    tmpdir = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-") if op["tmp"] else ""
    helper = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            sock.close()
            with os.fdopen(task_fd, "rb") as fh:
                impl, problem, request, fallback_until = pickle.loads(fh.read())
            _leader(result_w, fallback_w, impl, problem, request, tmpdir, fallback_until, helper)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    return {"pid": pid, "kill_at": op["kill_at"], "tmpdir": tmpdir}


def _answered(final: Optional[tuple[str, Any]]) -> bool:
    """Whether the worker's final message carries a plan or a proof of infeasibility."""
    return final is not None and final[0] == "final" and (
        final[1]["x"] is not None or final[1]["status"] == SolveStatus.INFEASIBLE.value)


def _kill(pid: int) -> None:
    """Kill a forked worker's process group without waiting for it to be torn down (a worker
    holding gigabytes takes a moment); it is reaped at the next run or at exit."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _children.append(pid)


def run(impl: Backend, problem: AlignmentProblem, request: SolveRequest, time_limit: Optional[float],
        started: Optional[float] = None) -> AlignmentResult:
    """Solve with ``impl`` in a worker process under a hard ``time_limit`` counted from ``started``
    (a ``time.perf_counter()`` value; default now), see the module docstring."""
    from .backends.greedy import GreedyBackend

    t0 = time.perf_counter() if started is None else started
    time_limit = effective_limit(time_limit)
    limit_at = None if time_limit is None else t0 + time_limit
    child_request = replace(request, deadline=None if limit_at is None else limit_at - MARGIN)
    fallback_until = None if limit_at is None or impl.isolation == "helper" else limit_at + GRACE - 0.1
    mode = isolation()
    _reap()
    final: Optional[tuple[str, Any]] = None
    incumbent: Optional[dict[str, Any]] = None
    fallback: Optional[dict[str, Any]] = None
    pid = 0
    helper: Optional[_Helper] = None
    task = 0
    tmpdir = ""
    result_r, result_w = os.pipe()
    fallback_r, fallback_w = os.pipe()
    receive = [Connection(result_r, writable=False), Connection(fallback_r, writable=False)]
    try:
        if mode == "fork":
            tmpdir = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-") if impl.child_processes else ""
            caller = os.getpid()
            pid = os.fork()
            if pid == 0:
                for conn in receive:
                    conn.close()
                _leader(result_w, fallback_w, impl, problem, child_request, tmpdir, fallback_until, caller)
        else:
            helper = _get_helper()
            ready = helper.check_ready()
            data = pickle.dumps((impl, problem, child_request, fallback_until if ready else None), protocol=5)
            kill_at = None if limit_at is None else limit_at + GRACE
            task = helper.submit(data, result_w, fallback_w, {"kill_at": kill_at, "tmp": impl.child_processes})
            if not ready and limit_at is not None:        # the helper is still starting: the caller's greedy
                greedy = GreedyBackend().solve(problem, replace(request, deadline=limit_at))
                fallback = {"x": _pack(greedy.assignment) if greedy.has_solution else None,
                            "explanation": greedy.explanation}
        os.close(result_w)
        os.close(fallback_w)
        result_w = fallback_w = -1
        until = None if limit_at is None else limit_at + GRACE - 0.05
        waiting = list(receive) if limit_at is not None and fallback is None else receive[:1]
        while waiting:
            left = None if until is None else until - time.perf_counter()
            if left is not None and left <= 0:
                break
            ready_conns = wait(waiting, None if left is None else min(left, _LONGEST_WAIT))
            for conn in ready_conns:
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    waiting.remove(conn)
                    continue
                if kind == "incumbent":
                    incumbent = payload
                elif kind == "fallback":
                    fallback = payload
                    waiting.remove(conn)
                else:
                    final = (kind, payload)
                    waiting.remove(conn)
            if receive[0] not in waiting and (fallback is not None or receive[1] not in waiting or _answered(final)):
                break                     # no plan from the worker: wait for the fallback, up to the grace
    finally:
        for fd in (result_w, fallback_w):
            if fd >= 0:
                os.close(fd)
        for conn in receive:
            conn.close()
        if pid:
            _kill(pid)
        if helper is not None and task:
            helper.cancel(task)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    result = _answer(impl, problem, request, time_limit, t0, limit_at, final, incumbent, fallback)
    result.stats["isolation"] = mode
    return result


def _answer(impl: Backend, problem: AlignmentProblem, request: SolveRequest, time_limit: Optional[float],
            t0: float, limit_at: Optional[float], final: Optional[tuple[str, Any]],
            incumbent: Optional[dict[str, Any]], fallback: Optional[dict[str, Any]]) -> AlignmentResult:
    """The worker's own answer if it has one, else the best plan seen (see the module docstring)."""
    elapsed = time.perf_counter() - t0
    soft_penalty = request.soft_penalty if request.soft else None
    if final is not None and final[0] == "final":
        p = final[1]
        x = None if p["x"] is None else _unpack(p["x"])
        own = AlignmentResult(problem, SolveStatus(p["status"]), impl.name, assignment=x, bound=p["bound"],
                              solve_seconds=p["solve_seconds"], build_seconds=p["build_seconds"],
                              explanation=p["explanation"], soft=request.soft, soft_penalty=p["soft_penalty"],
                              stats=p["stats"])
        if own.has_solution or own.status is SolveStatus.INFEASIBLE or (incumbent is None and fallback is None):
            return own
        why = f"{impl.name}: {own.status.value} ({own.explanation or 'no reason given'})"
    elif final is not None:
        why = f"{impl.name} failed: {final[1]}"
    elif limit_at is not None and time.perf_counter() >= limit_at:
        why = f"{impl.name} was stopped at the time limit of {time_limit:g} s"
    else:
        why = f"the {impl.name} worker ended without an answer"
    candidates = []
    if incumbent is not None:
        cand = AlignmentResult(problem, SolveStatus.FEASIBLE, impl.name, assignment=_unpack(incumbent["x"]),
                               soft=request.soft, soft_penalty=soft_penalty,
                               stats={"source": f"{impl.name} incumbent"})
        candidates.append(cand)
    if fallback is not None and fallback["x"] is not None:
        candidates.append(AlignmentResult(problem, SolveStatus.FEASIBLE, impl.name, assignment=_unpack(fallback["x"]),
                                          soft=request.soft, soft_penalty=soft_penalty,
                                          stats={"source": "greedy fallback"}))
    candidates = [c for c in candidates if not c.violations(band=not request.soft)]
    bound = None if incumbent is None else incumbent["bound"]
    if not candidates:
        detail = "" if fallback is None or fallback["x"] is not None or not fallback["explanation"] \
            else f"; {fallback['explanation']}"
        return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, impl.name, solve_seconds=elapsed,
                               explanation=f"{why}, and no feasible plan was found before then{detail}",
                               stats={"deterministic": False, "stopped": True})
    best = max(candidates, key=lambda c: c.objective)
    best.solve_seconds = elapsed
    best.explanation = f"{why}; the plan is the best found before then ({best.stats['source']})"
    best.stats.update(deterministic=False, stopped=True)
    if bound is not None:
        best.bound = max(float(bound), best.objective)
    return best
