"""The problem model: conversion, validation messages, JSON round trip, the balanced helper."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from pydantic import ValidationError

from alignment_solver import AlignmentProblem, solve

from .conftest import small_problems

F = [[0.5, 0.2], [0.1, 0.9], [0.3, 0.3]]


def problem(**kw):
    fields = dict(fitness=F, capacity=1)
    fields.update(kw)
    return AlignmentProblem(**fields)


@pytest.mark.parametrize("kw, field, words", [
    (dict(fitness=[[0.1, float("nan")], [0, 0], [0, 0]]), "fitness", "finite"),
    (dict(fitness=[[0.1, float("inf")], [0, 0], [0, 0]]), "fitness", "finite"),
    (dict(fitness=[1.0, 2.0]), "fitness", "2-D"),
    (dict(fitness=[[1, 2], [3]]), "fitness", "rectangular"),
    (dict(fitness=[["a", "b"]]), "fitness", "numeric"),
    (dict(fitness=np.zeros((0, 3))), "fitness", "C >= 1"),
    (dict(capacity=-1), "capacity", ">= 0"),
    (dict(capacity=1.5), "capacity", "integers"),
    (dict(capacity=[1, 2]), "capacity", "shape (3,)"),
    (dict(capacity=True), "capacity", "not booleans"),
    (dict(min_experts=2), "min_experts", "<= capacity"),
    (dict(expert_min_load=[5, 1], expert_max_load=[2, 2]), "expert_min_load", "<= expert_max_load"),
    (dict(expert_min_load=-1), "expert_min_load", ">= 0"),
    (dict(expert_max_load=[1, 2, 3]), "expert_max_load", "shape (2,)"),
    (dict(load_weight=[-1, 1, 1]), "load_weight", ">= 0"),
    (dict(usage=[1, 1]), "usage", "without budget"),
    (dict(budget=[1, 1, 1]), "budget", "without usage"),
    (dict(usage=[1, 1], budget=[1, 1]), "budget", "shape (3,)"),
    (dict(allowed=[[1, 2], [0, 1], [1, 1]]), "allowed", "booleans"),
    (dict(previous=np.ones((2, 2), bool)), "previous", "shape (3, 2)"),
    (dict(switch_penalty=-0.5), "switch_penalty", ">= 0"),
    (dict(switch_penalty="high"), "switch_penalty", "number"),
    (dict(client_ids=["a", "b", "a"]), "client_ids", "'a' appears more than once"),
    (dict(expert_ids=["x"]), "expert_ids", "2 labels"),
    (dict(colour="red"), "colour", "Extra inputs"),
])
def test_bad_input_names_the_field(kw, field, words):
    with pytest.raises(ValidationError) as info:
        problem(**kw)
    text = str(info.value)
    assert field in text and words in text, text
    assert isinstance(info.value, ValueError)


def test_scalars_broadcast_and_arrays_are_read_only():
    p = problem(capacity=2, min_experts=[0, 1, 1], expert_max_load=2)
    assert p.capacity_array.tolist() == [2, 2, 2]
    assert p.max_load_array.tolist() == [2.0, 2.0]
    assert p.min_load_array.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        p.fitness[0, 0] = 5.0
    with pytest.raises(ValidationError):
        p.capacity = 3


def test_integral_floats_are_accepted_as_integers():
    assert problem(capacity=[1.0, 2.0, 0.0]).capacity_array.tolist() == [1, 2, 0]


def test_json_round_trip_keeps_every_field():
    p = problem(capacity=[1, 2, 1], min_experts=1, expert_min_load=[0, 1], expert_max_load=[2, np.inf],
                load_weight=[1, 2, 1], usage=[1.5, 2.0], budget=[2, 4, 2], allowed=[[1, 1], [1, 0], [1, 1]],
                previous=[[0, 1], [1, 0], [0, 0]], switch_penalty=0.25, client_ids=["a", "b", "c"],
                expert_ids=[10, 20])
    text = p.model_dump_json()
    json.loads(text.replace("Infinity", "1e999"))
    q = AlignmentProblem.model_validate_json(text)
    for name in AlignmentProblem.model_fields:
        a, b = getattr(p, name), getattr(q, name)
        assert np.array_equal(np.asarray(a), np.asarray(b)), name


@settings(max_examples=30, deadline=None)
@given(small_problems())
def test_json_round_trip_property(p):
    q = AlignmentProblem.model_validate_json(p.model_dump_json())
    assert np.array_equal(q.objective_matrix, p.objective_matrix)
    assert np.array_equal(q.capacity_array, p.capacity_array)
    assert np.array_equal(q.max_load_array, p.max_load_array)


def test_null_max_load_in_json_means_no_cap():
    q = AlignmentProblem.model_validate_json('{"fitness": [[1, 2]], "capacity": 1, "expert_max_load": [null, 3]}')
    assert q.max_load_array.tolist() == [np.inf, 3.0]


def test_malformed_json_is_a_validation_error():
    with pytest.raises(ValidationError):
        AlignmentProblem.model_validate_json('{"fitness": [[1, 2]], "capacity": ')


def test_balanced_builds_the_fair_band():
    fitness = np.zeros((10, 4))
    p = AlignmentProblem.balanced(fitness, capacity=2, tolerance=0.1)
    # fair = 10 * 2 / 4 = 5 -> 4.5 .. 5.5 rounded inwards: 5 .. 5
    assert p.min_load_array.tolist() == [5] * 4 and p.max_load_array.tolist() == [5] * 4
    wide = AlignmentProblem.balanced(fitness, capacity=2, tolerance=0.3)       # 3.5 .. 6.5 -> 4 .. 6
    assert wide.min_load_array.tolist() == [4] * 4 and wide.max_load_array.tolist() == [6] * 4
    weighted = AlignmentProblem.balanced(fitness, capacity=1, tolerance=0.5, load_weight=np.full(10, 2.0))
    assert weighted.min_load_array[0] == pytest.approx(2.5) and weighted.max_load_array[0] == pytest.approx(7.5)
    with pytest.raises(ValueError, match="tolerance"):
        AlignmentProblem.balanced(fitness, capacity=1, tolerance=-1)


def test_switch_penalty_changes_the_objective_matrix():
    p = problem(previous=[[1, 0], [0, 0], [0, 1]], switch_penalty=0.5)
    assert p.objective_matrix.tolist() == [[0.5, -0.3], [-0.4, 0.4], [-0.2, 0.3]]
    assert p.is_flow
    assert not problem(load_weight=[1, 2, 1]).is_flow
    assert problem(load_weight=[1, 1, 1]).is_flow


def test_model_copy_revalidates_and_recomputes():
    p = problem(capacity=2, expert_min_load=0)
    assert p.min_load_array.tolist() == [0, 0]
    q = p.model_copy(update={"expert_min_load": 2})
    assert q.min_load_array.tolist() == [2, 2] and p.min_load_array.tolist() == [0, 0]
    with pytest.raises(ValidationError, match="min_experts"):
        p.model_copy(update={"min_experts": 3})


@pytest.mark.parametrize("C, E, k, tol", [(4, 4, 1, 0.2), (10, 4, 1, 0.1), (7, 3, 2, 0.0), (5, 8, 1, 0.5),
                                          (100, 7, 3, 0.05)])
def test_integer_band_is_inward_but_keeps_the_even_split(C, E, k, tol):
    """The band never counts an uneven plan as balanced and always admits floor(fair)..ceil(fair)."""
    p = AlignmentProblem.balanced(np.zeros((C, E)), capacity=k, tolerance=tol)
    fair = C * k / E
    lo, hi = p.min_load_array[0], p.max_load_array[0]
    assert lo <= np.floor(fair) and hi >= np.ceil(fair)
    assert lo >= min(np.ceil((1 - tol) * fair - 1e-9), np.floor(fair))
    assert hi <= max(np.floor((1 + tol) * fair + 1e-9), np.ceil(fair))
    if (C, E, k, tol) == (4, 4, 1, 0.2):
        assert (lo, hi) == (1, 1)       # the plan [0, 0, 2, 2] is no longer inside the band
        skewed = p.model_copy(update={"fitness": np.eye(4)[[2, 2, 3, 3]]})     # fitness wants loads [0, 0, 2, 2]
        assert solve(skewed).expert_load.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("field, value", [("fitness", [[1e300, 0.2]]), ("fitness", [[1e16, 0.0]]),
                                          ("switch_penalty", 1e16), ("load_weight", [1e16]),
                                          ("budget", [1e20]), ("expert_min_load", 1e16), ("capacity", 10 ** 12)])
def test_numbers_beyond_the_supported_range_are_refused_by_name(field, value):
    fields = {"fitness": [[1.0, 0.2]], "capacity": 1}
    if field == "budget":
        fields["usage"] = [1.0, 1.0]
    fields[field] = value
    with pytest.raises(ValidationError, match=rf"{field} must lie within \+-1e\+(15|09)"):
        AlignmentProblem(**fields)


def test_fitness_minus_switch_penalty_is_range_checked_too():
    with pytest.raises(ValidationError, match="fitness - switch_penalty must lie within"):
        AlignmentProblem(fitness=[[-9e14]], capacity=1, previous=[[False]], switch_penalty=9e14)


def test_labels_that_collide_as_json_keys_are_refused():
    with pytest.raises(ValidationError, match="client_ids must stay distinct as JSON keys; 1 and '1'"):
        AlignmentProblem(fitness=np.zeros((2, 2)), capacity=1, client_ids=[1, "1"])


@pytest.mark.parametrize("ids, words", [
    ([1, 2, 1], "1 appears more than once"), (["a", "b", "a"], "'a' appears more than once"),
    ([1, "2", "1"], "1 and '1' both become '1'"), ([True, 1, 3], "1 appears more than once"),
    ([2 ** 70, 5, 2 ** 70], "appears more than once")])
def test_vectorised_label_checks_refuse_the_same_duplicates(ids, words):
    with pytest.raises(ValidationError, match=f"client_ids .*{words}"):
        AlignmentProblem(fitness=np.zeros((3, 2)), capacity=1, client_ids=ids)


@pytest.mark.parametrize("ids", [["a", "a\x00", "b"], [2 ** 70, 5, 6], [1, "2", "x"], list(range(3))])
def test_vectorised_label_checks_accept_distinct_labels(ids):
    problem = AlignmentProblem(fitness=np.zeros((3, 2)), capacity=1, client_ids=ids)
    assert problem.client_ids == ids


def test_large_problem_validation_still_names_a_bad_value():
    """The (C, E) checks run as reductions first; a bad value is still found and named."""
    rng = np.random.default_rng(0)
    fitness = rng.random((3000, 16))
    for value, words in ((np.nan, "fitness must be finite; got nan at \\(client 2999, expert 7\\)"),
                         (-np.inf, "fitness must be finite; got -inf at \\(client 2999, expert 7\\)"),
                         (2e15, "fitness must lie within \\+-1e\\+15 .*got 2e\\+15 at index \\(2999, 7\\)")):
        bad = fitness.copy()
        bad[2999, 7] = value
        with pytest.raises(ValidationError, match=words):
            AlignmentProblem(fitness=bad, capacity=1)
    previous = np.zeros((3000, 16), dtype=bool)
    low = fitness.copy()
    low[10, 3] = -9.9e14
    with pytest.raises(ValidationError, match="fitness - switch_penalty must lie within .*client 10, expert 3"):
        AlignmentProblem(fitness=low, capacity=1, previous=previous, switch_penalty=2e13)
    given = fitness.copy()
    problem = AlignmentProblem(fitness=given, capacity=1, previous=previous, switch_penalty=0.5)
    given[0, 0] = 7.0                             # the problem keeps its own copy
    assert problem.fitness[0, 0] == fitness[0, 0] and not problem.fitness.flags.writeable
