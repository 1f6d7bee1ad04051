"""Hard wall-clock limits: a backend runs in a worker process that is killed when time is up.

Contract of :func:`run` (used by :func:`~alignment_solver.solve` whenever ``time_limit`` is set,
and always for backends that start processes of their own):

- it stops waiting for the worker ``GRACE`` seconds after ``time_limit`` (counted from the
  start of ``solve``, model building included), whatever the backend does; with the greedy
  fallback and the hand-over it returns within ``time_limit`` + 0.5 s, also on a loaded machine
  (``benchmarks/time_limits.py``);
- the answer is the backend's own if it arrived in time with a plan (or a proof of
  infeasibility); otherwise the best plan seen so far:
  an incumbent the backend reported (``SolveRequest.report``) or the greedy plan the caller's
  process computes while the worker solves; its status is at most FEASIBLE, ``bound`` is the
  best valid bound the backend reported (or None), and ``stats["deterministic"]`` is False;
- the worker leads its own process group (solver subprocesses such as CBC included); the whole
  group is killed at the limit, on an exception or interrupt in the caller, and, through the
  parent-death signal, when the caller itself is killed.  Backends that start solver processes
  (``child_processes``) get a private temporary directory, removed in every one of those cases.

How the worker starts (``isolation()``, recorded in ``stats["isolation"]``):

- ``"fork"``: forked from the caller, the fastest, used while that is safe: no other Python
  thread runs, gRPC and Ray are not loaded, and the caller is not a daemonic process;
- ``"forkserver"``: other threads run (a Flower or NVFlare server): forked from multiprocessing's
  fork server, a fresh single-threaded interpreter that preloads the solvers (the first solve
  pays its start-up, about a second here);
- ``"subprocess"``: the caller is a daemonic process (a ``multiprocessing.Pool`` worker, which
  may not start children through multiprocessing): a fresh interpreter that reads the task from a
  pipe (about a second of start-up on every solve).

In every mode the worker leads its own process group, dies with its parent (Linux' parent-death
signal; the fork server exits with the caller), and its group and temporary directory go at the
limit.  Only where none of them is possible (no ``fork``: Windows) does the backend run
in-process with a cooperative deadline, ``stats["isolation"] = "in-process"``.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any, Optional

import numpy as np

from .backends.base import Backend, SolveRequest
from .problem import AlignmentProblem
from .result import AlignmentResult, SolveStatus

GRACE = 0.3          # seconds past the limit spent collecting the answer and stopping the worker
MARGIN = 0.15        # the worker is asked to finish this long before the limit
_PR_SET_PDEATHSIG = 1
#: modules whose background threads make a plain fork unsafe (a lock held by one of them at fork
#: time stays locked in the child forever)
_FORK_UNSAFE = ("grpc", "ray")


#: modules the fork server imports once, so each worker it forks starts with them loaded
_PRELOAD = ["alignment_solver.deadline", "alignment_solver.backends.flow", "alignment_solver.backends.cpsat",
            "alignment_solver.backends.greedy"]
_children: list[subprocess.Popen] = []     # killed subprocess workers, reaped at the next run and at exit


def available() -> bool:
    """Whether workers can be forked from the caller safely here: ``fork`` exists, no other Python
    thread runs, no module known to keep background threads (gRPC, Ray) is loaded, and the caller
    is not a daemonic process."""
    return ("fork" in mp.get_all_start_methods() and threading.active_count() == 1
            and not any(m in sys.modules for m in _FORK_UNSAFE) and not mp.current_process().daemon)


def isolation() -> str:
    """How a worker starts here: ``"fork"``, ``"forkserver"``, ``"subprocess"`` or ``"in-process"``."""
    if "fork" not in mp.get_all_start_methods():
        return "in-process"
    if available():
        return "fork"
    if not mp.current_process().daemon and "forkserver" in mp.get_all_start_methods():
        return "forkserver"
    return "subprocess"


def _reap() -> None:
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)


@atexit.register
def _reap_all() -> None:
    for child in _children:
        try:
            child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


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
    the pid whose death must end this worker (0: do not check; the fork server's children)."""
    try:
        os.setpgrp()
    except PermissionError:               # already a session (and group) leader: the subprocess mode
        pass
    if not parent:                        # forked by the fork server: let it exit with the caller
        _release_fork_server()
    if impl.child_processes:
        def stop(signum: int, frame: Any) -> None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            os.killpg(os.getpgrp(), signal.SIGKILL)

        signal.signal(signal.SIGTERM, stop)
        _die_with_parent(signal.SIGTERM)
    else:
        _die_with_parent(signal.SIGKILL)
    if parent and os.getppid() != parent:     # the caller died before the death signal was armed
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


