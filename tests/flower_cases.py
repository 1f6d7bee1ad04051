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
from alignment_solver.integrations.flower import AlignedStrategy, TrainingFailedError, error_text, to_numpy, to_record
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
        assert entry["errors"] == {str(victim): "boom"} and metrics["rejected"] == 0
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
            if answer == "error" or isinstance(answer, tuple):
                reason = answer[1] if isinstance(answer, tuple) else "no query handler"
                reply = Message(Error(code=2, reason=reason), reply_to=m)
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


# ---- fused expert tensors (transformers 5 layout) ------------------------------------------------
def mixtral(layers=2, E=4, H=8, inner=6, vocab=16, seed=0):
    """Arrays shaped like a transformers-5 Mixtral: fused experts under ``model.layers.{i}.mlp.experts.``."""
    shapes = {"model.embed_tokens.weight": (vocab, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"})
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.gate.weight": (E, H), p + "mlp.experts.gate_up_proj": (E, 2 * inner, H),
                       p + "mlp.experts.down_proj": (E, H, inner)})
    shapes.update({"model.norm.weight": (H,), "lm_head.weight": (vocab, H)})
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}


FUSED = [f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("gate_up_proj", "down_proj")]


def serialised(arrays):
    return sum(len(Array(np.ascontiguousarray(v)).data) for v in arrays.values())


def test_fused_experts_travel_as_slices_and_the_global_model_comes_back_joined(tmp_path, caplog):
    """Each node receives the shared arrays and exactly its experts' slices (bytes = those slices);
    the aggregate is the full fused model, float32, with unassigned slices unchanged."""
    cfg = CoordinatorConfig(capacity={"default_capacity": 1, "max_capacity": 1})
    s = AlignedStrategy(num_experts=4, config=cfg, history_path=str(tmp_path / "h.json"))
    full = mixtral()
    nodes = [11, 12]                                   # capacity 1 each: 2 of the 4 experts are assigned
    with caplog.at_level("INFO"):
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(full), ConfigRecord({}), Grid(nodes))}
    assert "4 units (expert), 2 MoE layer(s), 17 shared arrays, 4 fused parameters split by expert" in caplog.text
    shared = [k for k in full if k not in FUSED]
    sent_bytes = 0
    for node, m in msgs.items():
        config = m.content["config"]
        experts = list(config["experts"])
        assert config["num-experts"] == 4 and config["units"] == "expert" and "expert-axes" not in config
        got = to_numpy(m.content["arrays"])
        want = {**{k: full[k] for k in shared}, **{f"{k}[{j}]": full[k][j] for k in FUSED for j in experts}}
        assert set(got) == set(want), node
        for k, v in want.items():
            assert got[k].dtype == np.float32 and np.array_equal(got[k], v), k
        slice_bytes = sum(full[k].nbytes // 4 for k in FUSED)
        assert sum(v.nbytes for v in got.values()) == sum(full[k].nbytes for k in shared) + len(experts) * slice_bytes
        sent_bytes += serialised(want)
    assert s.history[1]["bytes_down"] == sent_bytes
    trainer = {j: n for n, m in msgs.items() for j in m.content["config"]["experts"]}
    assert 0 < len(trainer) < 4, trainer
    replies = [honest(m, value=float(n)) for n, m in msgs.items()]
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["rejected"] == 0
    assert s.history[1]["bytes_up"] == sent_bytes
    for got in s.history[1]["received"].values():
        assert {k for k in got["keys"] if "[" in k} == {f"{k}[{j}]" for k in FUSED for j in got["experts"]}
    new = to_numpy(arrays)
    assert list(new) == list(full)
    for k, v in new.items():
        assert v.shape == full[k].shape and v.dtype == np.float32, k
    for k in FUSED:
        for j in range(4):
            if j in trainer:
                assert np.all(new[k][j] == float(trainer[j])), (k, j)
            else:
                assert np.array_equal(new[k][j], full[k][j]), (k, j)       # unassigned slices unchanged
    assert np.allclose(new["lm_head.weight"], np.mean(nodes))
    assert s.history[1]["changed_experts"] == sorted(trainer)
    nxt = list(s.configure_train(2, arrays, ConfigRecord({}), Grid(nodes)))   # the joined model goes round again
    assert nxt and all(any(k.endswith("]") for k in m.content["arrays"].keys()) for m in nxt)


def test_fused_slices_are_validated_one_by_one(tmp_path):
    s = AlignedStrategy(num_experts=4, config=CoordinatorConfig(capacity={"default_capacity": 1, "max_capacity": 1}))
    full = mixtral()
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(full), ConfigRecord({}), Grid([11, 12]))}
    mine = list(msgs[11].content["config"]["experts"])[0]
    other = next(j for j in range(4) if j != mine)
    key = FUSED[0]
    bad = {
        11: forged(msgs[11], arrays={f"{key}[{other}]": np.ones((12, 8), np.float32)}),    # a slice not assigned
        12: forged(msgs[12], arrays={key: np.ones((4, 12, 8), np.float32)}),                # the whole fused tensor
    }
    s.aggregate_train(1, list(bad.values()))
    rejected = s.history[1]["rejected"]
    assert f"belongs to expert {other}" in rejected["11"], rejected
    assert "is not part of the model" in rejected["12"], rejected
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(2, to_record(full), ConfigRecord({}), Grid([11, 12]))}
    mine = list(msgs[11].content["config"]["experts"])[0]
    s.aggregate_train(2, [forged(msgs[11], arrays={f"{key}[{mine}]": np.ones((8, 12), np.float32)}),
                          forged(msgs[12], arrays={f"{key}[{list(msgs[12].content['config']['experts'])[0]}]":
                                                   np.full((12, 8), np.nan, np.float32)})])
    rejected = s.history[2]["rejected"]
    assert "must have shape (12, 8)" in rejected["11"] and "NaN" in rejected["12"], rejected


