"""The privacy floor (``expert_min_group``): every exact backend against brute force and scipy's
milp, the flow's branch and bound against CP-SAT on larger rounds, greedy-then-repair, the
checker, the explanation and the field's validation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment_solver import AlignmentProblem, SolveStatus, solve
from alignment_solver.errors import UnsupportedProblemError
from alignment_solver.instances import skewed_problem
from alignment_solver.result import AlignmentResult
from alignment_solver.solve import verified

from .conftest import EXACT, backends_for, small_problems
from .oracles import brute_force, scipy_milp, violations

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def floored(draw, general: bool = True):
    problem = draw(small_problems(general=general))
    C, E = problem.fitness.shape
    m = np.array(draw(st.lists(st.integers(0, C), min_size=E, max_size=E)))
    return problem.model_copy(update={"expert_min_group": m})


@SETTINGS
@given(floored())
def test_tiny_floors_match_brute_force_on_every_exact_backend(problem):
    expected = brute_force(problem)
    for backend in backends_for(problem):
        result = solve(problem, backend=backend)
        if expected is None:
            assert result.status is SolveStatus.INFEASIBLE, (backend, result.summary())
            assert result.explanation
            continue
        assert result.status is SolveStatus.OPTIMAL, (backend, result.summary())
        assert result.objective == pytest.approx(expected, rel=1e-7, abs=1e-7), backend
        assert violations(problem, result.assignment) == [], backend
        assert result.violations() == []


@SETTINGS
@given(floored(general=False))
def test_floors_soft_band_match_scipy_milp(problem):
    """soft=True prices the band and keeps the floor hard; CP-SAT (auto) against scipy's milp."""
    from alignment_solver.solve import default_soft_penalty

    P = default_soft_penalty(problem)
    expected = scipy_milp(problem, soft_penalty=P)
    result = solve(problem, soft=True)
    assert result.backend == ("cpsat" if problem.has_min_group else "flow")
    if expected is None:
        assert result.status is SolveStatus.INFEASIBLE
        return
    assert result.status is SolveStatus.OPTIMAL, result.summary()
    assert result.objective == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert violations(problem, result.assignment, soft=True) == []


def _skewed(clients, experts, m, seed):
    """Popularity-skewed fitness, no lower load bound: unpopular experts want few trainers."""
    return skewed_problem(clients, experts, seed=seed, min_group=m)


@pytest.mark.parametrize("clients,experts,m", [(60, 8, 9), (200, 16, 14), (3000, 24, 130)])
def test_flow_branch_and_bound_matches_cpsat(clients, experts, m):
    problem = _skewed(clients, experts, m, seed=clients)
    free = solve(problem.model_copy(update={"expert_min_group": 0}), backend="flow")
    assert len(problem.floor_breaks(free.assignment)), "the instance must need the floor"
    flow = solve(problem, backend="flow")
    cpsat = solve(problem, backend="cpsat")
    assert flow.status is SolveStatus.OPTIMAL and cpsat.status is SolveStatus.OPTIMAL
    assert flow.objective == pytest.approx(cpsat.objective, rel=1e-9)
    assert flow.violations() == [] and len(problem.floor_breaks(flow.assignment)) == 0
    assert flow.stats["nodes"] >= 2
    assert flow.bound >= flow.objective and flow.gap < 1e-9
    assert solve(problem).backend == "flow"


def test_flow_search_stopped_early_says_so():
    problem = _skewed(200, 16, 14, seed=200)
    one = solve(problem, backend="flow", options={"max_nodes": 1})
    assert one.status in (SolveStatus.FEASIBLE, SolveStatus.NO_SOLUTION_FOUND)
    assert not one.stats["proven"]
    if one.has_solution:
        assert one.violations() == []
        assert one.bound is None or one.bound >= solve(problem, backend="flow").objective - 1e-9


def test_greedy_then_repair_keeps_the_floor():
    problem = _skewed(200, 16, 14, seed=200)
    assert len(problem.floor_breaks(solve(problem.model_copy(update={"expert_min_group": 0}),
                                          backend="greedy").assignment))
    result = solve(problem, backend="greedy")
    assert result.status is SolveStatus.FEASIBLE
    assert len(problem.floor_breaks(result.assignment)) == 0
    assert result.objective <= solve(problem, backend="flow").objective + 1e-9


def test_checker_and_verification_refuse_a_plan_below_the_floor():
    problem = AlignmentProblem(fitness=np.ones((4, 2)), capacity=1, expert_min_group=[3, 0])
    x = np.zeros((4, 2), dtype=bool)
    x[0, 0] = x[1, 0] = True                       # expert 0 with 2 trainers, floor 3
    result = AlignmentResult(problem, SolveStatus.OPTIMAL, "test", assignment=x)
    assert any("expert_min_group 3" in v for v in result.violations())
    assert verified(result, soft=False).status is SolveStatus.NO_SOLUTION_FOUND


