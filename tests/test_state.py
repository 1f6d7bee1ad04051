"""Coordinator state under corrupt files, rounds out of order, concurrent writers and kill -9."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from alignment_solver import AlignmentCoordinator, ReportError, RoundError, StateError


def played(rounds=2, clients=5, experts=4):
    coord = AlignmentCoordinator(experts)
    for r in range(rounds):
        plan = coord.plan_round(r, list(range(clients)))
        coord.observe_round(r, [{"client_id": p.client_id,
                                 "experts": [{"expert": e, "samples": 10, "mean_loss": 0.5, "accuracy": 0.8}
                                             for e in p.experts]} for p in plan.clients])
    coord.plan_round(rounds, list(range(clients)))
    return coord


def corrupt(state, where, value):
    node = state
    *path, last = where
    for p in path:
        node = node[p]
    node[last] = value
    return state


@pytest.mark.parametrize("where, value, words", [
    (("held", 0, 0), -1, r"held\[0\] \(rows\)\[0\] must lie in \[0, 4\]; got -1"),
    (("held", 0, 0), 0.5, r"held\[0\] \(rows\) must hold integers; got 0.5"),
    (("held", 1, 0), 4, r"held\[1\] \(experts\)\[0\] must lie in \[0, 3\]; got 4"),
    (("client_ids", 1), 0, "client_ids must be unique"),
    (("client_ids", 1), "0", "client_ids must be unique"),
    (("client_ids", 1), 1.5, r"client_ids\[1\] must be an integer or a string; got 1.5"),
    (("num_experts",), 10 ** 12, r"num_experts must be an integer in \[1, 100000\]; got 1000000000000"),
    (("num_experts",), 8, r"scorer.Q must be a \(5, 8\) array"),
    (("profiler", "declared", 0), 10 ** 20, r"profiler.declared\[0\] must lie in \[-1, 1e\+09\]"),
    (("profiler", "declared", 0), -2, r"profiler.declared\[0\] must lie in \[-1"),
    (("profiler", "limit", 0), True, "profiler.limit must hold integers, not booleans; got True"),
    (("profiler", "train", 0, 0), "x", "profiler.train must hold numbers or null; got 'x'"),
    (("scorer", "Q", 0, 0), float("nan"), r"scorer.Q\[0, 0\] must lie in"),
    (("scorer", "N", 2, 1), -3, r"scorer.N\[2, 1\] must lie in \[0"),
    (("monitor", "last_round"), "one", r"monitor.last_round must be an integer"),
    (("monitor", "total_clients", 1), float("inf"), r"monitor.total_clients\[1\] must lie in"),
    (("pending",), "garbage", "pending must be null or an object"),
    (("pending", "round"), 0, r"pending.round must be an integer in \[2,"),
    (("pending", "experts"), {"7": [0]}, "pending.experts has key '7'; keys are client rows 0..4"),
    (("pending", "experts"), {"0": [0, 0]}, r"pending.experts\['0'\] lists an expert twice"),
    (("pending", "experts"), {"0": [9]}, r"pending.experts\['0'\]\[0\] must lie in \[0, 3\]"),
    (("pending", "probes"), {"0": [9]}, r"pending.probes\['0'\]\[0\] must lie in \[0, 3\]"),
    (("pending", "probes"), [1], "pending.probes must be an object"),
    (("pending", "extra"), 1, "pending must be null or an object with keys round, deadline, experts"),
    (("config", "tolerance"), -1, "config.tolerance: Input should be greater than or equal to 0"),
    (("version",), 2, "version must be 1; got 2"),
])
def test_every_corrupt_state_is_a_state_error_naming_the_field(tmp_path, where, value, words):
    state = corrupt(played().state(), where, value)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))               # NaN/inf written as JSON NaN/Infinity on purpose
    with pytest.raises(StateError, match=words):
        AlignmentCoordinator.load(path)


def test_missing_field_directory_and_missing_file(tmp_path):
    state = played().state()
    del state["profiler"]["streak"]
    with pytest.raises(StateError, match="profiler.streak is missing"):
        AlignmentCoordinator.from_state(state)
    with pytest.raises(StateError, match="is a directory"):
        AlignmentCoordinator.load(tmp_path)
    with pytest.raises(StateError, match="does not exist"):
        AlignmentCoordinator.load(tmp_path / "nope.json")


def test_a_valid_state_round_trips_exactly(tmp_path):
    coord = played()
    coord.save(tmp_path / "s.json")
    again = AlignmentCoordinator.load(tmp_path / "s.json")
    assert json.dumps(again.state()) == json.dumps(coord.state())


def test_a_report_out_of_range_changes_nothing():
    coord = played()
    before = json.dumps(coord.state())
    plan = coord.pending["experts"]
    row, experts = next((int(k), v) for k, v in plan.items() if v)
    good = {"client_id": row, "experts": [{"expert": experts[0], "samples": 5, "mean_loss": 0.1, "accuracy": 1.0}]}
    bad = {"client_id": (row + 1) % 5, "experts": [{"expert": 0, "samples": 10 ** 400, "mean_loss": 0.1,
                                                   "accuracy": 1.0}]}
    for reports in ([good, bad], [bad, good]):
        with pytest.raises(ReportError, match=r"reports\[\d\].experts\[0\].samples"):
            coord.observe_round(2, reports)
        assert json.dumps(coord.state()) == before
    with pytest.raises(ValueError, match="max_experts"):
        coord.plan_round(2, [{"client_id": 0, "max_experts": 10 ** 20}], replan=True)
    assert json.dumps(coord.state()) == before


def test_rounds_strictly_increase_and_a_replan_is_explicit():
    coord = played(rounds=2)                       # rounds 0, 1 observed; 2 pending
    with pytest.raises(RoundError, match="round 2 is planned and not observed"):
        coord.plan_round(2, [0, 1])
    with pytest.raises(RoundError, match="round 2 is planned and not observed"):
        coord.plan_round(3, [0, 1])
    with pytest.raises(RoundError, match="above the last observed round 1"):
        coord.plan_round(1, [0, 1], replan=True)
    coord.plan_round(3, [0, 1, 2], replan=True)
    with pytest.raises(RoundError, match="pending round 3 or later"):
        coord.plan_round(2, [0], replan=True)
    coord.plan_round(3, [3, 4], replan=True)
    with pytest.raises(ReportError, match="client_id 0 was not planned in round 3"):
        coord.observe_round(3, [{"client_id": 0}])
    coord.observe_round(3, [])
    with pytest.raises(RoundError, match="no open plan"):
        coord.observe_round(3, [])
    with pytest.raises(RoundError, match="above the last observed round 3"):
        coord.plan_round(3, [0])
    assert len(coord.monitor.history) == 3


RACE = textwrap.dedent("""
    import sys
    from alignment_solver import AlignmentCoordinator, RoundError
    path, cycles, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ok = 0
    for _ in range(cycles):
        with AlignmentCoordinator.session(path, timeout=None) as coord:
            r = coord.pending["round"] if coord.pending else coord.last_round + 1
            plan = coord.plan_round(r, [name, "shared"], replan=True)
        reports = [{"client_id": p.client_id, "experts": [{"expert": e, "samples": 1, "mean_loss": 0.3,
                                                            "accuracy": 0.9} for e in p.experts]}
                   for p in plan.clients]
        try:
            with AlignmentCoordinator.session(path, timeout=None) as coord:
                coord.observe_round(r, reports)
            ok += 1
        except RoundError:
            pass
    print(ok)
