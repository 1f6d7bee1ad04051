"""Framework-neutral reply validation and per-expert aggregation (integrations.replies)."""

import numpy as np
import pytest

from alignment_solver.integrations.replies import (AggregationConfig, Reply, ReplyChecker, aggregate,
                                                   check_evaluations, evaluation_mean, held_back)
from alignment_solver.training.model import expert_of

E = 3
MODEL = {"gate.W": np.zeros((4, E)), "gate.b": np.zeros(E),
         **{f"expert{j}.{n}": np.full(s, float(j)) for j in range(E) for n, s in (("W", (4, 2)), ("b", (2,)))}}
PLAN = {"1": [0], "2": [0, 1], "3": [1]}


def reply(node=1, experts=(0,), value=1.0, n=10, **metrics):
    arrays = {"gate.W": np.full((4, E), value), "gate.b": np.full(E, value)}
    for j in experts:
        arrays[f"expert{j}.W"] = np.full((4, 2), value)
        arrays[f"expert{j}.b"] = np.full(2, value)
    base = {"num-examples": n, "experts": list(experts), "expert-samples": [n] * len(experts),
            "expert-loss": [0.5] * len(experts), "expert-accuracy": [0.8] * len(experts), "train-seconds": 1.0}
    return Reply(node, arrays=arrays, metrics={**base, **metrics})


def checker(**cfg):
    return ReplyChecker(MODEL, E, owner=expert_of, config=AggregationConfig(**cfg))


def with_arrays(r, **changes):
    r.arrays = {**r.arrays, **changes}
    return r


@pytest.mark.parametrize("bad, words", [
    (reply(node=99), "was not planned"),
    (reply(experts=(0, 2)), "lists expert 2, which it was not assigned"),
    (with_arrays(reply(), **{"expert2.W": np.zeros((4, 2))}), "belongs to expert 2, which the reply does not list"),
    (with_arrays(reply(), **{"backdoor.W": np.zeros(3)}), "'backdoor.W' is not part of the model"),
    (with_arrays(reply(), **{"gate.W": np.zeros((1, 1))}), r"must have shape \(4, 3\); got \(1, 1\)"),
    (with_arrays(reply(), **{"gate.b": np.array([1.0, np.nan, 0])}), "NaN or infinite"),
    (with_arrays(reply(), **{"gate.b": np.array([1.0, np.inf, 0])}), "NaN or infinite"),
    (with_arrays(reply(), **{"gate.b": np.array(["a", "b", "c"])}), "must be floating point"),
    (with_arrays(reply(), **{"gate.b": np.full(E, np.iinfo(np.uint64).max)}), "must be floating point"),
    (with_arrays(reply(), **{"gate.b": np.full(E, np.iinfo(np.int64).min)}), "must be floating point"),
    (reply(n=10 ** 18), r"num-examples' must be an integer in \[1, 1e\+12\]"),
    (reply(n=-5), "num-examples"), (reply(n=float("nan")), "num-examples"), (reply(n=2.5), "num-examples"),
    (reply(**{"expert-samples": [-1]}), "expert-samples' must hold integers"),
    (reply(**{"expert-samples": [11]}), r"expert-samples' must hold integers in \[0, 10\]"),
    (reply(**{"expert-loss": [float("nan")]}), "expert-loss"),
    (reply(**{"expert-accuracy": [1.5]}), "expert-accuracy"),
    (reply(**{"train-seconds": float("nan")}), "train-seconds"),
    (reply(**{"download-seconds": -1.0}), "download-seconds"),
    (reply(**{"routing": [1.0, 2.0]}), "routing' must have 3 entries"),
    (reply(**{"max-experts": -1}), "max-experts"), (reply(**{"max-experts": 1e30}), "max-experts"),
    (reply(**{"experts": [0, 0], "expert-samples": [1, 1], "expert-loss": [0, 0], "expert-accuracy": [1, 1]}),
     "lists an expert twice"),
    (Reply(1, arrays=None, metrics={}), "has no metrics record|has no arrays record|num-examples"),
    (Reply(1, error="timeout"), "replied with an error: timeout"),
])
def test_each_bad_reply_is_rejected_with_its_reason(bad, words):
    out = checker().check_round([bad, reply(node=3, experts=(1,))], PLAN)
    key = str(bad.client_id)
    assert key in out.rejected and __import__("re").search(words, out.rejected[key]), out.rejected
    assert [r.client_id for r in out.accepted] == [3]