def test_infeasible_floor_names_the_experts():
    allowed = np.ones((10, 3), dtype=bool)
    allowed[4:, 1] = False                          # only 4 clients may train expert 1
    problem = AlignmentProblem(fitness=np.ones((10, 3)), capacity=1, min_experts=1, allowed=allowed,
                               expert_min_load=[0, 1, 0], expert_min_group=5, expert_ids=["a", "b", "c"])
    for backend in EXACT:
        result = solve(problem, backend=backend)
        assert result.status is SolveStatus.INFEASIBLE, backend
        assert "['b']" in result.explanation and "expert_min_group" in result.explanation
    stuck = AlignmentProblem(fitness=np.ones((3, 2)), capacity=1, min_experts=1, expert_min_group=[4, 4],
                             client_ids=["x", "y", "z"])
    result = solve(stuck)
    assert result.status is SolveStatus.INFEASIBLE and "privacy floor" in result.explanation


def test_flow_refuses_a_soft_band_with_a_floor():
    problem = _skewed(60, 8, 9, seed=60)
    with pytest.raises(UnsupportedProblemError, match="expert_min_group"):
        solve(problem, backend="flow", soft=True)


@pytest.mark.parametrize("value,match", [(-1, ">= 0"), ([1, 2, 3], r"shape \(2,\)"), (1.5, "integers"),
                                         ("two", "numeric"), ([[1, 2]], "an integer or an")])
def test_floor_field_errors_name_the_field(value, match):
    with pytest.raises(ValueError, match="expert_min_group") as info:
        AlignmentProblem(fitness=np.ones((3, 2)), capacity=1, expert_min_group=value)
    assert info.match(match)


def test_floor_round_trips_through_json():
    problem = _skewed(20, 4, 3, seed=1)
    again = AlignmentProblem.model_validate_json(problem.model_dump_json())
    assert np.array_equal(again.min_group_array, problem.min_group_array)


# ---- the coordinator ------------------------------------------------------------------------------
def _report(pc):
    return {"client_id": pc.client_id, "train_seconds": 1.0,
            "experts": [{"expert": e, "mean_loss": 0.5, "accuracy": 0.8, "samples": 10} for e in pc.experts]}