""")


def test_two_processes_on_one_state_file_lose_no_update(tmp_path):
    path = tmp_path / "state.json"
    AlignmentCoordinator(4).save(path)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(path), "150", name], stdout=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    observed = sum(int(p.communicate(timeout=600)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    coord = AlignmentCoordinator.load(path)
    assert len(coord.monitor.history) == observed > 0       # every successful observe is in the file


def test_a_lock_held_elsewhere_is_a_clear_error_after_the_timeout(tmp_path):
    path = tmp_path / "state.json"
    AlignmentCoordinator(3).save(path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from alignment_solver.state import locked
        with locked({str(path)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateError, match="locked by another process"):
            with AlignmentCoordinator.session(path, timeout=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    with AlignmentCoordinator.session(path, timeout=30) as coord:
        coord.plan_round(0, ["x"])
    assert AlignmentCoordinator.load(path).pending["round"] == 0


def test_kill_9_during_saves_leaves_a_valid_file_and_no_temporaries(tmp_path):
    path = tmp_path / "state.json"
    writer = textwrap.dedent(f"""
        import os
        from alignment_solver import AlignmentCoordinator
        p = {str(path)!r}
        coord = AlignmentCoordinator.load(p) if os.path.exists(p) else AlignmentCoordinator(16)
        if coord.pending is None:
            coord.plan_round(0, list(range(3000)))
        print("ready", flush=True)
        while True:
            coord.save(p)
    """)
    rng = np.random.default_rng(0)
    for _ in range(30):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if path.exists():
            AlignmentCoordinator.load(path)          # never half a file
    leftovers = list(tmp_path.glob("state.json.*.tmp"))
    (tmp_path / "state.json.k1ll3d00.tmp").write_text("{half a fi")   # as a writer killed mid-write leaves
    AlignmentCoordinator.load(path).save(path)
    assert list(tmp_path.glob("state.json.*.tmp")) == []
    print(f"temporaries left by 30 kills before the next save: {len(leftovers)}")