def test_a_listed_expert_must_come_with_its_arrays():
    r = reply(experts=(0,))
    del r.arrays["expert0.b"]
    out = checker().check_round([r], PLAN)
    assert "does not send its array 'expert0.b'" in out.rejected["1"]


def test_duplicate_replies_are_all_rejected():
    out = checker().check_round([reply(), reply(value=5.0), reply(node=3, experts=(1,))], PLAN)
    assert out.rejected == {"1": "replied 2 times in one round"} and len(out.accepted) == 1


def test_mean_is_weighted_per_owner_and_untrained_experts_keep_their_arrays():
    out = checker().check_round([reply(1, (0,), 1.0, n=10), reply(2, (0, 1), 4.0, n=30),
                                 reply(3, (1,), 2.0, n=10)], PLAN)
    new, trained = aggregate(MODEL, out.accepted, expert_of)
    assert trained == {0, 1}
    assert np.allclose(new["gate.W"], (10 * 1 + 30 * 4 + 10 * 2) / 50)
    assert np.allclose(new["expert0.W"], (10 * 1 + 30 * 4) / 40)
    assert np.allclose(new["expert1.W"], (30 * 4 + 10 * 2) / 40)
    assert np.array_equal(new["expert2.W"], MODEL["expert2.W"])


def test_weight_caps_bound_a_client_that_inflates_its_count():
    plan = {str(i): [0] for i in range(4)}
    honest = [reply(i, (0,), 1.0, n=100) for i in range(3)]
    liar = reply(3, (0,), 777.0, n=1_000_000)
    out = checker().check_round(honest + [liar], plan, weight_caps={"3": 100.0})
    new, _ = aggregate(MODEL, out.accepted, expert_of, AggregationConfig(relative_clip=None))
    assert np.allclose(new["gate.W"], (3 * 1 + 777) / 4)        # capped: one vote of 100, not 10^6


@pytest.mark.parametrize("method, expected", [("median", 1.0), ("trimmed_mean", 1.0), ("mean", None)])
def test_robust_methods_ignore_one_outlier(method, expected):
    plan = {str(i): [0] for i in range(5)}
    replies = [reply(i, (0,), 1.0) for i in range(4)] + [reply(4, (0,), 1e6)]
    out = checker(method=method, trim=0.2).check_round(replies, plan)
    new, _ = aggregate(MODEL, out.accepted, expert_of, AggregationConfig(method=method, trim=0.2, relative_clip=None))
    if expected is None:
        assert new["gate.W"][0, 0] > 1e5
    else:
        assert np.allclose(new["gate.W"], expected) and np.allclose(new["expert0.W"], expected)


def test_clipping_bounds_each_update_norm():
    plan = {"1": [0]}
    out = checker().check_round([reply(1, (0,), 100.0)], plan)
    cfg = AggregationConfig(clip_norm=1.0)
    new, _ = aggregate(MODEL, out.accepted, expert_of, cfg)
    delta = np.concatenate([(new[k] - MODEL[k]).ravel() for k in out.accepted[0].arrays])
    assert np.linalg.norm(delta) == pytest.approx(1.0)


def test_the_report_carries_the_validated_figures():
    out = checker().check_round([reply(2, (0, 1), n=20, **{"routing": [1, 2, 3], "max-experts": 2})], PLAN)
    rep = out.accepted[0]
    assert rep.report.client_id == 2 and [e.expert for e in rep.report.experts] == [0, 1]
    assert rep.max_experts == 2 and rep.routing == [1.0, 2.0, 3.0]
    assert rep.report.bytes_down == sum(v.nbytes for v in rep.arrays.values())


