"""Crafted Flower replies through AlignedStrategy's own methods (configure_train -> aggregate_train).

Run by tests/test_flower.py in a separate interpreter: importing flwr loads gRPC, after which
this process could no longer fork solver workers for the other tests.
"""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from alignment_solver.coordinator import CoordinatorConfig
from alignment_solver.integrations.flower import AlignedStrategy, to_numpy, to_record
from alignment_solver.integrations.replies import AggregationConfig
from alignment_solver.training.model import init_params

E, NODES = 4, [11, 12, 13, 14]
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1     # as inside a ServerApp


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def model():
    return init_params(5, 3, E, 0, np.random.default_rng(0))


def strategy(tmp_path, **kw):
    cfg = CoordinatorConfig(capacity={"default_capacity": 2, "max_capacity": 2})
    return AlignedStrategy(num_experts=E, config=cfg, history_path=str(tmp_path / "h.json"),
                           state_path=str(tmp_path / "s.json"), **kw)


def configure(s, rnd, params):
    msgs = list(s.configure_train(rnd, to_record(params), ConfigRecord({}), Grid(NODES)))
    return {m.metadata.dst_node_id: m for m in msgs}


def honest(msg, value=1.0, n=50):
    received = to_numpy(msg.content["arrays"])
    experts = list(msg.content["config"]["experts"])
    arrays = {k: np.full_like(v, value) for k, v in received.items()}
    metrics = {"num-examples": n, "experts": experts, "expert-samples": [n] * len(experts),
               "expert-loss": [0.4] * len(experts), "expert-accuracy": [0.9] * len(experts), "train-seconds": 0.1}
    return Message(content=RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def forged(msg, arrays=None, metrics=None, drop=(), **changes):
    base = honest(msg)
    a = to_numpy(base.content["arrays"])
    m = dict(base.content["metrics"])
    a.update(arrays or {})
    m.update(metrics or {})
    for k in drop:
        a.pop(k, None)
        m.pop(k, None)
    return Message(content=RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in a.items()}),
                                       "metrics": MetricRecord(m)}), reply_to=msg)


