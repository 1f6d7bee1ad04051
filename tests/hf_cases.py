"""Hugging Face MoE families (transformers 5: fused experts, TopK routers) and token-routed custom MoEs
through AlignedClient, the Flower strategy's aggregation and the NVFlare workflow's (run by
tests/test_hf.py in its own interpreter).  Tiny configs from AutoConfig, random weights: nothing is
downloaded."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity
from nvflare.app_common.abstract.fl_model import FLModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from alignment_solver.coordinator import CoordinatorConfig
from alignment_solver.integrations.families import FAMILIES
from alignment_solver.integrations.flower import AlignedStrategy, to_numpy, to_record
from alignment_solver.integrations.replies import Reply, ReplyChecker
from alignment_solver.integrations.torch import AlignedClient, evaluate_reply, moe_layers
from alignment_solver.integrations.units import UnitMap

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1     # as inside a ServerApp

E, VOCAB, K = 8, 40, 2
BASE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=K, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": dict(num_local_experts=E),
    "qwen2_moe": dict(num_experts=E, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=E, moe_intermediate_size=16, head_dim=8),
    "olmoe": dict(num_experts=E),
    "deepseek_v3": dict(n_routed_experts=E, moe_intermediate_size=16, n_group=2, topk_group=1, n_shared_experts=1,
                        first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=4),
    "gpt_oss": dict(num_local_experts=E, head_dim=8, layer_types=["full_attention"] * 2),
    "jetmoe": dict(num_local_experts=E, kv_channels=8),
}
assert set(CONFIGS) == set(FAMILIES), "every family in the table is tested"
NODES = [31, 32, 33, 34]


def hf_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **BASE, **CONFIGS[family])).float()


def arrays_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def token_batches(seed: int, n: int = 3, batch: int = 4, length: int = 12):
    """Next-token batches: labels are the ids shifted left, the last position ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        out.append((ids, torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)))
    return out


def train(model, received, batches, axes=None, lr=0.5):
    client = AlignedClient(model, received, expert_axes=axes)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with client.training():
        for ids, labels in batches:
            opt.zero_grad()
            logits = model(input_ids=ids).logits
            F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100).backward()
            opt.step()
            client.track(logits, labels)
    return client


def part(state, um, key):
    full, j = um.source(key)
    return state[full] if j is None else state[full].select(um.fused[full].axis, j)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_expert_assigned_leaves_the_forward_bit_identical(family):
    model = hf_model(family)
    axes = FAMILIES[family].expert_axes
    um = UnitMap(arrays_of(model), num_experts=E, expert_axes=axes)
    ids, labels = token_batches(1)[0]
    model.train()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    client = AlignedClient(model, FLModel(params=um.split(arrays_of(model)),
                                          meta={"experts": list(range(E)), "num-experts": E}), expert_axes=axes)
    with client.training(), torch.no_grad():
        logits = model(input_ids=ids).logits
        client.track(logits, labels)
    assert torch.equal(logits, reference)
    assert client.metrics()["num-examples"] == int((labels != -100).sum())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_unassigned_slices_get_no_token_and_stay_unchanged_assigned_ones_move(family):
    model = hf_model(family)
    axes = FAMILIES[family].expert_axes
    init = arrays_of(model)
    um = UnitMap(init, num_experts=E, expert_axes=axes)
    assert um.fused, "the family's experts are fused parameters"
    mine = [1, 4, 6]
    wire = um.split(init)
    sent = {k: v for k, v in wire.items() if um(k) is None or um(k) in mine}
    local = hf_model(family, seed=5)                 # other local weights: loading overwrites the sent ones
    before = {k: v.clone() for k, v in local.state_dict().items()}
    client = train(local, FLModel(params=sent, meta={"experts": mine, "num-experts": E}), token_batches(2), axes)
    state = local.state_dict()
    for k in um.keys:
        if um(k) is not None and um(k) not in mine:
            assert torch.equal(part(state, um, k), part(before, um, k)), k
    reply = client.reply()
    assert set(reply.params) == set(sent)
    assert all(v.dtype == np.float32 for v in reply.params.values())
    moved = {um(k) for k in sent if um(k) is not None and not np.array_equal(reply.params[k], sent[k])}
    assert moved == set(mine)
    m = reply.metrics
    assert m["counts-tokens"] == 1 and m["num-examples"] == 3 * 4 * 11
    assert all(0 < s <= m["num-examples"] for s in m["expert-samples"])
    assert len(set(m["expert-loss"])) > 1, "per-expert losses come from each expert's own tokens"
    for layer in moe_layers(local, um):                # every layer of the family was found and masked
        assert sorted(layer.units) == list(range(E))
    ReplyChecker(wire, E, owner=um).check(Reply("n", arrays=reply.params, metrics=m), mine)