def test_check_evaluation_names_the_bad_metric():
    from alignment_solver.errors import ReplyError
    from alignment_solver.integrations.replies import check_evaluation

    assert check_evaluation({"num-examples": 5, "accuracy": 0.5, "loss": 1.0}, 10) == (5, 0.5, 1.0)
    for metrics, match in [({"num-examples": 5, "accuracy": 1.5, "loss": 1.0}, "'accuracy' must be a number in"),
                           ({"num-examples": 11, "accuracy": 0.5, "loss": 1.0}, "'num-examples' must be an integer"),
                           ({"num-examples": 5, "accuracy": 0.5, "loss": float("nan")}, "'loss'"),
                           ({"num-examples": 5, "accuracy": 0.5}, "'loss' is missing"),
                           (None, "has no metrics record")]:
        with pytest.raises(ReplyError, match=match):
            check_evaluation(metrics, 10)


F32 = {"gate.W": np.zeros((4, E), np.float32), "steps": np.zeros(1, np.int64),
       **{f"expert{j}.W": np.zeros((4, 2), np.float32) for j in range(E)}}


@pytest.mark.parametrize("value, words", [(1e300, "infinite values in the model's dtype float32"),
                                          (3.5e38, "infinite values in the model's dtype float32")])
def test_values_that_overflow_the_model_dtype_are_rejected(value, words):
    c = ReplyChecker(F32, E, owner=expert_of)
    r = Reply(1, arrays={"gate.W": np.full((4, E), value), "expert0.W": np.zeros((4, 2)), "steps": np.zeros(1, int)},
              metrics=reply().metrics)
    out = c.check_round([r], PLAN)
    assert words in out.rejected["1"]
    ok = Reply(1, arrays={"gate.W": np.full((4, E), 3.0e38), "expert0.W": np.zeros((4, 2), np.float64),
                          "steps": np.zeros(1, int)}, metrics=reply().metrics)
    checked = c.check(ok, [0])
    assert checked.arrays["gate.W"].dtype == np.float32 and np.isfinite(checked.arrays["gate.W"]).all()


def test_integer_arrays_must_fit_and_difference_replies_are_added():
    c = ReplyChecker(F32, E, owner=expert_of)
    big = Reply(1, arrays={"steps": np.array([2 ** 64 - 1], np.uint64)}, metrics={**reply().metrics, "experts": [],
                "expert-samples": [], "expert-loss": [], "expert-accuracy": []})
    assert "outside the range" in c.check_round([big], PLAN).rejected["1"]
    current = {**F32, "gate.W": np.ones((4, E), np.float32)}
    c = ReplyChecker(current, E, owner=expert_of)
    diff = Reply(1, arrays={"gate.W": np.full((4, E), 0.5), "expert0.W": np.full((4, 2), 0.25),
                            "steps": np.ones(1, int)}, metrics=reply().metrics, diff=True)
    checked = c.check(diff, [0])
    assert np.allclose(checked.arrays["gate.W"], 1.5) and np.allclose(checked.arrays["expert0.W"], 0.25)
    assert checked.arrays["steps"].tolist() == [1]


def test_one_huge_update_cannot_move_the_mean_far():
    """Relative clipping: 1e30 among honest replies is scaled to 10x the median update norm."""
    honest = [reply(node=n, experts=(), value=1.0) for n in (1, 2, 3, 4)]
    hostile = reply(node=5, experts=(), value=1e30)
    plan = {str(n): [0] for n in range(1, 6)}
    out = checker().check_round(honest + [hostile], plan)
    new, _ = aggregate(MODEL, out.accepted, expert_of, AggregationConfig())
    assert np.abs(new["gate.W"]).max() < 10.0
    off, _ = aggregate(MODEL, out.accepted, expert_of, AggregationConfig(relative_clip=None))
    assert np.abs(off["gate.W"]).max() > 1e28