def stranger(node=99):
    fake = Message(content=RecordDict({"config": ConfigRecord({"experts": [0, 1, 2, 3]})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    full = to_record({k: np.full_like(v, 777.0) for k, v in model().items()})
    metrics = {"num-examples": 50, "experts": [0, 1, 2, 3], "expert-samples": [50] * 4, "expert-loss": [0.1] * 4,
               "expert-accuracy": [1.0] * 4}
    return Message(content=RecordDict({"arrays": full, "metrics": MetricRecord(metrics)}), reply_to=fake)


def unassigned_expert(msg):
    mine = set(msg.content["config"]["experts"])
    other = next(j for j in range(E) if j not in mine)
    return other


ATTACKS = {
    "unplanned node": lambda m: stranger(),
    "unassigned expert arrays": lambda m: forged(m, arrays={f"expert{unassigned_expert(m)}.W": np.full((5, 3), 777.0)}),
    "unassigned expert listed": lambda m: forged(m, metrics={"experts": [unassigned_expert(m)], "expert-samples": [5],
                                                             "expert-loss": [0.1], "expert-accuracy": [1.0]}),
    "huge num-examples": lambda m: forged(m, metrics={"num-examples": 10 ** 18}),
    "negative num-examples": lambda m: forged(m, metrics={"num-examples": -50}),
    "nan num-examples": lambda m: forged(m, metrics={"num-examples": float("nan")}),
    "nan array": lambda m: forged(m, arrays={"gate.W": np.full((5, E), np.nan)}),
    "inf array": lambda m: forged(m, arrays={"gate.b": np.full(E, np.inf)}),
    "unknown key": lambda m: forged(m, arrays={"backdoor.W": np.ones(3)}),
    "wrong-shape gate": lambda m: forged(m, arrays={"gate.W": np.ones((1, 1))}),
    "negative expert-samples": lambda m: forged(m, metrics={"expert-samples": [-5, -5]}),
    "nan accuracy": lambda m: forged(m, metrics={"expert-accuracy": [float("nan")] * 2}),
    "nan seconds": lambda m: forged(m, metrics={"train-seconds": float("nan")}),
    "routing of the wrong length": lambda m: forged(m, metrics={"routing": [1.0, 2.0]}),
    "max-experts -1": lambda m: forged(m, metrics={"max-experts": -1}),
    "max-experts 1e30": lambda m: forged(m, metrics={"max-experts": 1e30}),
    "missing arrays record": lambda m: Message(content=RecordDict({"metrics": honest(m).content["metrics"]}),
                                               reply_to=m),
    "error reply": lambda m: Message(Error(code=0, reason="boom"), reply_to=m),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_one_bad_reply_is_rejected_and_the_round_goes_on(tmp_path, attack):
    s = strategy(tmp_path)
    params = model()
    msgs = configure(s, 1, params)
    victim = NODES[0]
    bad = ATTACKS[attack](msgs[victim])
    replies = [honest(msgs[n]) for n in NODES[1:] if n in msgs] + [bad]
    arrays, metrics = s.aggregate_train(1, replies)
    new = to_numpy(arrays)
    assert set(new) == set(params)
    for k, v in new.items():
        assert v.shape == params[k].shape and np.all(np.isfinite(v)), k
        assert not np.any(v == 777.0), k
    trained = set().union(*(msgs[n].content["config"]["experts"] for n in NODES[1:] if n in msgs))
    for j in range(E):
        if j not in trained:
            assert np.array_equal(new[f"expert{j}.W"], params[f"expert{j}.W"]), j
    assert np.allclose(new["gate.W"], 1.0)               # only the honest replies moved it
    entry = json.loads((tmp_path / "h.json").read_text())["1"]
    if attack != "unplanned node":
        assert victim in entry["dropouts"]
    if attack == "error reply":
        assert entry["errors"] == ["0: boom"] and metrics["rejected"] == 0
    else:
        assert ("99" if attack == "unplanned node" else str(victim)) in entry["rejected"], entry
        assert metrics["rejected"] == 1
    nxt = configure(s, 2, new)                              # the next round plans normally
    assert nxt


def test_duplicate_replies_are_rejected(tmp_path):
    s = strategy(tmp_path)
    msgs = configure(s, 1, model())
    replies = [honest(msgs[n]) for n in NODES] + [honest(msgs[NODES[0]], value=5.0)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert "replied 2 times" in s.history[1]["rejected"][str(NODES[0])]
    assert np.allclose(to_numpy(arrays)["gate.W"], 1.0)


def test_a_round_without_a_valid_reply_keeps_the_model_and_says_so(tmp_path, caplog):
    s = strategy(tmp_path)
    msgs = configure(s, 1, model())
    with caplog.at_level("WARNING"):
        out = s.aggregate_train(1, [forged(msgs[n], arrays={"gate.W": np.full((5, E), np.nan)}) for n in msgs])
    assert out == (None, None)
    assert len(s.history[1]["rejected"]) == len(msgs)
    msgs = configure(s, 2, model())
    assert s.aggregate_train(2, []) == (None, None)
    assert sorted(s.history[2]["dropouts"]) == sorted(msgs)


def test_inflated_counts_are_capped_by_the_first_report(tmp_path):
    s = strategy(tmp_path, aggregation=AggregationConfig(relative_clip=None))   # the weight cap alone
    msgs = configure(s, 1, model())
    s.aggregate_train(1, [honest(msgs[n], n=50) for n in msgs])
    msgs = configure(s, 2, model())
    liar = NODES[0]
    replies = [honest(msgs[n], value=1.0, n=50) for n in msgs if n != liar] + [honest(msgs[liar], 101.0, n=999_999)]
    arrays, _ = s.aggregate_train(2, replies)
    gate = to_numpy(arrays)["gate.W"][0, 0]
    assert gate == pytest.approx((3 * 1.0 + 101.0) / 4)       # one vote of 50 samples, not 999,999


def test_median_aggregation_resists_a_planned_outlier(tmp_path):
    s = strategy(tmp_path, aggregation=AggregationConfig(method="median"))
    msgs = configure(s, 1, model())
    replies = [honest(msgs[n], 1.0) for n in msgs if n != NODES[0]] + [honest(msgs[NODES[0]], 500.0)]
    arrays, _ = s.aggregate_train(1, replies)
    assert np.allclose(to_numpy(arrays)["gate.W"], 1.0)


def test_a_restarted_server_continues_from_its_state(tmp_path):
    s = strategy(tmp_path)
    for rnd in (1, 2):
        msgs = configure(s, rnd, model())
        s.aggregate_train(rnd, [honest(msgs[n]) for n in msgs])
    again = strategy(tmp_path)                     # a new run on the same state file: Flower counts from 1
    msgs = configure(again, 1, model())
    again.aggregate_train(1, [honest(msgs[n]) for n in msgs])
    assert again.coordinator.last_round == 4 and len(again.coordinator.monitor.history) == 3   # rounds 1, 2, 4
    crashed = strategy(tmp_path)
    configure(crashed, 1, model())                 # round 6 planned and saved, never aggregated (the server died)
    assert crashed.coordinator.pending["round"] == 6
    resumed = strategy(tmp_path)
    msgs = configure(resumed, 1, model())          # re-plans past the abandoned round, with a warning
    resumed.aggregate_train(1, [honest(msgs[n]) for n in msgs])
    assert resumed.coordinator.last_round == 8 and len(resumed.coordinator.monitor.history) == 4


class QueryGrid(Grid):
    """A grid whose nodes answer the capacity query: declared, forged or with an error."""

    def __init__(self, nodes, answers):
        super().__init__(nodes)
        self.answers = answers
        self.queried = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.queried.append(node)
            assert m.metadata.message_type == MessageType.QUERY
            answer = self.answers.get(node)
            if answer is None:
                continue                                        # never answers: the timeout passes
            if answer == "error":
                reply = Message(Error(code=0, reason="no query handler"), reply_to=m)
            else:
                reply = Message(content=RecordDict({"capacity": ConfigRecord(answer)}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out


def test_new_nodes_declare_capacity_and_label_before_their_first_round(tmp_path):
    cfg = CoordinatorConfig(capacity={"default_capacity": 1, "max_capacity": 3})
    s = AlignedStrategy(num_experts=E, config=cfg)
    grid = QueryGrid(NODES, {11: {"max-experts": 3, "label": "partition-0"}, 12: "error",
                             13: {"max-experts": -3, "label": "bad\nlabel"}})
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(model()), ConfigRecord({}), grid)}
    plan = s.history[1]["plan"]
    assert plan["11"]["capacity"] == 3 and plan["11"]["label"] == "partition-0"
    assert len(msgs[11].content["config"]["experts"]) >= 2
    for node in ("12", "13", "14"):                       # error, forged, silent: the profiler's default
        assert plan[node]["capacity"] == 1 and plan[node]["label"] is None, node
    assert sorted(grid.queried) == NODES
    s.aggregate_train(1, [honest(m) for m in msgs.values()])
    list(s.configure_train(2, to_record(model()), ConfigRecord({}), grid))
    assert sorted(grid.queried) == NODES                  # each node is asked once
    assert s.history[2]["plan"]["11"]["label"] == "partition-0"


def pushed(msgs):
    """Give the configured messages ids, as the grid does when it pushes them."""
    for node, m in msgs.items():
        m.metadata.__dict__["_message_id"] = f"msg-{node}"
    return msgs


def test_a_reply_to_a_message_never_sent_is_not_used(tmp_path):
    s = strategy(tmp_path)
    msgs = pushed(configure(s, 1, model()))
    victim = NODES[0]
    fake = Message(content=RecordDict({"config": ConfigRecord({"experts": [0]})}), dst_node_id=victim,
                   message_type=MessageType.TRAIN)
    fake.metadata.__dict__["_message_id"] = "never-sent"
    rogue = honest(msgs[victim], value=777.0)
    rogue.metadata.__dict__["_reply_to_message_id"] = "never-sent"
    arrays, metrics = s.aggregate_train(1, [honest(msgs[n]) for n in NODES[1:] if n in msgs] + [rogue])
    assert not np.any(to_numpy(arrays)["gate.W"] == 777.0)
    assert "is not a reply to the message" in s.history[1]["rejected"][str(victim)]
    assert victim in s.history[1]["dropouts"]


def test_a_reply_forged_in_another_nodes_name_does_not_reject_the_honest_node(tmp_path):
    s = strategy(tmp_path)
    msgs = pushed(configure(s, 1, model()))
    a, b = NODES[0], NODES[1]
    forged_reply = honest(msgs[a], value=777.0)
    forged_reply.metadata.__dict__["_src_node_id"] = b           # node a answers its own message in b's name
    replies = [honest(msgs[n]) for n in NODES if n != a] + [forged_reply]
    arrays, metrics = s.aggregate_train(1, replies)
    assert str(b) in s.history[1]["received"] and f"{b} (foreign)" in s.history[1]["rejected"]
    assert b not in s.history[1]["dropouts"] and a in s.history[1]["dropouts"]
    assert not np.any(to_numpy(arrays)["gate.W"] == 777.0)


def test_aggregating_a_round_twice_or_one_never_configured_is_ignored(tmp_path):
    s = strategy(tmp_path)
    msgs = configure(s, 1, model())
    first = s.aggregate_train(1, [honest(msgs[n]) for n in msgs])
    assert first[0] is not None
    state = json.loads((tmp_path / "s.json").read_text())
    assert s.aggregate_train(1, [honest(msgs[n], value=5.0) for n in msgs]) == (None, None)
    assert s.aggregate_train(7, []) == (None, None)
    assert json.loads((tmp_path / "s.json").read_text()) == state
    assert configure(s, 2, model())                      # and the next round goes on


def test_privacy_floor_holds_back_experts_whose_nodes_dropped(tmp_path, caplog):
    """min_group=2 with one planned node silent: an expert left with one accepted reply keeps its
    arrays (its lone update is not published), the history and the log say which."""
    s = strategy(tmp_path, aggregation=AggregationConfig(min_group=2))
    start = model()
    msgs = configure(s, 1, start)
    silent = NODES[0]
    planned = {n: list(m.content["config"]["experts"]) for n, m in msgs.items()}
    senders = {j: sum(j in e for n, e in planned.items() if n != silent) for j in range(E)}
    with caplog.at_level("WARNING"):
        arrays, _ = s.aggregate_train(1, [honest(msgs[n], value=3.0) for n in msgs if n != silent])
    new = to_numpy(arrays)
    held = {j for j, k in senders.items() if 0 < k < 2}
    assert held, (planned, senders)
    assert s.history[1]["held_back"]["experts"] == {j: senders[j] for j in held}
    for key, value in new.items():
        j = s.expert_of(key)
        moved = not np.allclose(value, start[key])
        assert moved == (j is None or senders[j] >= 2), (key, j, senders)
    assert "privacy floor 2" in caplog.text
