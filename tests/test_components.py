"""The three runtime components, checked against hand-computed numbers."""

import math

import numpy as np
import pytest

from alignment_solver.capacity import CapacityConfig, CapacityProfiler
from alignment_solver.load_monitor import ExpertLoadMonitor, MonitorConfig, cv, max_min_ratio
from alignment_solver.scoring import FitnessScorer, ScorerConfig


def test_ema_accuracy_mode():
    s = FitnessScorer(3, ScorerConfig(beta=0.3, neutral=0.5, exploration=0))
    s.grow(2)
    s.update(np.array([0]), np.array([1]), np.array([0.0]), np.array([0.9]))
    assert s.Q[0, 1] == pytest.approx(0.9)                             # the first score replaces the prior
    s.update(np.array([0]), np.array([1]), np.array([0.0]), np.array([0.1]))
    assert s.Q[0, 1] == pytest.approx(0.7 * 0.9 + 0.3 * 0.1)          # 0.66
    assert s.Q[0, 0] == 0.5 and s.Q[1].tolist() == [0.5] * 3             # untrained pairs keep their value
    assert s.N[0].tolist() == [0, 2, 0]


def test_ema_loss_mode():
    s = FitnessScorer(2, ScorerConfig(mode="loss", alpha=2.0, beta=0.5, neutral=0.0, exploration=0))
    s.grow(1)
    s.update(np.array([0]), np.array([0]), np.array([0.5]), np.array([0.0]))
    assert s.Q[0, 0] == pytest.approx(math.exp(-1.0))
    s.update(np.array([0]), np.array([0]), np.array([0.0]), np.array([0.0]))
    assert s.Q[0, 0] == pytest.approx(0.5 * math.exp(-1.0) + 0.5)


def test_routing_prior_only_for_untried_pairs():
    s = FitnessScorer(4, ScorerConfig(exploration=0))
    s.grow(1)
    s.update(np.array([0]), np.array([2]), np.array([0.0]), np.array([1.0]))
    q2 = s.Q[0, 2]
    s.set_prior(np.array([0]), np.array([[2.0, 6.0, 0.0, 2.0]]))
    assert s.Q[0].tolist() == pytest.approx([0.2, 0.6, q2, 0.2])


def test_exploration_bonus_shrinks_with_trials_and_is_not_stored():
    s = FitnessScorer(2, ScorerConfig(exploration=0.1, beta=0.5))
    s.grow(1)
    s.N[0] = [0, 3]
    f = s.fitness(np.array([0]), 4)
    assert f[0, 0] == pytest.approx(0.5 + 0.1 * math.sqrt(math.log(6) / 1))
    assert f[0, 1] == pytest.approx(0.5 + 0.1 * math.sqrt(math.log(6) / 4))
    assert s.Q[0].tolist() == [0.5, 0.5]
    off = FitnessScorer(2, ScorerConfig(exploration=0))
    off.grow(1)
    assert off.fitness(np.array([0]), 4).tolist() == [[0.5, 0.5]]


def test_cv_and_ratio():
    assert cv(np.array([2.0, 4, 6, 0])) == pytest.approx(math.sqrt(5) / 3)
    assert cv(np.zeros(3)) == 0.0
    assert max_min_ratio(np.array([2.0, 4.0])) == 2.0 and max_min_ratio(np.array([0.0, 1.0])) == math.inf


def test_deficit_accumulates_decays_and_raises_lower_bounds():
    m = ExpertLoadMonitor(4, MonitorConfig(decay=0.8, gain=0.5))
    m.record(0, np.array([2.0, 4, 6, 0]), np.array([20.0, 40, 60, 0]))
    assert m.deficit.tolist() == pytest.approx([1, 0, 0, 3])             # fair 3
    m.record(1, np.array([3.0, 3, 3, 3]), np.array([30.0] * 4))
    assert m.deficit.tolist() == pytest.approx([0.8, 0, 0, 2.4])
    lower, upper = m.bounds(12, 0.4)                                     # fair 3: 1.8 .. 4.2 inwards
    assert upper.tolist() == [4, 4, 4, 4]                                # floor(4.2)
    assert lower.tolist() == [2, 2, 2, 3]                                # floor(ceil(1.8) + 0.5 * deficit)
    tight_lower, tight_upper = m.bounds(12, 0.1)                         # 2.7 .. 3.3 inwards: 3 .. 3
    assert tight_upper.tolist() == [3] * 4 and tight_lower.tolist() == [3] * 4
    assert m.rounds_since_trained(3).tolist() == [2, 2, 2, 2]
    assert m.total_clients.tolist() == [5, 7, 9, 3]
    assert m.stats()["cv_round"] == 0.0
    fitness_mode = ExpertLoadMonitor(2, MonitorConfig(decay=1.0, gain=1.0, deficit_mode="fitness"))
    fitness_mode.record(0, np.array([4.0, 0.0]), np.zeros(2))
    assert fitness_mode.bounds(4, 0.0)[0].tolist() == [2, 2]
    assert fitness_mode.fitness_boost(4).tolist() == pytest.approx([0.0, 1.0])   # deficit 2 / fair 2


