"""Hard time limits and clean stops, on instances built to take longer than the limit.

These tests wait on the clock, so they assert what must hold (the worker was stopped, a plan came
back, nothing is left running or on disk) with generous wall-clock margins; the tight number
(limit + 0.5 s) is measured by ``benchmarks/time_limits.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from alignment_solver import solve
from alignment_solver.instances import random_problem

from .conftest import EXACT

SLOW_BUILD = (3000, 32)       # PuLP needs several seconds just to build this model


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def _gone(pid: int, wait: float = 30.0) -> bool:
    """True once every descendant of ``pid`` has exited (killed workers are reaped in the background)."""
    until = time.monotonic() + wait
    while time.monotonic() < until:
        if not [c for c in _children(pid) if _alive(c)]:
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


_STOPPED = textwrap.dedent("""
    import json, os, time
    from alignment_solver import solve
    from alignment_solver.instances import random_problem
    from tests.oracles import violations
    from tests.test_deadline import _gone
    problem = random_problem({C}, {E}, seed={seed}, budget={budget})
    started = time.perf_counter()
    r = solve(problem, backend="{backend}", time_limit={limit}, soft={soft})
    wall = time.perf_counter() - started
    print(json.dumps({{"wall": wall, "stats": r.stats, "status": r.status.value, "explanation": r.explanation,
                      "ok": r.has_solution and violations(problem, r.assignment, soft={soft}) == [],
                      "gone": _gone(os.getpid())}}))
""")


def _in_fresh_process(**kw) -> dict:
    """Run one limited solve in a fresh interpreter (the worker is forked only where that is safe,
    and a pytest process may have loaded gRPC through the Flower tests)."""
    code = _STOPPED.format(**kw)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("pulp_cbc", "pulp_highs") if b in EXACT])
def test_a_backend_that_overruns_is_stopped_and_the_greedy_plan_returned(backend):
    r = _in_fresh_process(C=SLOW_BUILD[0], E=SLOW_BUILD[1], seed=3, budget=True, backend=backend, limit=1.0,
                          soft=True)
    assert r["stats"].get("stopped") is True and r["stats"]["deterministic"] is False
    assert r["status"] == "feasible" and r["stats"]["source"] == "greedy fallback" and r["ok"]
    assert "time limit of 1 s" in r["explanation"]
    assert r["wall"] < 1.0 + 10.0        # generous: the benchmark holds the 0.5 s margin
    assert r["gone"]                     # the worker and its solver are gone


@pytest.mark.slow
def test_cpsat_building_past_the_limit_still_returns_a_plan():
    r = _in_fresh_process(C=20_000, E=64, seed=1, budget=False, backend="cpsat", limit=0.5, soft=False)
    assert r["ok"] and r["status"] == "feasible" and r["stats"]["deterministic"] is False
    assert r["gone"]


@pytest.mark.parametrize("shape", [(300, 8), (20_000, 64)])      # every arc; the priced working set
def test_flow_result_says_whether_the_limit_cut_it(shape):
    problem = random_problem(*shape, seed=0)
    free = solve(problem, backend="flow")
    limited = solve(problem, backend="flow", time_limit=30)
    assert free.stats["deterministic"] and limited.stats["deterministic"]
    assert np.array_equal(free.assignment, limited.assignment)


_CALLER = textwrap.dedent("""
    import multiprocessing as mp, os, sys, threading, time
    from alignment_solver import solve
    from alignment_solver.instances import random_problem

    def run():
        problem = random_problem({C}, {E}, seed=0, budget=True)
        print("ready", os.getpid(), flush=True)
        solve(problem, backend="{backend}"{limit})
        print("done", flush=True)

    def spin():
        while True:
            pass

    if __name__ == "__main__":
        if "{where}" == "thread":                       # a thread alive, as in a Flower server
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        if "{where}" == "busy":                         # one spinning in pure Python
            threading.Thread(target=spin, daemon=True).start()
        if "{where}" == "pool":
            with mp.get_context("fork").Pool(1) as pool:
                pool.apply(run)
        else:
            run()
""")

_LIMITED = textwrap.dedent("""
    import json, multiprocessing as mp, threading, time
    import numpy as np
    from alignment_solver import solve
    from alignment_solver.instances import random_problem

    def run(backend, limit):
        problem = random_problem(5000, 64, seed=1, budget=True)
        weights = np.random.default_rng(1).integers(1, 4, problem.fitness.shape).astype(float)
        problem = problem.model_copy(update={{"load_weight": weights, "expert_min_load": 0, "expert_max_load": None}})
        started = time.perf_counter()
        r = solve(problem, backend=backend, time_limit=limit)
        return {{"wall": time.perf_counter() - started, "status": r.status.value, "isolation": r.stats["isolation"],
                "ok": r.has_solution and r.violations() == []}}

    if __name__ == "__main__":
        if "{where}" == "thread":
            threading.Thread(target=threading.Event().wait, daemon=True).start()
            out = run("{backend}", {limit})
        else:
            with mp.get_context("fork").Pool(1) as pool:
                out = pool.apply(run, ("{backend}", {limit}))
        print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where, backend, limit", [("thread", "pulp_highs", 1.0), ("thread", "pulp_cbc", 1.5),
                                                   ("thread", "cpsat", 1.0), ("pool", "pulp_cbc", 1.5),
                                                   ("pool", "cpsat", 1.0)])
