"""solve() arguments, backend lookup, and the result object's contract."""

import json

import numpy as np
import pytest

from alignment_solver import (AlignmentProblem, AlignmentResult, BackendUnavailableError, InvalidOptionError,
                              NoSolutionError, SolveStatus, UnknownBackendError, UnsupportedProblemError,
                              available_backends, solve)
from alignment_solver.instances import random_problem


@pytest.fixture
def p():
    return random_problem(20, 4, seed=0)


def test_unknown_backend_lists_the_valid_names(p):
    with pytest.raises(UnknownBackendError) as info:
        solve(p, backend="gurobi")
    text = str(info.value)
    for name in ("auto", "flow", "cpsat", "pulp_cbc", "pulp_highs", "greedy", "'gurobi'"):
        assert name in text
    assert isinstance(info.value, ValueError)


def test_flow_refuses_budget_rows_and_weighted_loads():
    with pytest.raises(UnsupportedProblemError, match="budget"):
        solve(random_problem(10, 3, budget=True), backend="flow")
    weighted = AlignmentProblem(fitness=np.ones((3, 2)), capacity=1, load_weight=[1, 2, 3])
    with pytest.raises(UnsupportedProblemError, match="load_weight"):
        solve(weighted, backend="flow")


@pytest.mark.parametrize("kw, words", [
    (dict(time_limit=0), "time_limit"), (dict(time_limit="5"), "time_limit"), (dict(time_limit=float("nan")), "time_limit"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(soft="yes"), "soft"),
    (dict(soft_penalty=5.0), "only used with soft=True"), (dict(soft=True, soft_penalty=0), "soft_penalty"),
    (dict(options={"candidates": -2}), "'candidates'"), (dict(options={"threads": 4}), "valid options"),
    (dict(backend="cpsat", options={"workers": 0}), "'workers'"),
])
def test_bad_solve_arguments_are_named(p, kw, words):
    with pytest.raises(InvalidOptionError, match=words):
        solve(p, **kw)


def test_problem_type_is_checked():
    with pytest.raises(TypeError, match="AlignmentProblem"):
        solve(np.ones((3, 3)))
    assert solve({"fitness": [[1.0, 0.0]], "capacity": 1}).experts_of(0) == [0]


def test_result_contract(p):
    r = solve(p)
    assert r.status is SolveStatus.OPTIMAL and r.proven_optimal
    assert r.assignment.dtype == bool and r.assignment.shape == (20, 4)
    with pytest.raises(ValueError):
        r.assignment[0, 0] = True
    assert r.expert_load.tolist() == r.assignment.sum(axis=0).tolist()
    assert r.objective == pytest.approx(p.fitness[r.assignment].sum())
    assert r.bound >= r.objective and r.gap < 1e-9
    assert r.solve_seconds >= 0 and r.backend == "flow"
    assert r.experts_of(3) == np.flatnonzero(r.assignment[3]).tolist()
    with pytest.raises(KeyError, match="client_id 99"):
        r.experts_of(99)
    data = json.loads(r.model_dump_json())
    assert data["status"] == "optimal" and len(data["assignment"]) == 20
    again = AlignmentResult.model_validate_json(r.model_dump_json(), p)
    assert np.array_equal(again.assignment, r.assignment) and again.objective == r.objective


def test_labels_flow_through_the_result():
    p = AlignmentProblem(fitness=[[0.0, 1.0], [1.0, 0.0]], capacity=1, client_ids=["alice", "bob"],
                         expert_ids=["vision", "text"])
    r = solve(p)
    assert r.experts_of("alice") == ["text"] and r.experts_of("bob") == ["vision"]
    assert json.loads(r.model_dump_json())["experts"] == {"alice": ["text"], "bob": ["vision"]}


def test_result_without_solution_raises_on_read():
    p = AlignmentProblem(fitness=np.ones((2, 2)), capacity=1, expert_min_load=3)
    r = solve(p)
    assert r.status is SolveStatus.INFEASIBLE and not r.has_solution
    for read in (lambda: r.assignment, lambda: r.expert_load, lambda: r.experts_of(0), r.violations):
        with pytest.raises(NoSolutionError, match="infeasible"):
            read()
    assert json.loads(r.model_dump_json())["status"] == "infeasible"


def test_violations_check_every_constraint_independently():
    p = AlignmentProblem(fitness=np.ones((3, 2)), capacity=1, min_experts=1, expert_max_load=1,
                         usage=[2, 1], budget=[1, 5, 5], allowed=[[1, 1], [1, 0], [1, 1]])
    x = np.array([[1, 0], [1, 1], [0, 0]], bool)
    r = AlignmentResult(p, SolveStatus.FEASIBLE, "hand", assignment=x)
    text = "\n".join(r.violations())
    for words in ("client 1 trains 2 experts > capacity 1", "client 2 trains 0 experts < min_experts 1",
                  "expert 0 has load 2 > expert_max_load 1", "client 0 uses 2 > budget 1",
                  "client 1 trains expert 1, which is not allowed"):
        assert words in text


def test_missing_package_is_reported(monkeypatch):
    import alignment_solver.backends as registry

    monkeypatch.setitem(registry.REGISTRY, "pulp_cbc", ("alignment_solver.backends.pulp_cbc", "PulpCbcBackend",
                                                        ("no_such_package_xyz",)))
    assert "pulp_cbc" not in available_backends()
    with pytest.raises(BackendUnavailableError, match="no_such_package_xyz"):
        solve(random_problem(5, 2), backend="pulp_cbc")


def test_the_pulp_backends_use_no_deprecated_pulp_api():
    """In-process (the solve itself runs in a worker, out of pytest's sight): PuLP 4.0-style calls only."""
    import warnings

    pytest.importorskip("pulp")
    from alignment_solver.backends import get_backend
    from alignment_solver.backends.base import SolveRequest
    from alignment_solver.instances import random_problem

    problem = random_problem(20, 4, seed=0, budget=True)
    for name in ("pulp_cbc", "pulp_highs"):
        if name not in available_backends():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            result = get_backend(name).solve(problem, SolveRequest(time_limit=None, seed=0, soft=False, soft_penalty=1.0))
        assert result.status.value == "optimal", name


@pytest.mark.parametrize("limit", [1e10, 1e308, float("inf"), 10 ** 400, np.float64(1e300), 9.99e6, 1e7])
@pytest.mark.parametrize("backend", ["auto", "cpsat"])
def test_a_time_limit_too_large_to_matter_means_no_limit(limit, backend):
    """Beside 9.99e6 s (a real limit, waited for in slices), every one of these used to overflow."""
    r = solve(AlignmentProblem(fitness=[[1.0]], capacity=1), backend=backend, time_limit=limit)
    assert r.status is SolveStatus.OPTIMAL
    if limit >= 1e7:
        assert r.stats["isolation"] == "in-process" and r.stats["deterministic"] is True


@pytest.mark.parametrize("limit", [-1, -float("inf"), float("nan"), True])
def test_a_time_limit_must_be_positive(limit):
    with pytest.raises(InvalidOptionError, match=r"time_limit must be None or a number of seconds > 0.*got"):
        solve(AlignmentProblem(fitness=[[1.0]], capacity=1), time_limit=limit)