def test_declared_expert_axes_split_other_layouts_and_reach_the_node(tmp_path):
    """JetMoE-style input_linear / output_linear, declared with expert_axes; the node gets them in its config."""
    E, H = 3, 4
    rng = np.random.default_rng(1)
    full = {"model.layers.0.mlp.router.layer.weight": rng.normal(size=(E, H)).astype(np.float32),
            "model.layers.0.mlp.input_linear.weight": rng.normal(size=(E, 10, H)).astype(np.float32),
            "model.layers.0.mlp.output_linear.weight": rng.normal(size=(E, H, 5)).astype(np.float32),
            "lm_head.weight": rng.normal(size=(7, H)).astype(np.float32)}
    axes = {r"mlp\.(input|output)_linear\.weight$": 0}
    s = AlignedStrategy(num_experts=E, expert_axes=axes,
                        config=CoordinatorConfig(capacity={"default_capacity": 1, "max_capacity": 1}))
    msgs = list(s.configure_train(1, to_record(full), ConfigRecord({}), Grid([11])))
    assert len(msgs) == 1
    config = msgs[0].content["config"]
    j = list(config["experts"])[0]
    assert json.loads(config["expert-axes"]) == axes and config["num-experts"] == E
    assert set(msgs[0].content["arrays"].keys()) == {"model.layers.0.mlp.router.layer.weight", "lm_head.weight",
                                                     f"model.layers.0.mlp.input_linear.weight[{j}]",
                                                     f"model.layers.0.mlp.output_linear.weight[{j}]"}
    arrays, _ = s.aggregate_train(1, [honest(msgs[0], value=2.0)])
    new = to_numpy(arrays)
    for k in ("model.layers.0.mlp.input_linear.weight", "model.layers.0.mlp.output_linear.weight"):
        assert new[k].shape == full[k].shape and np.all(new[k][j] == 2.0)
        assert all(np.array_equal(new[k][i], full[k][i]) for i in range(E) if i != j)


@pytest.mark.parametrize("axes, message", [
    ({"(": 0}, "is not a regular expression"),
    ({"x": -1}, "must be an axis index >= 0; got -1"),
    (["x"], "expert_axes must be a dict"),
    ({1: 0}, "keys must be regular expressions"),
])
def test_bad_expert_axes_are_refused_at_construction(axes, message):
    with pytest.raises(ValueError, match=message):
        AlignedStrategy(num_experts=4, expert_axes=axes)


# ---- no silent success ----------------------------------------------------------------------------
REASON = "MoE layer 'blocks.0.moe' routed 256 samples but the batch has 32"
DEPLOYMENT_REASON = f"<class 'ValueError'>:<'{REASON}'>"          # flwr 1.42, a SuperNode's ClientApp process
RAY_REASON = (                                                      # flwr 1.42 simulation runtime (Ray), abridged
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=5866, ip=192.0.2.2, actor_id=6cc3)\n  File \"/x/flwr/clientapp/client_app.py\", line 161, in __call__\n"
    "    return self._registered_funcs[full_name](message, context)\n"
    f"ValueError: {REASON}\n\nThe above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=5866)\n  File \"/x/ray_actor.py\", line 65, in run\n"
    "    raise ClientAppException(str(ex)) from ex\nflwr.clientapp.client_app.ClientAppException: \n"
    f"Exception ClientAppException occurred. Message: {REASON}'>")