def test_lower_bound_never_above_upper():
    m = ExpertLoadMonitor(2, MonitorConfig(decay=1.0, gain=10.0))
    m.record(0, np.array([10.0, 0.0]), np.zeros(2))
    lower, upper = m.bounds(10, 0.1)
    assert np.all(lower <= upper)


def profiler(**kw):
    p = CapacityProfiler(CapacityConfig(**kw))
    p.grow(3)
    return p


def test_quantile_capacity_is_pessimistic():
    p = profiler(quantile=0.8, max_capacity=10, default_capacity=10)
    for seconds in (10, 12, 20, 11, 13):
        p.observe(0, assigned=1, train_seconds=seconds, download_seconds=0, finished=True, deadline=None)
    # 0.8-quantile of [10, 11, 12, 13, 20] = 14.4 s per expert; 60 s deadline -> 4 experts (mean would give 5)
    assert p.seconds_per_expert(np.array([0]))[0] == pytest.approx(14.4)
    assert p.capacity(np.array([0]), 60.0)[0] == 4


def test_unknown_clients_get_the_safe_default():
    p = profiler(default_capacity=1)
    assert p.capacity(np.array([1, 2]), 100.0).tolist() == [1, 1]


def test_observation_beats_an_over_report():
    p = profiler(max_capacity=3, default_capacity=1)
    p.report(0, throughput=1000.0, samples=100)          # claims 0.1 s per expert
    assert p.capacity(np.array([0]), 30.0)[0] == 3
    p.observe(0, assigned=3, train_seconds=30.0, download_seconds=0, finished=True, deadline=30.0)  # 10 s each
    assert p.capacity(np.array([0]), 15.0)[0] == 1


def test_failures_cost_capacity_and_early_finishes_earn_it_back():
    p = profiler(max_capacity=3, default_capacity=3, recovery_rounds=2, early_fraction=0.5)
    p.observe(0, assigned=3, train_seconds=50, download_seconds=0, finished=False, deadline=40)
    assert p.capacity(np.array([0]), None)[0] == 2
    p.dropout(0, assigned=2)
    assert p.capacity(np.array([0]), None)[0] == 1
    p.observe(0, assigned=1, train_seconds=5, download_seconds=0, finished=True, deadline=40)
    assert p.capacity(np.array([0]), None)[0] == 1                       # one early finish is not enough
    p.observe(0, assigned=1, train_seconds=5, download_seconds=0, finished=True, deadline=40)
    assert p.capacity(np.array([0]), None)[0] == 2
    assert p.completion_rate(np.array([0, 1]))[0] == pytest.approx(2 / 4)


def test_declared_maximum_and_memory_budget_quantile():
    p = profiler(quantile=0.8, default_memory=2.0)
    p.report(0, max_experts=1, memory=10.0)
    for m in (8.0, 12.0, 9.0, 11.0):
        p.report(0, memory=m)
    assert p.capacity(np.array([0]), None)[0] == 1
    assert p.budget(np.array([0, 1])).tolist() == pytest.approx([np.quantile([10, 8, 12, 9, 11], 0.2), 2.0])


def test_profiler_state_round_trip():
    p = profiler()
    p.observe(1, assigned=2, train_seconds=4, download_seconds=1, finished=True, deadline=None)
    q = CapacityProfiler(p.config)
    q.restore(p.state(), 3)
    for name in CapacityProfiler._ARRAYS:
        assert np.array_equal(getattr(p, name), getattr(q, name), equal_nan=True), name
