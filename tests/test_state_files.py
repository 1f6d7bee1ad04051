"""State files and the CLI as operators script them: races, links, temporaries, limits, bad paths."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from alignment_solver import AlignmentCoordinator, CoordinatorConfig
from alignment_solver.errors import RoundError, StateError
from alignment_solver.state import locked, write_atomic

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "alignment_solver.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def fresh(path, experts=4):
    AlignmentCoordinator(experts).save(path)
    return path


def test_plain_load_save_from_two_processes_loses_nothing_silently(tmp_path):
    """Each process loads, advances one round and saves, 30 times, without session(): every save
    either lands on the latest state or raises StateError (then it reloads); nothing is lost."""
    path = fresh(tmp_path / "s.json")
    worker = textwrap.dedent(f"""
        from alignment_solver import AlignmentCoordinator
        from alignment_solver.errors import StateError
        saved = refused = 0
        while saved < 30:
            coord = AlignmentCoordinator.load({str(path)!r})
            r = coord.last_round + 1
            coord.plan_round(r, ["a", "b"])
            coord.observe_round(r, [])
            try:
                coord.save({str(path)!r})
                saved += 1
            except StateError:
                refused += 1
        print(saved, refused)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    saved = sum(int(o[0]) for o in outs)
    final = AlignmentCoordinator.load(path)
    assert final.last_round + 1 == saved == 60            # every successful save advanced the file by one round


def test_save_refuses_a_file_it_never_loaded_or_that_changed(tmp_path):
    path = fresh(tmp_path / "s.json")
    a, b = AlignmentCoordinator.load(path), AlignmentCoordinator.load(path)
    a.save(path)
    with pytest.raises(StateError, match="generation 2, but it loaded generation 1"):
        b.save(path)
    with pytest.raises(StateError, match="never loaded"):
        AlignmentCoordinator(4).save(path)
    a.save(path)                                          # the writer that is up to date goes on


def test_a_link_and_its_target_share_one_lock_and_the_link_stays_a_link(tmp_path):
    target = fresh(tmp_path / "real.json")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with locked(link):
        with pytest.raises(StateError, match="locked by another"):
            subprocess_lock(target)
    with AlignmentCoordinator.session(link) as coord:
        coord.plan_round(0, ["a"])
    assert link.is_symlink() and AlignmentCoordinator.load(target).pending["round"] == 0


def subprocess_lock(path):
    code = (f"from alignment_solver.state import locked\nwith locked({str(path)!r}, timeout=0.2):\n    pass")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise StateError(out.stderr.strip().splitlines()[-1])


def test_saving_a_file_removes_only_its_own_temporaries(tmp_path):
    other = tmp_path / "p.json.b.abcdefgh.tmp"             # in flight for p.json.b
    mine = tmp_path / "p.json.k1ll3d00.tmp"                 # left by a killed writer of p.json
    other.write_text("{")
    mine.write_text("{")
    write_atomic(tmp_path / "p.json", "{}")
    assert other.exists() and not mine.exists()


@pytest.mark.parametrize("config", [{"capacity": {"window": 10 ** 12}}, {"tolerance": float("inf")},
                                    {"deadline": float("inf")}, {"time_limit": float("nan")},
                                    {"scorer": {"beta": float("nan")}}])
def test_configs_refuse_values_that_would_fail_later(config):
    with pytest.raises(ValidationError):
        CoordinatorConfig.model_validate(config)


@pytest.mark.parametrize("bad", [-1, True, 2 ** 63, 2 ** 53])
def test_round_numbers_out_of_range_are_round_errors(bad):
    with pytest.raises(RoundError, match=r"round must be an integer in \[0, 2\*\*53\)"):
        AlignmentCoordinator(2).plan_round(bad, ["a"])


def test_a_late_round_and_grown_counters_still_load(tmp_path):
    path = tmp_path / "s.json"
    coord = AlignmentCoordinator(2)

    def round_trip(c, r):
        plan = c.plan_round(r, ["a"])
        c.observe_round(r, [{"client_id": "a", "experts": [{"expert": e, "mean_loss": 1.0, "accuracy": 0.5}
                                                           for e in plan.experts_of("a")]}])
    round_trip(coord, 10 ** 9)
    coord.profiler.slot[:] = 10 ** 9
    coord.save(path)
    again = AlignmentCoordinator.load(path)
    round_trip(again, 10 ** 9 + 1)
    again.save(path)
    assert AlignmentCoordinator.load(path).last_round == 10 ** 9 + 1


@pytest.mark.parametrize("text, words", [("[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
                                         ('{"version": ' + "9" * 5000 + "}", "not valid JSON")])
def test_hostile_json_is_a_state_error(tmp_path, text, words):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(StateError, match=words):
        AlignmentCoordinator.load(path)


def test_a_non_ascii_digit_key_is_a_state_error(tmp_path):
    coord = AlignmentCoordinator(2)
    coord.plan_round(0, ["a"])
    state = coord.state()
    state["pending"]["experts"] = {"\u00b2": [0]}           # superscript two: isdigit() but not int()
    with pytest.raises(StateError, match="keys are client rows"):
        AlignmentCoordinator.from_state(state)


def test_cli_refuses_hostile_input_without_a_traceback(tmp_path):
    state = fresh(tmp_path / "s.json")
    deep = "[" * 100_000 + "]" * 100_000
    for args in (("solve", "-"), ("plan", "--state", state, "--clients", "-")):
        out = cli(*args, stdin=deep)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "too deeply" in out.stderr, out.stderr
    out = cli("plan", "--state", state, "--clients", "-", stdin="[true, false]")
    assert out.returncode == 2 and "not a boolean" in out.stderr and "Traceback" not in out.stderr
    out = cli("plan", "--state", state, "--clients", "-", "--lock-timeout", "-1", stdin='["a"]')
    assert out.returncode == 2 and "seconds >= 0" in out.stderr


@pytest.mark.parametrize("where", ["dir", "missing"])
def test_cli_checks_the_output_path_before_anything_changes(tmp_path, where):
    state = fresh(tmp_path / "s.json")
    before = state.read_text()
    output = tmp_path if where == "dir" else tmp_path / "no" / "plan.json"
    problem = tmp_path / "p.json"
    problem.write_text(json.dumps({"fitness": [[1.0, 0.5]], "capacity": 1}))
    for args in (("solve", problem, "-o", output), ("plan", "--state", state, "--clients", "-", "-o", output),
                 ("observe", "--state", state, "--reports", "-", "-o", output)):
        out = cli(*args, stdin='["a"]' if "plan" in args else "[]")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "directory" in out.stderr or "does not exist" in out.stderr
    assert state.read_text() == before
    out = cli("plan", "--state", state, "--clients", "-", stdin='["a"]')       # the next plan still works
    assert out.returncode == 0, out.stderr
    assert os.path.exists(state)