def test_error_text_reads_the_node_side_exception():
    assert error_text(DEPLOYMENT_REASON) == f"ValueError: {REASON}"
    assert error_text(RAY_REASON) == f"ValueError: {REASON}"
    assert error_text("Node 12 is unavailable") == "Node 12 is unavailable"
    assert len(error_text("x" * 2000)) == 500


def failing(msgs, reason=DEPLOYMENT_REASON, silent=()):
    return [Message(Error(code=2, reason=reason), reply_to=m) for n, m in msgs.items() if n not in silent]


def test_training_stops_after_max_failed_rounds_naming_the_nodes_reason(tmp_path, caplog):
    s = strategy(tmp_path)
    for rnd in (1, 2):
        msgs = configure(s, rnd, model())
        with caplog.at_level("WARNING"):
            assert s.aggregate_train(rnd, failing(msgs, RAY_REASON if rnd == 2 else DEPLOYMENT_REASON)) == (None, None)
    assert f"node {NODES[0]} replied with an error: ValueError: {REASON}" in caplog.text
    assert "2 failed round(s) in a row (max_failed_rounds=3)" in caplog.text
    msgs = configure(s, 3, model())
    with pytest.raises(TrainingFailedError, match=r"no valid training reply in 3 consecutive round\(s\) \(rounds 1 to 3; "
                       r"max_failed_rounds=3\); the most frequent reason \(\d+ of \d+ planned node-rounds\): "
                       rf"replied with an error: ValueError: {REASON}; 1 other reason") as err:
        s.aggregate_train(3, failing(msgs, silent=[NODES[0]]))
    assert isinstance(err.value, RuntimeError)
    assert s.history[3]["errors"][str(NODES[1])] == f"ValueError: {REASON}"
    assert json.loads((tmp_path / "h.json").read_text())["3"]["dropouts"]        # the history was written first


def test_a_valid_round_resets_the_count_and_none_never_stops(tmp_path):
    s = strategy(tmp_path)
    for rnd, ok in [(1, False), (2, False), (3, True), (4, False), (5, False)]:
        msgs = configure(s, rnd, model())
        s.aggregate_train(rnd, [honest(m) for m in msgs.values()] if ok else failing(msgs))
    assert len(s.failed) == 2
    (tmp_path / "p").mkdir()
    patient = strategy(tmp_path / "p", max_failed_rounds=None)
    for rnd in range(1, 6):
        msgs = configure(patient, rnd, model())
        patient.aggregate_train(rnd, failing(msgs))
    with pytest.raises(ValueError, match="max_failed_rounds must be None .* got 0"):
        strategy(tmp_path, max_failed_rounds=0)


def test_a_run_shorter_than_max_failed_rounds_that_never_trains_fails_at_its_end(tmp_path):
    s = strategy(tmp_path)
    s.num_rounds = 2
    msgs = configure(s, 1, model())
    s.aggregate_train(1, failing(msgs))
    msgs = configure(s, 2, model())
    with pytest.raises(TrainingFailedError, match=r"2 consecutive round\(s\)"):
        s.aggregate_train(2, [])                         # nobody answers in time
    assert s.failed[-1][1] == ["sent no reply before the round's timeout"] * len(msgs)


# ---- round 1: the capacity query ----------------------------------------------------------------
def test_the_capacity_query_log_names_who_did_not_answer_and_why(caplog):
    no_handler = "<class 'ValueError'>:<'No query function registered with name 'default''>"
    grid = QueryGrid(NODES, {11: ("error", no_handler), 12: ("error", RAY_REASON.replace(REASON, "x").replace(
        "ValueError: x", "ValueError: No query function registered with name 'default'")), 13: ("error", "boom")})
    s = AlignedStrategy(num_experts=E)
    assert s.query_timeout == 120.0
    with caplog.at_level("INFO"):
        list(s.configure_train(1, to_record(model()), ConfigRecord({}), grid))
    lines = [r.getMessage() for r in caplog.records]
    handler = [ln for ln in lines if "no query handler" in ln]
    assert len(handler) == 1 and "[11, 12]" in handler[0], lines
    assert any("node 13 failed the capacity query: boom" in ln for ln in lines), lines
    assert any("nodes [14] did not answer the capacity query within query_timeout=120 s" in ln for ln in lines), lines
    assert any("0 of 4 new nodes declared their capacity" in ln for ln in lines), lines


