"""The round coordinator: plans, reports, faults, persistence, and a closed loop with known truth."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment_solver import SolveStatus
from alignment_solver.backends.base import Backend
from alignment_solver.coordinator import AlignmentCoordinator, CoordinatorConfig, ReportError, RoundError, StateError
from alignment_solver.result import AlignmentResult
from alignment_solver.rounds import RoundPlan
from alignment_solver.training.strategies import make_assign


def reports_for(plan, accuracy, rng=None, finished=True, seconds=1.0):
    out = []
    for pc in plan.clients:
        out.append({"client_id": pc.client_id, "finished": finished, "train_seconds": seconds,
                    "experts": [{"expert": e, "samples": 10, "mean_loss": float(1 - accuracy[pc.client_id, e]),
                                 "accuracy": float(accuracy[pc.client_id, e])} for e in pc.experts]})
    return out


def run_rounds(coord, clients, accuracy, rounds, start=0):
    for r in range(start, start + rounds):
        plan = coord.plan_round(r, clients)
        coord.observe_round(r, reports_for(plan, accuracy))
    return coord


@pytest.fixture
def accuracy():
    return np.random.default_rng(7).random((60, 4))


def test_plan_respects_the_problem_it_built(accuracy):
    coord = run_rounds(AlignmentCoordinator(4), list(range(20)), accuracy, 3)
    plan = coord.plan_round(3, list(range(20)))
    result = plan.result
    assert isinstance(result, AlignmentResult) and result.status is SolveStatus.OPTIMAL
    assert [v for v in result.violations() if "_load" not in v] == []
    for pc in plan.clients:
        assert len(pc.experts) <= pc.capacity
        assert pc.experts == result.experts_of(pc.client_id)
    assert RoundPlan.model_validate_json(plan.model_dump_json()).clients == plan.clients


def snapshot(coord):
    return json.dumps(coord.state(), sort_keys=True)


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r.append({"client_id": 999, "experts": []}), "999 was not planned"),
    (lambda r: r.append(dict(r[0])), "reported more than once"),
    (lambda r: r[0]["experts"].append({"expert": 3 if 3 not in [e["expert"] for e in r[0]["experts"]] else 2,
                                       "mean_loss": 0.1, "accuracy": 0.5}), "which it was not assigned"),
    (lambda r: r[0]["experts"].append({"expert": 17, "mean_loss": 0.1, "accuracy": 0.5}), "experts are 0..3"),
    (lambda r: r[0]["experts"][0].update(mean_loss=float("nan")), "mean_loss"),
    (lambda r: r[0]["experts"][0].update(mean_loss=-1.0), "mean_loss"),
    (lambda r: r[0]["experts"][0].update(accuracy=1.5), "accuracy"),
    (lambda r: r[0].update(train_seconds=-3.0), "train_seconds"),
    (lambda r: r[0].update(routing=[1, 2]), "routing must have 4 entries"),
    (lambda r: r[0].update(colour="red"), "colour"),
])
def test_bad_reports_are_rejected_and_change_nothing(accuracy, mutate, words):
    coord = run_rounds(AlignmentCoordinator(4), list(range(8)), accuracy, 2)
    plan = coord.plan_round(2, list(range(8)))
    reports = reports_for(plan, accuracy)
    mutate(reports)
    before = snapshot(coord)
    with pytest.raises(ReportError, match=words):
        coord.observe_round(2, reports)
    assert snapshot(coord) == before
    coord.observe_round(2, reports_for(plan, accuracy))           # the round can still be observed


def test_observe_needs_an_open_plan(accuracy):
    coord = AlignmentCoordinator(4)
    with pytest.raises(RoundError, match="no open plan"):
        coord.observe_round(0, [])
    coord.plan_round(0, [1, 2])
    with pytest.raises(RoundError, match="round 1 has no open plan"):
        coord.observe_round(1, [])


def test_half_the_clients_drop_out(accuracy):
    coord = run_rounds(AlignmentCoordinator(4), list(range(10)), accuracy, 2)
    plan = coord.plan_round(2, list(range(10)))
    kept = [r for r in reports_for(plan, accuracy) if r["client_id"] % 2 == 0]
    n_before = coord.scorer.N.copy()
    summary = coord.observe_round(2, kept)
    assert sorted(summary.dropouts) == [c for c in range(10) if c % 2 and plan.experts_of(c)]
    assert summary.reported == [r["client_id"] for r in kept]
    changed = np.flatnonzero((coord.scorer.N != n_before).any(axis=1))
    assert set(changed.tolist()) == {c for c in range(0, 10, 2) if plan.experts_of(c)}
    assert sum(summary.expert_clients) == sum(len(plan.experts_of(c)) for c in range(0, 10, 2))
    for c in summary.dropouts:
        assert coord.profiler.limit[c] >= 1 and coord.profiler.streak[c] == 0


def test_unfinished_clients_do_not_update_fitness(accuracy):
    coord = AlignmentCoordinator(4)
    plan = coord.plan_round(0, [0, 1, 2])
    reports = reports_for(plan, accuracy)
    reports[1]["finished"] = False
    summary = coord.observe_round(0, reports)
    assert summary.unfinished == [1] and coord.scorer.N[1].sum() == 0


def test_clients_arriving_in_round_50(accuracy):
    coord = run_rounds(AlignmentCoordinator(4), list(range(10)), accuracy, 50)
    plan = coord.plan_round(50, list(range(15)))
    assert [pc.capacity for pc in plan.clients[10:]] == [1] * 5      # safe default for the newcomers
    assert all(plan.experts_of(c) for c in range(10, 15))
    summary = coord.observe_round(50, reports_for(plan, accuracy))
    assert len(summary.reported) == 15


def test_routing_histogram_is_the_cold_start_prior():
    coord = AlignmentCoordinator(3, config=CoordinatorConfig(scorer={"exploration": 0}, switch_penalty=0))
    plan = coord.plan_round(0, [{"client_id": "a", "routing": [0, 10, 0]}, {"client_id": "b", "routing": [10, 0, 0]},
                                {"client_id": "c", "routing": [0, 0, 10]}])
    assert (plan.experts_of("a"), plan.experts_of("b"), plan.experts_of("c")) == ([1], [0], [2])


def test_save_load_plans_exactly_the_same(tmp_path, accuracy):
    coord = run_rounds(AlignmentCoordinator(4), list(range(12)), accuracy, 6)
    coord.save(tmp_path / "state.json")
    again = AlignmentCoordinator.load(tmp_path / "state.json", num_experts=4)
    assert snapshot(again) == snapshot(coord)
    a = coord.plan_round(6, list(range(14)))
    b = again.plan_round(6, list(range(14)))
    assert a.model_dump(exclude={"solve_seconds"}) == b.model_dump(exclude={"solve_seconds"})


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sets(st.integers(0, 14), min_size=1), st.floats(0, 1)), min_size=1, max_size=5))
def test_state_round_trips_exactly(history):
    coord = AlignmentCoordinator(3)
    acc = np.random.default_rng(1).random((15, 3))
    for r, (clients, drop) in enumerate(history):
        plan = coord.plan_round(r, sorted(clients))
        reps = [rep for rep in reports_for(plan, acc) if (rep["client_id"] * 0.37) % 1 >= drop]
        coord.observe_round(r, reps)
    restored = AlignmentCoordinator.from_state(json.loads(json.dumps(coord.state())))
    assert snapshot(restored) == snapshot(coord)


def test_same_history_same_plans(accuracy):
    a = run_rounds(AlignmentCoordinator(4, config=CoordinatorConfig(seed=3)), list(range(30)), accuracy, 5)
    b = run_rounds(AlignmentCoordinator(4, config=CoordinatorConfig(seed=3)), list(range(30)), accuracy, 5)
    assert snapshot(a) == snapshot(b)


def test_corrupt_or_foreign_state_files(tmp_path, accuracy):
    coord = run_rounds(AlignmentCoordinator(4), list(range(5)), accuracy, 1)
    path = tmp_path / "s.json"
    coord.save(path)
    with pytest.raises(StateError, match="4 experts, not 8"):
        AlignmentCoordinator.load(path, num_experts=8)
    path.write_text(path.read_text()[:100])
    with pytest.raises(StateError, match="not valid JSON"):
        AlignmentCoordinator.load(path)
    state = coord.state()
    state["scorer"]["Q"] = state["scorer"]["Q"][:2]
    with pytest.raises(StateError, match=r"scorer.Q must be a \(5, 4\) array; got shape \(2, 4\)"):
        AlignmentCoordinator.from_state(state)
    state = coord.state()
    del state["monitor"]
    with pytest.raises(StateError, match="monitor is missing"):
        AlignmentCoordinator.from_state(state)


def test_a_crash_during_save_keeps_the_previous_file(tmp_path, accuracy, monkeypatch):
    coord = run_rounds(AlignmentCoordinator(4), list(range(5)), accuracy, 1)
    path = tmp_path / "s.json"
    coord.save(path)
    before = path.read_text()
    run_rounds(coord, list(range(5)), accuracy, 1, start=1)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StateError, match=r"cannot write state file .*s\.json: disk full"):
        coord.save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.json.lock"]   # the lock file stays


def test_bad_plan_arguments():
    coord = AlignmentCoordinator(3)
    with pytest.raises(ValueError, match="round"):
        coord.plan_round(-1, [1])
    with pytest.raises(ValueError, match="unique"):
        coord.plan_round(0, [1, 1])
    with pytest.raises(ValueError, match="deadline"):
        coord.plan_round(0, [1], deadline=-5)
    with pytest.raises(ValueError, match="num_experts"):
        AlignmentCoordinator(0)


def test_closed_loop_learns_the_true_affinities_and_keeps_the_band():
    """Synthetic clients whose best two experts are known; the scorer must find them."""
    rng = np.random.default_rng(0)
    C, E, tol = 120, 6, 0.1
    truth = np.full((C, E), 0.3)
    best = np.array([rng.choice(E, size=2, replace=False) for _ in range(C)])
    truth[np.arange(C)[:, None], best] = 0.9
    coord = AlignmentCoordinator(E, config=CoordinatorConfig(tolerance=tol, scorer={"exploration": 0.1}))
    cvs = []
    for r in range(30):
        plan = coord.plan_round(r, [{"client_id": c, "max_experts": 2} for c in range(C)])
        cvs.append(plan.planned_cv)
        noisy = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
        coord.observe_round(r, reports_for(plan, noisy))
    top2 = np.argsort(-coord.scorer.Q, axis=1)[:, :2]
    hits = np.mean([set(top2[c]) == set(best[c]) for c in range(C)])
    assert hits >= 0.9, hits
    assert max(cvs[3:]) <= tol + 1e-9, cvs
    summary_cv = coord.monitor.stats()["cv_cumulative"]
    assert summary_cv <= tol


class NothingBackend(Backend):
    """A fake backend that never finds anything (as a solver out of time would)."""

    name = "nothing"

    def solve(self, problem, request):
        return AlignmentResult(problem, SolveStatus.NO_SOLUTION_FOUND, self.name, explanation="out of time")


def test_a_round_goes_ahead_when_the_solver_finds_nothing(accuracy, monkeypatch):
    import alignment_solver.backends as registry

    monkeypatch.setitem(registry.REGISTRY, "nothing", ("tests.test_coordinator", "NothingBackend", ()))
    config = CoordinatorConfig(backend="nothing", expert_memory=[1.0, 2.0, 1.0, 2.0],
                               capacity={"default_capacity": 2, "max_capacity": 2})
    clients = [{"client_id": c, "memory": 3.0} for c in range(40)]
    plan = AlignmentCoordinator(4, config=config).plan_round(0, clients)
    assert plan.backend == "greedy" and "nothing: no_solution_found (out of time)" in plan.explanation
    assert sum(plan.planned_load) > 0 and [v for v in plan.result.violations() if "_load" not in v] == []
    off = AlignmentCoordinator(4, config=config.model_copy(update={"fallback": "none"}))
    assert sum(off.plan_round(0, clients).planned_load) == 0


def test_probes_measure_untried_experts_on_the_trained_scale(tmp_path):
    """Each planned client is asked to probe the experts it measured least; probe scores enter
    fitness like trained ones, a probe it was not asked for is refused, and the state keeps the
    pending probes across save/load."""
    truth = np.array([[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9]])
    coord = AlignmentCoordinator(4, config=CoordinatorConfig(probes=2, tolerance=1.0, scorer={"exploration": 0}))
    plan = coord.plan_round(0, [0, 1])
    for pc in plan.clients:
        assert len(pc.probe) == 2 and not set(pc.probe) & set(pc.experts)
    coord.save(tmp_path / "s.json")
    coord = AlignmentCoordinator.load(tmp_path / "s.json")
    bad = reports_for(plan, truth)
    other = next(e for e in range(4) if e not in plan.clients[0].probe + plan.clients[0].experts)
    bad[0]["probes"] = [{"expert": other, "mean_loss": 0.1, "accuracy": 0.9}]
    with pytest.raises(ReportError, match="not asked for"):
        coord.observe_round(0, bad)
    for r in range(4):
        plan = plan if r == 0 else coord.plan_round(r, [0, 1])
        reps = reports_for(plan, truth)
        for rep, pc in zip(reps, plan.clients):
            rep["probes"] = [{"expert": e, "mean_loss": 0.5, "accuracy": float(truth[pc.client_id, e])}
                             for e in pc.probe]
        coord.observe_round(r, reps)
    assert (coord.scorer.N > 0).all()                             # every pair measured
    assert coord.scorer.Q == pytest.approx(truth)                 # first scores replace the prior


def test_expert_cost_sizes_plans_to_demand():
    """With an expert cost, a client gets only the experts worth it (at least min_experts); the
    band's upper end follows that demand and its lower end is 0, so experts may idle."""
    E = 8
    coord = AlignmentCoordinator(E, config=CoordinatorConfig(expert_cost=0.5, capacity={"max_capacity": 3,
                                                                                       "default_capacity": 3},
                                                             scorer={"exploration": 0}, switch_penalty=0))
    coord._ensure(list(range(4)))
    coord.scorer.Q[:] = 0.1
    coord.scorer.N[:] = 1
    for c in range(4):
        coord.scorer.Q[c, c] = 0.9                  # every client is worth its own expert
    coord.scorer.Q[0, 5] = 0.8                      # client 0 is worth a second one
    plan = coord.plan_round(0, list(range(4)))
    assert {pc.client_id: pc.experts for pc in plan.clients} == {0: [0, 5], 1: [1], 2: [2], 3: [3]}
    assert plan.planned_load == [1, 1, 1, 1, 0, 1, 0, 0]          # 5 pairs, not the 12 of full capacity
    assert plan.expert_min_load == [0.0] * E and plan.expert_max_load == [1.0] * E
    greedy = make_assign("greedy", np.random.default_rng(0))(coord.build_problem(1, np.arange(4), None))
    assert greedy.sum(axis=1).tolist() == [2, 1, 1, 1]            # the greedy baseline is demand-sized too


def test_each_round_is_warm_started_from_the_last_and_keeps_the_optimum():
    """The coordinator passes its last result as the warm start (issue 38): the flow backend
    uses its potentials on the priced working set, and the plan is still proven optimal, with
    the objective of a cold solve of the same problem."""
    from alignment_solver import solve

    truth = np.random.default_rng(3).random((2000, 32))
    clients = list(range(2000))
    warm = AlignmentCoordinator(32)
    cold = AlignmentCoordinator(32, config=CoordinatorConfig(warm_start=False))
    for r in range(3):
        a, b = warm.plan_round(r, clients), cold.plan_round(r, clients)
        assert a.status == b.status == "optimal"
        assert ("warm_start" in a.result.stats) == (r > 0) and "warm_start" not in b.result.stats
        if r:           # equally good plans may differ at ties, so each coordinator has its own history
            assert a.result.stats["warm_start"] == {"prices": True, "clients": 2000}
            assert solve(a.result.problem, soft=True).objective == pytest.approx(a.objective, rel=1e-9)
        warm.observe_round(r, reports_for(a, truth))
        cold.observe_round(r, reports_for(b, truth))
    assert warm.last_result is a.result