def _release_fork_server() -> None:
    """Close this process's copy of the fork server's liveness pipe.  Every process the fork
    server forks holds one, and the server exits only when all are closed; with the worker
    holding one, a killed caller would leave the server, and so the worker, running."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None


def _subprocess_main(task_fd: int, result_fd: int, parent: int) -> None:
    """Entry point of a ``"subprocess"`` worker: read the task from ``task_fd``, answer on ``result_fd``."""
    with Connection(task_fd, writable=False) as task:
        impl, problem, request, tmpdir = task.recv()
    _worker(Connection(result_fd, readable=False), impl, problem, request, tmpdir, parent)


def _start_subprocess(impl: Backend, problem: AlignmentProblem, request: SolveRequest,
                      tmpdir: str) -> tuple[subprocess.Popen, Connection]:
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    code = "import sys; from alignment_solver.deadline import _subprocess_main as m; m(*map(int, sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, str(task_r), str(result_w), str(os.getpid())],
                                pass_fds=(task_r, result_w), start_new_session=True, stdin=subprocess.DEVNULL,
                                env=env)
    finally:
        os.close(task_r)
        os.close(result_w)
    _children.append(proc)

    from multiprocessing.reduction import ForkingPickler

    data = ForkingPickler.dumps((impl, problem, request, tmpdir))    # here: the caller's greedy may touch the problem

    def send() -> None:                   # the fresh interpreter reads only once started (about a second):
        with Connection(task_w, readable=False) as task:          # meanwhile the caller computes its fallback
            try:
                task.send_bytes(data)
            except (BrokenPipeError, OSError):
                pass                      # the worker died or was killed first; the caller sees no answer
    threading.Thread(target=send, name="alignment-solver-task", daemon=True).start()
    return proc, Connection(result_r, writable=False)


def _kill(proc: Any) -> None:
    """Kill the worker's process group without waiting for it to be torn down (a worker holding
    gigabytes takes a moment); it is reaped at the next start or at exit."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if isinstance(proc, subprocess.Popen):
        proc.poll()
    else:
        proc.join(timeout=0)


def _exit_code(proc: Any) -> Optional[int]:
    return proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode


def run(impl: Backend, problem: AlignmentProblem, request: SolveRequest, time_limit: Optional[float],
        started: Optional[float] = None) -> AlignmentResult:
    """Solve with ``impl`` in a worker process under a hard ``time_limit`` counted from ``started``
    (a ``time.perf_counter()`` value; default now), see the module docstring."""
    from .backends.greedy import GreedyBackend

    t0 = time.perf_counter() if started is None else started
    limit_at = None if time_limit is None else t0 + time_limit
    child_request = replace(request, deadline=None if limit_at is None else limit_at - MARGIN)
    tmpdir = tempfile.mkdtemp(prefix="alignment-solver-") if impl.child_processes else ""
    mode = isolation()
    _reap()
    final: Optional[tuple[str, Any]] = None
    incumbent: Optional[dict[str, Any]] = None
    fallback: Optional[AlignmentResult] = None
    proc: Any = None
    receive: Any = None
    try:
        if mode == "subprocess":
            proc, receive = _start_subprocess(impl, problem, child_request, tmpdir)
        else:
            ctx = mp.get_context(mode)
            if mode == "forkserver":
                ctx.set_forkserver_preload(_PRELOAD)
            receive, send = ctx.Pipe(duplex=False)
            parent = os.getpid() if mode == "fork" else 0
            proc = ctx.Process(target=_worker, args=(send, impl, problem, child_request, tmpdir, parent), daemon=True)
            proc.start()
            send.close()
        if limit_at is not None:
            fallback = GreedyBackend().solve(problem, replace(request, deadline=limit_at))
        until = None if limit_at is None else limit_at + GRACE - 0.05
        while True:
            wait = None if until is None else until - time.perf_counter()
            if wait is not None and wait <= 0:
                break
            if not receive.poll(wait):
                break
            try:
                kind, payload = receive.recv()
            except EOFError:
                break
            if kind == "incumbent":
                incumbent = payload
            else:
                final = (kind, payload)
                break
    finally:
        if receive is not None:
            receive.close()
        if proc is not None:
            _kill(proc)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    result = _answer(impl, problem, request, time_limit, t0, limit_at, final, incumbent, fallback, proc)
    result.stats["isolation"] = mode
    return result


def _answer(impl: Backend, problem: AlignmentProblem, request: SolveRequest, time_limit: Optional[float],
            t0: float, limit_at: Optional[float], final: Optional[tuple[str, Any]],
            incumbent: Optional[dict[str, Any]], fallback: Optional[AlignmentResult], proc: Any) -> AlignmentResult:
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
        why = f"the {impl.name} worker ended without an answer (exit code {_exit_code(proc)})"
    candidates = []
    if incumbent is not None:
        cand = AlignmentResult(problem, SolveStatus.FEASIBLE, impl.name, assignment=_unpack(incumbent["x"]),
                               soft=request.soft, soft_penalty=soft_penalty,
                               stats={"source": f"{impl.name} incumbent"})
        candidates.append(cand)
    if fallback is not None and fallback.has_solution:
        candidates.append(AlignmentResult(problem, SolveStatus.FEASIBLE, impl.name, assignment=fallback.assignment,
                                          soft=request.soft, soft_penalty=soft_penalty,
                                          stats={"source": "greedy fallback"}))
    candidates = [c for c in candidates if not c.violations(band=not request.soft)]
    bound = None if incumbent is None else incumbent["bound"]
    if not candidates:
        detail = "" if fallback is None or fallback.has_solution else f"; {fallback.explanation}"
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