class TokenMoE(nn.Module):
    """A transformer-style MoE block: the router runs on hidden.reshape(-1, d) (one choice per token)."""

    def __init__(self, d: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.top_k = top_k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        flat = h.reshape(-1, d)
        weights, chosen = self.gate(flat).softmax(dim=-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if len(rows):
                out[rows] += weights[rows, slot, None] * expert(flat[rows])
        return h + out.reshape(B, T, d)


class Tagger(nn.Module):
    """Two token-routed MoE blocks; ``pool=True`` classifies whole sequences instead of tokens."""

    def __init__(self, pool: bool = False, experts: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(TokenMoE(16, experts, 2) for _ in range(2))
        self.head = nn.Linear(16, 5)
        self.pool = pool

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1) if self.pool else h)


def two_domains(seed: int):
    """Tokens 0-19 and 20-39 form two 'languages' routed apart by a hand-set gate."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 20, (4, 6), generator=g)
    return torch.cat([low, low + 20], dim=0)


@pytest.mark.parametrize("pool", [False, True])
def test_a_token_routed_custom_moe_trains_and_experts_that_see_different_tokens_report_differently(pool):
    model = Tagger(pool=pool)
    with torch.no_grad():                 # expert 0 takes tokens < 20 first, expert 1 the others (then 2, 3)
        model.embed.weight[:20, 0], model.embed.weight[20:, 0] = 3.0, -3.0
        for block in model.blocks:
            block.gate.weight.zero_()
            block.gate.weight[:, 0] = torch.tensor([1.0, -1.0, 0.1, -0.1])
    init = arrays_of(model)
    um = UnitMap(init)
    ids = two_domains(3)
    targets = (ids % 5) if not pool else torch.tensor([0] * 4 + [3] * 4)
    targets = targets.clone()
    if not pool:
        targets[:, -1] = -100                       # ignored positions do not count
    client = AlignedClient(model, FLModel(params=init, meta={"experts": [0, 1, 2, 3]}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with client.training():
        opt.zero_grad()
        out = model(ids)
        F.cross_entropy(out.reshape(-1, 5), targets.reshape(-1), ignore_index=-100).backward()
        opt.step()
        client.track(out, targets)
    m = client.metrics()
    tokens = int((targets != -100).sum()) if not pool else ids.numel()
    assert m["num-examples"] == tokens and m["counts-tokens"] == 1
    assert m["expert-samples"][0] != m["expert-samples"][1] or m["expert-loss"][0] != m["expert-loss"][1]
    assert m["expert-loss"][0] != pytest.approx(m["expert-loss"][1])
    assert um.num_layers == 2


def test_token_attribution_with_a_padding_mask_counts_only_real_tokens():
    model = Tagger(pool=True)
    init = arrays_of(model)
    client = AlignedClient(model, FLModel(params=init, meta={"experts": [0, 1, 2, 3]}))
    ids = two_domains(4)
    mask = torch.ones_like(ids)
    mask[:, 4:] = 0
    with client.training():
        out = model(ids)
        client.track(out, torch.zeros(8, dtype=torch.long), mask=mask)
    m = client.metrics()
    assert m["num-examples"] == int(mask.sum()) and max(m["expert-samples"]) <= m["num-examples"]


def test_mismatched_token_counts_say_what_to_pass():
    model = Tagger()
    client = AlignedClient(model, FLModel(params=arrays_of(model), meta={"experts": [0, 1, 2, 3]}))
    ids = two_domains(5)
    with client.training(), pytest.raises(ValueError, match="shifted left"):
        out = model(ids)
        client.track(out[:, :-1], ids[:, 1:] % 5)


def test_evaluate_reply_counts_tokens_of_a_token_task():
    model = hf_model("mixtral")
    batches = [(ids, labels) for ids, labels in token_batches(6)]
    reply = evaluate_reply(model, FLModel(params=arrays_of(model), meta={}), [({"input_ids": i}, y) for i, y in batches])
    assert reply.metrics["num-examples"] == 3 * 4 * 11 and reply.metrics["counts-tokens"] == 1


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_flower_strategy_rounds_with_a_hugging_face_moe(family):
    """configure_train -> AlignedClient on each node -> aggregate_train, two rounds: each node receives
    exactly its experts' slices (bytes checked), unassigned slices unchanged globally, float32 kept."""
    axes = FAMILIES[family].expert_axes
    init = arrays_of(hf_model(family))
    um = UnitMap(init, num_experts=E, expert_axes=axes)
    s = AlignedStrategy(num_experts=E, expert_axes=axes,
                        config=CoordinatorConfig(capacity={"default_capacity": 2, "max_capacity": 2}))
    arrays = init
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, to_record(arrays), ConfigRecord({}), Grid(NODES)))
        wire = um.split(arrays)
        replies, trained = [], set()
        for m in msgs:
            experts = list(m.content["config"]["experts"])
            got = to_numpy(m.content["arrays"])
            assert set(got) == {k for k in wire if um(k) is None or um(k) in experts}
            assert sum(v.nbytes for v in got.values()) == sum(wire[k].nbytes for k in got)
            trained |= set(experts)
            node = NODES.index(m.metadata.dst_node_id)
            replies.append(train(hf_model(family, seed=9), m, token_batches(10 * rnd + node), axes).reply())
        new, metrics = s.aggregate_train(rnd, replies)
        assert metrics["rejected"] == 0 and metrics["nodes"] == len(msgs)
        out = to_numpy(new)
        assert set(out) == set(init) and all(v.dtype == init[k].dtype for k, v in out.items())
        new_wire = um.split(out)
        for k, v in new_wire.items():
            if um(k) is not None:
                assert np.array_equal(v, wire[k]) == (um(k) not in trained), (k, trained)
        arrays = out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_nvflare_workflow_aggregates_a_hugging_face_moe(family, monkeypatch):
    """The NVFlare controller's own plan -> FLModel delivery -> AlignedClient -> aggregation step."""
    from alignment_solver.integrations import nvflare

    monkeypatch.setitem(globals(), "FAMILY", family)
    c = nvflare.AlignedController(num_experts=E, initial_model=f"{__name__}:initial_model", state_path="",
                                  history_path="", model_path="", expert_axes=FAMILIES[family].expert_axes,
                                  coordinator_config={"capacity": {"default_capacity": 2, "max_capacity": 2}})
    monkeypatch.setattr(c, "info", lambda msg: None)
    monkeypatch.setattr(c, "warning", lambda msg: None)
    c._setup()
    sites = [f"site-{i}" for i in range(1, 5)]
    plan = c.coordinator.plan_round(0, sites)
    planned = {str(pc.client_id): [int(e) for e in pc.experts] for pc in plan.clients if pc.experts}
    c.history[0] = {"plan": planned}
    before = dict(c.current)
    replies = []
    for i, (site, experts) in enumerate(planned.items()):
        sent = {k: v for k, v in before.items() if c.expert_of(k) is None or c.expert_of(k) in experts}
        client = train(hf_model(family, seed=3), FLModel(params=sent, meta={"experts": experts, "num-experts": E}),
                       token_batches(20 + i), FAMILIES[family].expert_axes)
        reply = client.reply()
        replies.append(Reply(site, arrays=reply.params, metrics=reply.metrics))
    c._aggregate_round(0, replies, planned)
    assert not c.history[0]["rejected"]
    trained = set().union(*planned.values())
    for k, v in c.current.items():
        if c.expert_of(k) is not None:
            assert np.array_equal(v, before[k]) == (c.expert_of(k) not in trained), k


