"""PyTorch helpers and the strategy with a PyTorch MoE (run by tests/test_torch.py in its own interpreter:
flwr loads gRPC and torch starts threads, after which this process could not fork solver workers)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity
from nvflare.app_common.abstract.fl_model import FLModel
from torch import nn

from alignment_solver.coordinator import CoordinatorConfig
from alignment_solver.integrations.flower import AlignedStrategy, to_numpy, to_record
from alignment_solver.integrations.nvflare import AlignedController
from alignment_solver.integrations.replies import ReplyChecker
from alignment_solver.integrations.torch import AlignedClient, evaluate_reply
from alignment_solver.integrations.units import UnitMap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "flower_torch"))
from flower_torch.task import Net, initial_arrays, node_batches  # noqa: E402

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1     # as inside a ServerApp
NODES = [21, 22, 23, 24, 25, 26]


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def delivery(arrays, units, mode="expert"):
    um = UnitMap(arrays, units=mode)
    return {k: v for k, v in arrays.items() if um(k) is None or um(k) in units}


def train(model, received, batches):
    client = AlignedClient(model, received)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with client.training():
        for x, y in batches:
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            opt.step()
            client.track(out, y)
    return client


def test_client_loads_exactly_its_units_masks_the_rest_and_replies_with_what_it_received():
    init = initial_arrays(0)
    sent = delivery(init, [2, 5])
    model = Net(seed=7)                      # different local weights: loading must overwrite them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = train(model, FLModel(params=sent, meta={"experts": [2, 5]}), node_batches(0, 6))
    reply = client.reply(max_experts=2)
    assert set(reply.params) == set(sent)
    assert all(v.dtype == np.float32 for v in reply.params.values())
    um = UnitMap(init)
    state = model.state_dict()
    for k, v in state.items():               # unassigned experts: neither loaded nor trained
        if um(k) not in (None, 2, 5):
            assert torch.equal(v, before[k]), k
    changed = {um(k) for k in sent if um(k) is not None and not np.array_equal(reply.params[k], sent[k])}
    assert changed == {2, 5}
    m = reply.metrics
    assert m["experts"] == [2, 5] and sum(m["expert-samples"]) >= m["num-examples"] > 0
    assert len(m["routing"]) == 8 and m["max-experts"] == 2
    checker = ReplyChecker(init, 8, owner=um)
    from alignment_solver.integrations.replies import Reply
    checked = checker.check(Reply("site-1", arrays=reply.params, metrics=reply.metrics), [2, 5])
    assert checked.arrays["blocks.1.experts.5.0.weight"].dtype == np.float32


def test_top_k_is_clamped_to_one_assigned_expert_and_restored():
    model = Net()
    client = train(model, FLModel(params=delivery(initial_arrays(0), [4]), meta={"experts": [4]}), node_batches(1, 6))
    assert all(block.top_k == 2 for block in model.blocks)
    m = client.metrics()
    assert m["expert-samples"] == [m["num-examples"]]     # every sample went to expert 4 in both blocks


def test_an_assigned_expert_without_samples_reports_zero_and_accuracy_zero():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(4, 2)
            self.experts = nn.ModuleList(nn.Linear(4, 3) for _ in range(2))
            self.top_k = 1

        def forward(self, x):
            idx = self.router(x).argmax(dim=1)
            return torch.stack([self.experts[int(i)](row) for i, row in zip(idx, x)])

    model = Tiny()
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.copy_(torch.tensor([5.0, -5.0]))   # everything goes to expert 0
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    client = train(model, FLModel(params=arrays, meta={"experts": [0, 1]}),
                   [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
    m = client.metrics()
    assert m["expert-samples"] == [8, 0] and m["expert-accuracy"][1] == 0.0
    assert m["expert-loss"][1] == pytest.approx(m["expert-loss"][0])


def test_a_wrong_delivery_is_refused():
    init = initial_arrays(0)
    with pytest.raises(ValueError, match="unexpected"):
        AlignedClient(Net(), FLModel(params=init, meta={"experts": [1]}))
    with pytest.raises(ValueError, match="missing"):
        AlignedClient(Net(), FLModel(params=delivery(init, [1]), meta={"experts": [1, 2]}))
    with pytest.raises(ValueError, match="names no 'experts'"):
        AlignedClient(Net(), FLModel(params=delivery(init, [1]), meta={}))


def test_evaluate_reply_scores_the_full_model():
    reply = evaluate_reply(Net(), FLModel(params=initial_arrays(0), meta={}), node_batches(2, 6))
    assert reply.metrics["num-examples"] > 0 and 0 <= reply.metrics["accuracy"] <= 1


def test_a_model_without_expert_keys_is_refused_at_the_first_configure_train():
    arrays = {"body.weight": np.ones((2, 2), np.float32), "moe.expert_list.0.w": np.ones(2, np.float32)}
    s = AlignedStrategy(num_experts=1)
    with pytest.raises(ValueError, match=r"'moe.expert_list.0.w' matched none of the patterns.*expert_of"):
        s.configure_train(1, to_record(arrays), ConfigRecord({}), Grid(NODES))


def test_the_nvflare_controller_refuses_it_before_the_first_round():
    c = AlignedController(num_experts=1, initial_model=f"{__name__}:bad_model", state_path="")
    with pytest.raises(ValueError, match="no parameter key belongs to an expert"):
        c._setup()


def bad_model(num_experts):
    return {"fc.weight": np.ones((2, 2), np.float32)}


@pytest.mark.parametrize("units", ["expert", "layer"])
def test_strategy_rounds_with_a_pytorch_moe(units):
    """configure_train -> AlignedClient on each node -> aggregate_train, three rounds, float32 kept."""
    s = AlignedStrategy(num_experts=8, units=units,
                        config=CoordinatorConfig(capacity={"default_capacity": 2, "max_capacity": 2}))
    arrays = initial_arrays(0)
    um = UnitMap(arrays, units=units)
    assert um.num_units == (16 if units == "layer" else 8)
    for rnd in (1, 2, 3):
        msgs = list(s.configure_train(rnd, to_record(arrays), ConfigRecord({}), Grid(NODES)))
        assert {m.metadata.dst_node_id for m in msgs} == set(NODES)
        replies = []
        for m in msgs:
            experts = list(m.content["config"]["experts"])
            got = set(m.content["arrays"].keys())
            assert got == set(delivery(arrays, experts, units)), "shared arrays and exactly its units"
            if units == "layer":
                layers = {um.groups[e] for e in experts}
                assert layers == {0, 1}, "at least one unit of each MoE layer"
            blocks = {k.split(".experts.")[0] for k in got if ".experts." in k}
            assert blocks == {"blocks.0", "blocks.1"}
            client = train(Net(), m, node_batches(NODES.index(m.metadata.dst_node_id), len(NODES), round_=rnd))
            replies.append(client.reply())
        new, metrics = s.aggregate_train(rnd, replies)
        assert metrics["rejected"] == 0 and metrics["nodes"] == len(NODES)
        out = to_numpy(new)
        assert set(out) == set(arrays) and all(v.dtype == np.float32 for v in out.values())
        assert s.history[rnd]["trained_experts"], rnd
        arrays = out
    assert len(set().union(*(set(s.history[r]["trained_experts"]) for r in (1, 2, 3)))) == um.num_units