# ---- evaluation ---------------------------------------------------------------------------------
class RunGrid(Grid):
    """A whole run through Strategy.start: nodes answer TRAIN honestly (or fail), EVALUATE with metrics;
    no node has a query handler."""

    def __init__(self, nodes, fail=False):
        super().__init__(nodes)
        self.fail = fail
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append((m.metadata.message_type, m.metadata.dst_node_id))
            kind = m.metadata.message_type
            if kind == MessageType.QUERY or (kind == MessageType.TRAIN and self.fail):
                reason = DEPLOYMENT_REASON if kind == MessageType.TRAIN else \
                    "<class 'ValueError'>:<'No query function registered with name 'default''>"
                out.append(Message(Error(code=2, reason=reason), reply_to=m))
            elif kind == MessageType.TRAIN:
                out.append(honest(m))
            else:
                out.append(Message(content=RecordDict({"metrics": MetricRecord(
                    {"num-examples": 10, "accuracy": 0.5, "loss": 1.0})}), reply_to=m))
        return out


def mb(history, key):
    return sum(h.get(key, 0) for h in history.values()) / 1e6


def test_federated_evaluation_runs_in_the_last_round_by_default_and_its_bytes_are_separate(tmp_path):
    nodes = list(range(11, 19))
    runs = {}
    for name, kw in {"default": {}, "every round (before)": {"evaluate_every": 1},
                     "every 2 rounds, half": {"evaluate_every": 2, "fraction_evaluate": 0.5}}.items():
        s = AlignedStrategy(num_experts=E, config=CoordinatorConfig(capacity={"default_capacity": 2, "max_capacity": 2}),
                            **kw)
        grid = RunGrid(nodes)
        s.start(grid=grid, initial_arrays=to_record(model()), num_rounds=5)
        evaluated = {}
        for r in range(1, 6):
            evaluated[r] = s.history[r]["eval_bytes_down"]
            assert s.history[r]["eval_bytes_up"] == 0
        runs[name] = (s, evaluated)
        print(f"{name}: train {mb(s.history, 'bytes_down') + mb(s.history, 'bytes_up'):.4f} MB, "
              f"evaluation {mb(s.history, 'eval_bytes_down') + mb(s.history, 'eval_bytes_up'):.4f} MB")
    full = serialised(model())
    s, evaluated = runs["default"]
    assert s.num_rounds == 5 and [r for r in evaluated if evaluated[r]] == [5]
    assert evaluated[5] == len(nodes) * full and s.history[5]["evaluate"]["accuracy"] == 0.5
    assert [r for r, b in runs["every round (before)"][1].items() if b] == [1, 2, 3, 4, 5]
    s, evaluated = runs["every 2 rounds, half"]
    assert {r: b // full for r, b in evaluated.items() if b} == {2: 4, 4: 4, 5: 4}
    train = mb(s.history, "bytes_down")
    assert mb(runs["default"][0].history, "eval_bytes_down") < train < mb(runs["every round (before)"][0].history,
                                                                          "eval_bytes_down")


def test_a_run_whose_nodes_all_fail_raises_out_of_start(tmp_path, caplog):
    s = strategy(tmp_path)
    with caplog.at_level("WARNING"), pytest.raises(TrainingFailedError, match=f"ValueError: {REASON}"):
        s.start(grid=RunGrid(NODES, fail=True), initial_arrays=to_record(model()), num_rounds=10)
    assert max(s.history) == 3
    assert sum("no query handler" in r.getMessage() for r in caplog.records) == 1


def test_evaluate_replies_from_nodes_not_asked_or_sent_twice_are_rejected_and_claims_capped(tmp_path):
    """Five copies of one reply claiming 10^6 examples at accuracy 1.0, and a node never asked, do not
    move the round's accuracy off the honest 0.5 (issue 36)."""
    s = strategy(tmp_path, evaluate_every=1)
    msgs = list(s.configure_evaluate(3, to_record(model()), ConfigRecord({}), Grid(NODES)))
    assert {m.metadata.dst_node_id for m in msgs} == set(NODES)

    def answer(m, n, acc):
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": n, "accuracy": acc,
                                                                     "loss": 1.0})}), reply_to=m)

    honest_replies = [answer(m, 100, 0.5) for m in msgs[1:]]
    liar = [answer(msgs[0], 10 ** 6, 1.0) for _ in range(5)]
    out = s.aggregate_evaluate(3, honest_replies + liar)
    assert out["accuracy"] == pytest.approx(0.5)
    assert "replied 5 times" in s.history[3]["eval_rejected"][str(NODES[0])]
    (tmp_path / "b").mkdir()
    s2 = strategy(tmp_path / "b", evaluate_every=1)
    msgs2 = list(s2.configure_evaluate(3, to_record(model()), ConfigRecord({}), Grid(NODES[:2])))
    out2 = s2.aggregate_evaluate(3, [answer(m, 100, 0.5) for m in msgs2] + [answer(msgs[2], 10 ** 6, 1.0)])
    assert out2["accuracy"] == pytest.approx(0.5)
    assert "was not asked" in s2.history[3]["eval_rejected"][str(NODES[2])]
