"""State files and the CLI as operators script them: races, links, temporaries, limits, bad paths."""

import contextlib
import json
import os
import shutil
import socket
import stat
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


# ---- regular files only: FIFOs, devices, sockets, directories and links ---------------------
def _special(tmp_path, kind):
    """A real node of ``kind`` in ``tmp_path`` (the character device has /dev/null's numbers but
    lives here: nothing points at the machine's own /dev/null)."""
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("mknod of a character device needs root")
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:
        path.mkdir()
    return path


KINDS = {"fifo": ("FIFO", stat.S_ISFIFO), "chardev": ("character device", stat.S_ISCHR),
         "socket": ("socket", stat.S_ISSOCK), "dir": ("directory", stat.S_ISDIR)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_cli_output_refuses_what_is_not_a_regular_file_before_anything_changes(tmp_path, kind):
    node = _special(tmp_path, kind)
    words, test = KINDS[kind]
    state = fresh(tmp_path / "s.json")
    before = state.read_text()
    problem = tmp_path / "p.json"
    problem.write_text(json.dumps({"fitness": [[1.0, 0.5]], "capacity": 1}))
    for args in (("solve", problem, "-o", node), ("plan", "--state", state, "--clients", "-", "-o", node),
                 ("observe", "--state", state, "--reports", "-", "-o", node)):
        out = cli(*args, stdin='["a"]' if "plan" in args else "[]")
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"output {node} is a" in out.stderr and words in out.stderr and out.stdout == ""
        assert test(os.lstat(node).st_mode), "the node was replaced"
    assert state.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kind, "p.json", "s.json", "s.json.lock"])


def test_cli_output_through_a_link_writes_its_target_and_keeps_its_mode(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    problem = tmp_path / "p.json"
    problem.write_text(json.dumps({"fitness": [[1.0, 0.5]], "capacity": 1}))
    out = cli("solve", problem, "-o", link)
    assert out.returncode == 0, out.stderr
    assert link.is_symlink() and json.loads(target.read_text())["status"] == "optimal"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    fifo_link = tmp_path / "fifo-link"
    fifo_link.symlink_to(_special(tmp_path, "fifo"))
    out = cli("solve", problem, "-o", fifo_link)
    assert out.returncode == 2 and "a symbolic link to" in out.stderr and "FIFO" in out.stderr, out.stderr
    assert stat.S_ISFIFO(os.stat(fifo_link).st_mode) and fifo_link.is_symlink()
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere" / "x.json")
    out = cli("solve", problem, "-o", dangling)
    assert out.returncode == 2 and "dangling symbolic link" in out.stderr and "nowhere" in out.stderr, out.stderr


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_paths_refuse_what_is_not_a_regular_file(tmp_path, kind):
    node = _special(tmp_path, kind)
    words, test = KINDS[kind]
    coord = AlignmentCoordinator(2)
    with pytest.raises(StateError, match=f"state file {node} is a {words}"):
        coord.save(node)
    with pytest.raises(StateError, match=f"state file {node} is a {words}"):
        with AlignmentCoordinator.session(node, num_experts=2):
            pass
    with pytest.raises(StateError, match=f"state file {node} is a {words}"):
        write_atomic(node, "{}")
    assert test(os.lstat(node).st_mode)
    out = cli("plan", "--state", node, "--clients", "-", stdin='["a"]')
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = cli("init", "--state", node, "--experts", "2", "--force")
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert test(os.lstat(node).st_mode), "the node was replaced"


def test_a_dangling_state_link_is_a_state_error_naming_it(tmp_path):
    link = tmp_path / "x.json"
    link.symlink_to(tmp_path / "nowhere" / "x.json")
    for attempt in (lambda: AlignmentCoordinator(2).save(link),
                    lambda: AlignmentCoordinator.session(link, num_experts=2).__enter__()):
        with pytest.raises(StateError, match=f"state file {link} is a dangling symbolic link: folder "
                                             f"{tmp_path / 'nowhere'} does not exist"):
            attempt()
    for args in (("init", "--state", link, "--experts", "2"), ("plan", "--state", link, "--clients", "-")):
        out = cli(*args, stdin='["a"]')
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "dangling symbolic link" in out.stderr, \
            out.stderr
    assert not (tmp_path / "nowhere").exists()


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` made read-only for this process: immutable as root (permissions do not stop root)."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("cannot make a folder read-only for root here (chattr +i)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_a_read_only_state_folder_is_a_state_error_naming_the_file(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    state = fresh(folder / "s.json")
    before = state.read_text()
    with _read_only(folder):
        out = cli("plan", "--state", state, "--clients", "-", stdin='["a"]')
        with pytest.raises(StateError, match=f"cannot write state file {state}"):
            with AlignmentCoordinator.session(state) as coord:
                coord.plan_round(0, ["a"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"state file {state}" in out.stderr and "None" not in out.stderr
    assert out.stdout == ""                                  # no plan printed that was not saved
    assert state.read_text() == before