def test_coordinator_keeps_the_floor_and_over_provisions_for_dropouts():
    from alignment_solver.coordinator import AlignmentCoordinator, CoordinatorConfig

    cfg = CoordinatorConfig(min_group=4, expert_cost=0.3, capacity={"default_capacity": 2, "max_capacity": 2})
    c = AlignmentCoordinator(6, config=cfg)
    ids = [f"c{i}" for i in range(24)]
    plan = c.plan_round(0, ids)
    assert plan.min_group == 4 and plan.backend == "flow"      # nothing observed yet: completion rate 1
    load = np.array(plan.planned_load)
    assert ((load == 0) | (load >= 4)).all(), load
    c.observe_round(0, [_report(pc) for pc in plan.clients[: len(ids) // 2] if pc.experts])   # half drop out
    rows = c._ensure(ids)
    rate = c.profiler.completion_rate(rows).mean()
    assert rate < 1
    plan = c.plan_round(1, ids)
    assert plan.min_group == int(np.ceil(4 / rate)) > 4
    load = np.array(plan.planned_load)
    assert ((load == 0) | (load >= plan.min_group)).all(), load
    lean = AlignmentCoordinator(6, config=cfg.model_copy(update={"over_provision": False}))
    assert lean.plan_round(0, ids).min_group == 4


def test_coordinator_prices_the_band_only_when_the_floor_makes_it_infeasible():
    from alignment_solver.coordinator import AlignmentCoordinator, CoordinatorConfig

    cfg = CoordinatorConfig(min_group=5, time_limit=20, capacity={"default_capacity": 1, "max_capacity": 1})
    c = AlignmentCoordinator(4, config=cfg)
    plan = c.plan_round(0, [f"c{i}" for i in range(9)])    # fair share 2.25 per expert, floor 5: band unreachable
    assert plan.backend == "cpsat" and "priced instead" in plan.explanation
    load = np.array(plan.planned_load)
    assert ((load == 0) | (load >= 5)).all(), load


# ---- aggregation ------------------------------------------------------------------------------------
def test_aggregation_holds_back_experts_below_the_floor():
    from alignment_solver.integrations.replies import AggregationConfig, ValidReply, aggregate, held_back
    from alignment_solver.rounds import ClientReport

    current = {"shared": np.zeros(2), "e0": np.zeros(2), "e1": np.zeros(2)}
    owner = {"shared": None, "e0": 0, "e1": 1}.get

    def reply(i, experts):
        arrays = {"shared": np.full(2, 1.0), **{f"e{j}": np.full(2, 1.0) for j in experts}}
        return ValidReply(client_id=i, arrays=arrays, num_examples=10, weight=10.0,
                          expert_weights={j: 10.0 for j in experts}, report=ClientReport(client_id=i))

    accepted = [reply(0, [0, 1]), reply(1, [0]), reply(2, [0])]   # expert 0 from 3 replies, expert 1 from 1
    cfg = AggregationConfig(min_group=3)
    assert held_back(accepted, cfg) == {"min_group": 3, "experts": {1: 1}}
    new, trained = aggregate(current, accepted, owner, cfg)
    assert trained == {0} and np.all(new["e1"] == 0) and np.all(new["e0"] == 1) and np.all(new["shared"] == 1)
    new, trained = aggregate(current, accepted[:2], owner, cfg)          # 2 accepted: shared held too
    assert trained == set() and all(np.all(v == 0) for v in new.values())
    assert held_back(accepted[:2], cfg) == {"min_group": 3, "experts": {0: 2, 1: 1}, "shared": 2}
    assert aggregate(current, accepted, owner, AggregationConfig())[1] == {0, 1}     # off by default


# ---- the training loop -------------------------------------------------------------------------------
def test_training_loop_aggregation_keeps_experts_below_the_floor():
    from alignment_solver.training.loop import floor_filter

    def update(experts):
        arrays = {"gate.W": np.ones(1), **{f"expert{j}.W": np.ones(1) for j in experts}}
        return arrays, 10.0, {j: 5.0 for j in experts}

    updates = [update([0, 1]), update([0]), update([0, 2])]
    kept, held = floor_filter(updates, 3)
    assert held == 2                                              # expert 1 (1 update) and expert 2 (1 update)
    assert all(set(a) <= {"gate.W", "expert0.W"} for a, _, _ in kept) and all("gate.W" in a for a, _, _ in kept)
    kept, held = floor_filter(updates[:2], 3)                     # two finished: the gate is kept too
    assert held == 3 and all(a == {} for a, _, _ in kept)
    assert floor_filter(updates, 0) == (updates, 0)


def test_over_provisioning_holds_back_fewer_updates_in_the_loop():
    from alignment_solver.training.config import SimConfig
    from alignment_solver.training.loop import run_strategy
    from alignment_solver.training.world import World

    held = {}
    for over in (True, False):
        cfg = SimConfig(strategies=["aligned"], rounds=6, seed=1000, dropout=0.2, min_group=3, over_provision=over)
        held[over] = sum(r["held_back"] for r in run_strategy(cfg, World(cfg), "aligned"))
    assert held[True] < held[False], held


@pytest.mark.parametrize("clients,experts,m,seed", [(60, 8, 9, 0), (60, 8, 9, 1), (200, 16, 14, 2), (300, 12, 40, 3)])
def test_bounds_that_fix_experts_bound_the_forced_relaxations(clients, experts, m, seed):
    """The flow's fixing bounds (issue 38) are proven upper bounds: at the root and at a node
    with one expert off and one on, forcing each undecided expert on (at least m trainers) or off
    (none), solved exactly, never beats the bound computed from the node's plan."""
    from alignment_solver.backends.flow import _forced_bounds
    from alignment_solver.formulations.flow import FlowNetwork

    problem = _skewed(clients, experts, m, seed)
    rng = np.random.default_rng(seed)
    floors = problem.min_group_array
    checked = 0
    for off, on in ((np.zeros(experts, bool), np.zeros(experts, bool)),
                    tuple(np.isin(np.arange(experts), rng.choice(experts, 1)) for _ in range(2))):
        if (off & on).any():
            continue
        allowed = ~off[None, :] & np.ones((clients, experts), bool)
        base = problem.model_copy(update={"expert_min_group": 0, "allowed": allowed,
                                          "expert_min_load": np.where(on, floors, problem.min_load_array)})
        node = solve(base, backend="flow")
        if node.status is not SolveStatus.OPTIMAL:
            continue
        net = FlowNetwork.from_problem(base)
        on_bound, off_bound = _forced_bounds(net, np.asarray(node.assignment), floors, node.bound,
                                             node.stats["tolerance"])
        assert on_bound is not None
        for e in np.flatnonzero(~off & ~on):
            forced_on = solve(base.model_copy(update={"expert_min_load": np.where(
                np.arange(experts) == e, floors, base.min_load_array)}), backend="flow")
            forced_off = solve(base.model_copy(update={"allowed": allowed & (np.arange(experts) != e)[None, :]}),
                               backend="flow")
            for forced, bound in ((forced_on, on_bound[e]), (forced_off, off_bound[e])):
                if forced.has_solution:
                    assert forced.objective <= bound + 1e-9, (e, forced.objective, bound)
                    checked += 1
                else:
                    assert forced.status is SolveStatus.INFEASIBLE
    assert checked >= experts
