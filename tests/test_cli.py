"""The command line, run as a user would: a subprocess with the installed console script."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alignment_solver import AlignmentProblem
from alignment_solver.instances import random_problem


def run(*args, stdin=None):
    exe = shutil.which("alignment-solver")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "alignment_solver.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=120)


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "problem.json"
    path.write_text(random_problem(50, 4, seed=1).model_dump_json())
    return path


def test_solve_writes_the_result(problem_file, tmp_path):
    out = tmp_path / "result.json"
    proc = run("solve", str(problem_file), "-o", str(out), "--loads")
    assert proc.returncode == 0, proc.stderr
    assert "status=optimal" in proc.stdout and "backend=flow" in proc.stdout and "load=" in proc.stdout
    data = json.loads(out.read_text())
    assert data["status"] == "optimal" and len(data["assignment"]) == 50


def test_solve_with_backend_and_time_limit(problem_file):
    proc = run("solve", str(problem_file), "--backend", "cpsat", "--time-limit", "10", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "backend=cpsat" in proc.stdout


def test_solve_from_stdin(problem_file):
    proc = run("solve", "-", stdin=problem_file.read_text())
    assert proc.returncode == 0 and "status=optimal" in proc.stdout


def test_invalid_problem_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fitness": [[1, 2], [3, 4]], "capacity": [1, -1]}))
    proc = run("solve", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "capacity" in proc.stderr and ">= 0" in proc.stderr


@pytest.mark.parametrize("text", ['{"fitness": [[1, 2]], "capacity": ', "not json at all"])
def test_malformed_json_exits_2(tmp_path, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    proc = run("solve", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"problem file {bad} is not valid JSON" in proc.stderr


def test_missing_file_and_bad_backend(tmp_path, problem_file):
    assert run("solve", str(tmp_path / "nope.json")).returncode == 2
    proc = run("solve", str(problem_file), "--backend", "gurobi")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run("solve", str(problem_file), "--backend", "flow", "--soft-penalty", "3")
    assert proc.returncode == 2 and "soft_penalty" in proc.stderr


def test_infeasible_exits_1_with_the_reason(tmp_path):
    p = AlignmentProblem(fitness=np.ones((3, 2)), capacity=1, expert_min_load=[2, 2], expert_ids=["a", "b"])
    path = tmp_path / "p.json"
    path.write_text(p.model_dump_json())
    proc = run("solve", str(path))
    assert proc.returncode == 1
    assert "status=infeasible" in proc.stdout and "need at least 4 client slots" in proc.stderr
    soft = run("solve", str(path), "--soft")
    assert soft.returncode == 0 and "band_miss=1" in soft.stdout


def test_demo_and_backends_and_help():
    demo = run("demo")
    assert demo.returncode == 0 and "status=optimal" in demo.stdout and "greedy baseline" in demo.stdout
    listing = run("backends")
    assert listing.returncode == 0 and "flow" in listing.stdout and "available" in listing.stdout
    helptext = run("solve", "--help").stdout
    for flag in ("--output", "--backend", "--time-limit", "--seed", "--soft", "--soft-penalty", "--loads"):
        assert flag in helptext


def test_coordinator_through_files(tmp_path):
    state = tmp_path / "state.json"
    assert run("init", "--state", str(state), "--experts", "3").returncode == 0
    assert run("init", "--state", str(state), "--experts", "3").returncode == 2          # refuses to overwrite
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps([{"client_id": "a", "max_experts": 2}, "b", "c"]))
    plan_path = tmp_path / "plan.json"
    proc = run("plan", "--state", str(state), "--clients", str(clients), "-o", str(plan_path))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(plan_path.read_text())
    assert plan["round"] == 0 and {c["client_id"] for c in plan["clients"]} == {"a", "b", "c"}
    reports = [{"client_id": c["client_id"], "train_seconds": 2.0,
                "experts": [{"expert": e, "samples": 5, "mean_loss": 0.4, "accuracy": 0.8} for e in c["experts"]]}
               for c in plan["clients"]]
    proc = run("observe", "--state", str(state), "--reports", "-", stdin=json.dumps(reports))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["round"] == 0 and sorted(summary["reported"]) == ["a", "b", "c"]
    again = run("plan", "--state", str(state), "--clients", str(clients))
    assert json.loads(again.stdout)["round"] == 1
    bad = run("observe", "--state", str(state), "--reports", "-",
              stdin=json.dumps([{"client_id": "zz", "experts": []}]))
    assert bad.returncode == 2 and "'zz' was not planned" in bad.stderr
    (tmp_path / "broken.json").write_text("{")
    proc = run("plan", "--state", str(tmp_path / "broken.json"), "--clients", str(clients))
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


@pytest.mark.parametrize("data, words", [
    ({"fitness": [[1e308, 0.2], [0.1, 0.3]], "capacity": 1}, ["fitness", "1e+15", "got 1e+308"]),
    ({"fitness": [[1, 0], [0, 1]], "capacity": 1, "previous": [[1, 0], [0, 1]], "switch_penalty": 1e308},
     ["switch_penalty", "1e+15", "got 1e+308"]),
    ({"fitness": [[1, 0], [0, 1]], "capacity": 1e30}, ["capacity", "1e+09", "got 1e+30"]),
])
def test_out_of_range_numbers_are_one_line_errors(tmp_path, data, words):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    one_line_error(run("solve", str(path)), *words)


def test_bad_paths_and_options_are_one_line_errors(tmp_path, problem_file):
    one_line_error(run("solve", str(tmp_path)), "is a directory")
    one_line_error(run("solve", str(problem_file), "--backend", "cpsat", "--seed", str(2 ** 31)),
                   "seed", "[0, 2147483647]", "got 2147483648")
    for name in ("../../x", str(tmp_path / "abs"), ".."):
        one_line_error(run("simulate", "--output", str(tmp_path / "runs"), "--name", name), "name", repr(name))
    assert not (tmp_path / "abs").exists() and not (tmp_path.parent / "x").exists()
    one_line_error(run("simulate", "--dataset", "npz"), "simulate config: dataset 'npz' needs npz_path")
    one_line_error(run("plan", "--state", str(tmp_path / "none.json"), "--clients", "-"),
                   "state file", "does not exist", "alignment-solver init")


def test_huge_load_weights_solve_on_cpsat(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"fitness": [[1.0, 0.5], [0.2, 0.9], [0.3, 0.3]], "capacity": 1,
                                "load_weight": [1.2345678e13, 1.0, 7.0], "expert_max_load": [1e15, 20]}))
    proc = run("solve", str(path), "--backend", "cpsat")
    assert proc.returncode == 0 and "status=optimal" in proc.stdout, proc.stderr


def test_plan_twice_needs_replan_and_corrupt_state_names_the_field(tmp_path):
    state = tmp_path / "state.json"
    run("init", "--state", str(state), "--experts", "3")
    assert run("plan", "--state", str(state), "--clients", "-", stdin='["a", "b"]').returncode == 0
    one_line_error(run("plan", "--state", str(state), "--clients", "-", stdin='["a", "b"]'),
                   "round 0 is planned and not observed", "--replan")
    assert run("plan", "--state", str(state), "--clients", "-", "--replan", stdin='["a"]').returncode == 0
    data = json.loads(state.read_text())
    data["held"] = [[-1], [0]]
    state.write_text(json.dumps(data))
    one_line_error(run("observe", "--state", str(state), "--reports", "-", stdin="[]"),
                   "state field held[0] (rows)[0] must lie in [0, 1]; got -1")


def without_train_extra(*args, cwd):
    """The CLI in a fresh interpreter where scikit-learn, matplotlib and PyYAML cannot be imported."""
    code = ("import sys; sys.modules.update(sklearn=None, matplotlib=None, yaml=None); "
            "from alignment_solver.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_simulate_without_the_train_extra_says_what_to_install(tmp_path):
    one_line_error(without_train_extra("simulate", cwd=tmp_path), "scikit-learn", "alignment-solver[train]")
    (tmp_path / "c.yaml").write_text("rounds: 2\n")
    one_line_error(without_train_extra("simulate", "--config", "c.yaml", cwd=tmp_path), "pyyaml", "[train]")
    proc = without_train_extra("simulate", "--dataset", "synthetic", "--rounds", "2", "--synthetic-samples", "500",
                               "--output", "runs", "--name", "s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "global acc" in proc.stdout and "plots skipped: matplotlib is not installed" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "s").iterdir()) == ["metrics.csv", "rounds.jsonl", "summary.json"]
    assert "\r" not in proc.stderr and proc.stderr.count("[") >= 2        # progress as lines without a TTY


def test_every_simulate_option_has_a_flag():
    from alignment_solver.cli import build_parser
    from alignment_solver.training.simulate import SimConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["simulate"]
    dests = {a.dest for a in sub._actions}
    assert set(SimConfig.model_fields) <= dests, set(SimConfig.model_fields) - dests


@pytest.mark.parametrize("limit", ["1e308", "inf", "1e10"])
def test_a_time_limit_too_large_to_matter_solves_without_a_limit(problem_file, limit):
    proc = run("solve", str(problem_file), "--time-limit", limit)      # flow: cpsat takes a minute unlimited
    assert proc.returncode == 0 and "status=optimal" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("limit", ["0", "-1", "nan", "soon"])
def test_a_time_limit_must_be_a_positive_number(problem_file, limit):
    proc = run("solve", str(problem_file), "--time-limit", limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]        # argparse prints the usage line first
    assert "--time-limit" in error and "seconds > 0" in error and f"got '{limit}'" in error, error


def test_a_lock_timeout_too_large_to_matter_waits_without_a_limit(tmp_path):
    state = tmp_path / "s.json"
    assert run("init", "--state", str(state), "--experts", "2").returncode == 0
    for timeout in ("1e308", "inf"):
        proc = run("plan", "--state", str(state), "--clients", "-", "--lock-timeout", timeout, "--replan",
                   stdin='["a"]')
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