def test_a_claim_of_max_examples_cannot_take_the_whole_mean():
    plan = {str(n): [] for n in range(1, 5)}
    base = {"experts": [], "expert-samples": [], "expert-loss": [], "expert-accuracy": []}
    gate = {"gate.W": MODEL["gate.W"]}
    replies = [Reply(n, arrays={**gate, "gate.b": np.full(E, 0.1)}, metrics={**base, "num-examples": 100})
               for n in (1, 2, 3)]
    replies.append(Reply(4, arrays={**gate, "gate.b": np.full(E, 1.0)}, metrics={**base, "num-examples": 10 ** 6}))
    out = checker().check_round(replies, {**plan, **{k: [0] for k in plan}})
    new, _ = aggregate(MODEL, out.accepted, expert_of)
    assert new["gate.b"][0] == pytest.approx((3 * 100 * 0.1 + 500 * 1.0) / 800)   # capped at 5 x the median claim


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_methods_with_too_few_trainers_follow_the_few_rule(method):
    """Expert 1 is trained by two replies only: nothing can be trimmed, so 'few' decides."""
    accepted = checker().check_round([reply(node=2, experts=(0, 1), value=1.0), reply(node=3, experts=(1,), value=3.0)],
                                     PLAN).accepted
    mean, trained = aggregate(MODEL, accepted, expert_of, AggregationConfig(method=method, relative_clip=None))
    assert mean["expert1.b"][0] == pytest.approx(2.0) and 1 in trained
    kept, trained = aggregate(MODEL, accepted, expert_of, AggregationConfig(method=method, few="keep"))
    assert np.array_equal(kept["expert1.b"], MODEL["expert1.b"]) and 1 not in trained


# ---- every array sent comes back; the floor counts contributors per array --------------------
def test_a_reply_without_a_shared_array_it_was_sent_is_rejected_and_cannot_pass_the_floor():
    """Issue 36: A sends gate.W = 777, B and C omit it; all three were accepted and gate.W became
    exactly A's value under a floor of 3."""
    plan = {"1": [0], "2": [0], "3": [0]}
    a = reply(1, (0,), 1.0)
    a.arrays["gate.W"] = np.full((4, E), 777.0)
    b, c = reply(2, (0,), 1.0), reply(3, (0,), 1.0)
    del b.arrays["gate.W"], c.arrays["gate.W"]
    cfg = dict(min_group=3, relative_clip=None)
    out = checker(**cfg).check_round([a, b, c], plan)
    assert [r.client_id for r in out.accepted] == [1]
    assert out.rejected == {k: "does not send the shared array 'gate.W' it was sent (1 of 2 shared arrays missing)"
                            for k in ("2", "3")}
    new, trained = aggregate(MODEL, out.accepted, expert_of, AggregationConfig(**cfg))
    assert np.array_equal(new["gate.W"], MODEL["gate.W"]) and trained == set()
    assert held_back(out.accepted, AggregationConfig(**cfg)) == {"min_group": 3, "experts": {0: 1}, "shared": 1}


def test_the_floor_counts_the_contributors_of_each_array():
    """Replies that got past the checker short of an array (built by hand here) still cannot
    publish that array from fewer than min_group contributors."""
    plan = {"1": [0], "2": [0], "3": [0]}
    accepted = checker().check_round([reply(n, (0,), float(n)) for n in (1, 2, 3)], plan).accepted
    for r in accepted[1:]:
        del r.arrays["gate.W"], r.arrays["expert0.b"]
    cfg = AggregationConfig(min_group=3, relative_clip=None)
    new, trained = aggregate(MODEL, accepted, expert_of, cfg)
    assert np.array_equal(new["gate.W"], MODEL["gate.W"]) and np.array_equal(new["expert0.b"], MODEL["expert0.b"])
    assert np.allclose(new["gate.b"], 2.0) and np.allclose(new["expert0.W"], 2.0) and trained == {0}