FAMILY = "mixtral"


def initial_model(num_experts):
    return arrays_of(hf_model(FAMILY))


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_a_token_routed_custom_moe_trains_through_the_flower_strategy_at_the_defaults():
    """The layout that failed every node before: routers on hidden.reshape(-1, d), two MoE layers."""
    init = arrays_of(Tagger(experts=4))
    s = AlignedStrategy(num_experts=4, config=CoordinatorConfig(capacity={"default_capacity": 2, "max_capacity": 2}))
    arrays = init
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, to_record(arrays), ConfigRecord({}), Grid(NODES)))
        replies = []
        for m in msgs:
            model = Tagger(experts=4, seed=rnd)
            client = AlignedClient(model, m)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            ids = two_domains(NODES.index(m.metadata.dst_node_id))
            with client.training():
                opt.zero_grad()
                out = model(ids)
                F.cross_entropy(out.reshape(-1, 5), (ids % 5).reshape(-1)).backward()
                opt.step()
                client.track(out, ids % 5)
            replies.append(client.reply())
        new, metrics = s.aggregate_train(rnd, replies)
        assert new is not None and metrics["nodes"] == len(msgs) and metrics["rejected"] == 0
        arrays = to_numpy(new)
    assert s.unit_map.num_layers == 2 and s.unit_map.num_units == 4
    assert any(not np.array_equal(arrays[k], init[k]) for k in init if ".experts." in k)


def test_an_assigned_expert_no_token_reached_goes_back_as_received_even_under_weight_decay():
    model = Tagger(experts=4)
    with torch.no_grad():
        for block in model.blocks:
            block.gate.weight.zero_()
            block.gate.bias = None
    for block in model.blocks:                          # expert 3 is never among the top-2
        block.gate.register_forward_hook(lambda m, i, o: o + torch.tensor([2.0, 1.0, 0.0, -50.0]))
    init = arrays_of(model)
    client = AlignedClient(model, FLModel(params=init, meta={"experts": [0, 1, 2, 3]}))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    for p in model.parameters():                        # zero (not None) gradients: weight decay moves every array
        p.grad = torch.zeros_like(p)
    with client.training():
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            out = model(two_domains(7))
            F.cross_entropy(out.reshape(-1, 5), (two_domains(7) % 5).reshape(-1)).backward()
            opt.step()
            client.track(out, two_domains(7) % 5)
    assert not torch.equal(model.blocks[0].experts[3].weight, torch.from_numpy(init["blocks.0.experts.3.weight"]))
    reply = client.reply()
    assert reply.metrics["expert-samples"][3] == 0
    for k, v in reply.params.items():
        if ".experts.3." in k:
            assert np.array_equal(v, init[k]) and v.dtype == init[k].dtype, k
    assert any(not np.array_equal(v, init[k]) for k, v in reply.params.items() if ".experts.0." in k)