def test_the_limit_holds_with_a_thread_alive_and_inside_a_pool_worker(tmp_path, where, backend, limit):
    """Budgeted, weighted 5,000 x 64: in-process, HiGHS took 13 s at 1 s and CBC 22.7 s at 1.5 s;
    a Pool worker could not start a worker at all (daemonic processes have no children)."""
    if backend not in EXACT:
        pytest.skip(f"{backend} not installed")
    script = tmp_path / "limited.py"
    script.write_text(_LIMITED.format(where=where, backend=backend, limit=limit))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["isolation"] == ("helper" if where == "thread" else "fork")       # os.fork: a Pool worker may
    assert r["ok"] and r["status"] in ("feasible", "optimal")
    assert r["wall"] < limit + 5.0, r     # generous on a busy machine; the benchmark holds the 0.5 s margin


KILLS = [("main", "pulp_cbc", signal.SIGTERM, True), ("main", "pulp_cbc", signal.SIGINT, True),
         ("main", "pulp_cbc", signal.SIGKILL, True), ("main", "cpsat", signal.SIGTERM, False),
         ("main", "cpsat", signal.SIGTERM, True)] + [
    (where, "pulp_cbc", how, True) for where in ("thread", "pool")
    for how in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)] + [
    (where, "cpsat", how, cbc) for where in ("thread", "busy") for how in (signal.SIGTERM, signal.SIGKILL)
    for cbc in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("where, backend, how, cbc", KILLS)
def test_killing_the_caller_leaves_no_solver_process_and_no_temporary_files(tmp_path, where, backend, how, cbc):
    """``cbc``: the signal comes once a CBC process runs (for cpsat: its sub-MIP search).  ``where``:
    the caller is a plain process, one with a thread alive, or a ``multiprocessing.Pool`` worker
    (the process killed is the one that called ``solve``)."""
    if backend not in EXACT or (cbc and "pulp_cbc" not in EXACT):
        pytest.skip(f"{backend} not installed")
    limit = "" if backend == "pulp_cbc" else ", time_limit=600"
    script = tmp_path / "caller.py"
    script.write_text(_CALLER.format(C=1500, E=32, backend=backend, limit=limit, where=where))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    word, caller = proc.stdout.readline().split()
    assert word == "ready"
    caller = int(caller)
    seen: set[int] = set()
    waited = time.monotonic()
    while time.monotonic() - waited < 120:          # until the solver is really running
        seen |= _children(caller)
        if not cbc and seen:
            time.sleep(1.0)
            break
        if cbc and any("cbc" in _cmdline(p) for p in seen):
            cbc = False                             # seen: nothing more to wait for
            break
        time.sleep(0.05)
    assert seen and not cbc, "the solver (or its CBC process) never started"
    os.kill(caller, how)
    if where == "pool":                             # the pool's parent goes on; it is not under test
        time.sleep(1.0)
        proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.1)
    assert not [p for p in seen if _alive(p)], "solver processes survived the caller"
    deadline = time.monotonic() + 10                # the helper removes them as it sees the caller go
    while time.monotonic() < deadline and any(scratch.iterdir()):
        time.sleep(0.1)
    assert [p.name for p in scratch.iterdir()] == [], "temporary files were left behind"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_large_task_reaches_a_forked_worker_from_a_pool_worker_and_its_answer_comes_back(tmp_path):
    """100,000 x 128 in a Pool worker: the task reaches the forked worker and its answer comes back
    (pickling it while the fallback filled the problem's caches once raised 'dictionary changed
    size': the worker got nothing).  The limit leaves room for a loaded machine: what must hold is
    that the worker answers, not how fast."""
    script = tmp_path / "big.py"
    script.write_text(textwrap.dedent("""
        import json, multiprocessing as mp
        def run():
            from alignment_solver import solve
            from alignment_solver.instances import random_problem
            r = solve(random_problem(100_000, 128, seed=0), backend="flow", time_limit=60)
            return {"explanation": r.explanation or "", "isolation": r.stats["isolation"], "ok": r.has_solution,
                    "status": r.status.name}
        if __name__ == "__main__":
            with mp.get_context("fork").Pool(1) as pool:
                print(json.dumps(pool.apply(run)))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["isolation"] == "fork" and r["ok"] and r["status"] == "OPTIMAL", r
    assert "ended without an answer" not in r["explanation"], r


# ---- inside real scripts and servers: no re-run of __main__, busy threads, kills (issue 36) ----
_UNGUARDED = textwrap.dedent("""
    import json, os, sys, threading, time
    print("top-level", os.getpid(), flush=True)      # a script without a main guard: run once, never again
    if "{thread}" == "tqdm":
        from tqdm import tqdm
        for _ in tqdm(range(3)):
            pass
    elif "{thread}" == "busy":
        def spin():
            while True:
                pass
        threading.Thread(target=spin, daemon=True).start()
    else:
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    from alignment_solver import solve
    from alignment_solver.instances import random_problem
    problem = random_problem(2000, 32, seed=1, budget={budget})
    for limit in (1.0, 1.0):
        started = time.perf_counter()
        r = solve(problem, backend="{backend}", time_limit=limit)
        print(json.dumps({{"wall": time.perf_counter() - started, "status": r.status.value,
                          "isolation": r.stats["isolation"], "ok": r.has_solution and r.violations() == []}}),
              flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("thread, backend", [("tqdm", "auto"), ("daemon", "cpsat"), ("busy", "cpsat"),
                                             ("daemon", "pulp_highs"), ("daemon", "pulp_cbc")])
def test_an_unguarded_script_with_a_thread_runs_its_top_level_once(tmp_path, thread, backend):
    """Issue 36: with a thread alive, the fork server re-ran the script's top level in the worker,
    which failed ('bootstrapping phase'), and solve raised BrokenPipeError."""
    if backend not in ("auto", *EXACT):
        pytest.skip(f"{backend} not installed")
    script = tmp_path / "unguarded.py"
    budget = backend == "auto"                    # the case; the greedy fallback finds no budgeted plan
    script.write_text(_UNGUARDED.format(thread=thread, backend=backend, budget=budget))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert sum(line.startswith("top-level") for line in lines) == 1, out.stdout
    first, second = (json.loads(line) for line in lines[-2:])
    assert first["isolation"] == second["isolation"] == "helper"
    assert second["ok"] or budget, second        # the helper is warm: the backend's own answer or its fallback
    assert first["wall"] < 1.0 + 5.0 and second["wall"] < 1.0 + 5.0      # generous; the benchmark holds 0.5 s


_BUSY = textwrap.dedent("""
    import json, threading, time
    from alignment_solver import solve
    from alignment_solver.deadline import warm_up
    from alignment_solver.instances import random_problem

    def spin():                                       # a server's event loop under load: pure Python
        while True:
            pass

    if __name__ == "__main__":
        threading.Thread(target=spin, daemon=True).start()
        warm_up()
        problem = random_problem({C}, {E}, seed=0, budget={budget})
        time.sleep({settle})
        for limit in {limits}:
            started = time.perf_counter()
            r = solve(problem, backend="{backend}", time_limit=limit)
            print(json.dumps({{"limit": limit, "wall": time.perf_counter() - started, "status": r.status.value,
                              "ok": r.has_solution and r.violations() == [], "isolation": r.stats["isolation"]}}),
                  flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "greedy", "cpsat"])
def test_limits_hold_beside_a_busy_thread(tmp_path, backend):
    """Issue 36: beside a spinning thread, 0.5 s limits on 100,000 x 128 took 1.9 s (greedy, auto)
    and 3.4 s (cpsat, first solve): the caller computed the fallback with half the GIL.  Count
    loads, so that the greedy fallback always has a plan."""
    script = tmp_path / "busy.py"
    script.write_text(_BUSY.format(C=20_000, E=64, backend=backend, limits=[0.5, 0.5, 1.0], settle=2.0, budget=False))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    for r in rows:
        assert r["isolation"] == "helper", r              # greedy too: in-process it ran at half speed
        assert r["wall"] < r["limit"] + 1.0, rows       # generous beside two CPU hogs; the benchmark: 0.5 s
    assert rows[-1]["ok"], rows                         # at 1 s a plan comes back even on a loaded machine


def test_a_temporary_folder_of_a_dead_process_is_reaped_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    code = textwrap.dedent(f"""
        import os, tempfile
        stale = os.path.join(tempfile.gettempdir(), "alignment-solver-{dead}-abcd1234")
        os.makedirs(os.path.join(stale, "cbc"))
        mine = tempfile.mkdtemp(prefix=f"alignment-solver-{{os.getpid()}}-")
        from alignment_solver import solve
        from alignment_solver.instances import random_problem
        solve(random_problem(200, 8, seed=0, budget=True), backend="cpsat", time_limit=5)
        assert not os.path.exists(stale) and os.path.exists(mine)     # a live process keeps its own
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