def test_an_expert_reported_with_zero_samples_must_come_back_unchanged():
    plan = {"1": [0, 1], "2": [0, 1], "3": [0, 1]}
    zero = {"expert-samples": [10, 0]}
    moved = reply(1, (0, 1), 5.0, **zero)
    out = checker().check_round([moved], plan)
    assert out.rejected == {"1": "reports 0 samples for expert 1 but changed its array 'expert1.W' "
                                 "(an expert without samples must come back unchanged)"}
    same = [reply(n, (0, 1), float(n), **zero) for n in (1, 2)] + [reply(3, (0, 1), 3.0)]
    for r in same[:2]:
        r.arrays.update({"expert1.W": MODEL["expert1.W"], "expert1.b": MODEL["expert1.b"]})
    cfg = AggregationConfig(min_group=2, relative_clip=None)
    out = checker().check_round(same, plan)
    assert not out.rejected and [r.expert_weights for r in out.accepted] == [{0: 10.0}, {0: 10.0}, {0: 10.0, 1: 10.0}]
    new, trained = aggregate(MODEL, out.accepted, expert_of, cfg)
    assert held_back(out.accepted, cfg) == {"min_group": 2, "experts": {1: 1}}     # one trainer, not three
    assert np.array_equal(new["expert1.W"], MODEL["expert1.W"]) and trained == {0}
    alone, _ = aggregate(MODEL, out.accepted, expert_of, AggregationConfig(relative_clip=None))
    assert np.allclose(alone["expert1.W"], 3.0)              # not averaged with the unchanged copies


# ---- evaluation replies ----------------------------------------------------------------------
def evaluation(node, n=100, accuracy=0.5, loss=1.0, error=None):
    return Reply(node, metrics={"num-examples": n, "accuracy": accuracy, "loss": loss}, error=error)


def test_evaluation_replies_are_checked_like_train_replies():
    """Issue 36: five copies of one reply claiming 10**6 examples at accuracy 1.0 made the
    round's accuracy 0.99999 against an honest 0.5; a node never asked was counted too."""
    honest = [evaluation(n) for n in (1, 2, 3)]
    copies = [evaluation(4, n=10 ** 6, accuracy=1.0) for _ in range(5)]
    stranger = evaluation(9, accuracy=1.0)
    accepted, rejected = check_evaluations(honest + copies + [stranger], asked=[1, 2, 3, 4], max_examples=10 ** 12)
    assert [e.client_id for e in accepted] == [1, 2, 3]
    assert rejected == {"4": "replied 5 times in one round", "9": "was not asked to evaluate in this round"}
    assert evaluation_mean(accepted) == {"accuracy": 0.5, "loss": 1.0, "num-examples": 300.0}


def test_evaluation_examples_are_capped_like_train_weights():
    replies = [evaluation(n) for n in (1, 2, 3)] + [evaluation(4, n=10 ** 6, accuracy=1.0)]
    accepted, rejected = check_evaluations(replies, ["1", "2", "3", "4"], 10 ** 12)
    assert not rejected and accepted[-1].weight == 500.0                 # 5 x the median claim
    assert evaluation_mean(accepted)["accuracy"] == pytest.approx((3 * 100 * 0.5 + 500) / 800)
    accepted, _ = check_evaluations(replies, [1, 2, 3, 4], 10 ** 12, weight_caps={"4": 100.0})
    assert evaluation_mean(accepted)["accuracy"] == pytest.approx(0.625)
    accepted, rejected = check_evaluations([evaluation(1, n=11), evaluation(2, error="boom"), evaluation(3, n=10)],
                                           [1, 2, 3], 10)
    assert rejected == {"1": "metric 'num-examples' must be an integer in [1, 10]; got 11",
                        "2": "replied with an error: boom"}
    assert evaluation_mean(accepted) == {"accuracy": 0.5, "loss": 1.0, "num-examples": 10.0}
    assert evaluation_mean([]) is None
