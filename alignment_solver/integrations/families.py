"""What the package knows about MoE model families, in one place.

The PyTorch helpers (:mod:`alignment_solver.integrations.torch`) find MoE layers, routers and
top-k attributes by the names listed here, and never branch on a family's name.  A layout the
names do not cover is declared by the user (``expert_axes``, ``expert_of``); the :data:`FAMILIES`
table records, per tested Hugging Face family, its layout and the declaration it needs (if any).

Router kinds the masking handles (see the torch module): an ``nn.Linear`` gate whose logits the
layer turns into its top-k, and transformers-5 ``*TopKRouter`` modules that score (softmax or
sigmoid, optional correction bias, group-limited choice) and pick their top-k themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTER_NAMES = ("router", "gate", "gating", "w_gate", "route")
"""Child names of an MoE layer tried for its router, in this order."""

TOP_K_NAMES = ("top_k", "k", "num_experts_per_tok")
"""Integer attributes of an MoE layer or its router that hold its top-k (clamped while masked)."""

GROUP_LIMITS = (("topk_group", "num_group"), ("topk_group", "n_group"))
"""Group-limited routing as (attribute with the groups chosen, attribute with the group count):
while experts are masked the router may choose among all groups, so its top-k can always be met
by assigned experts."""

EXPERT_COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts")
"""Attributes of a Hugging Face config holding the experts per layer."""


@dataclass(frozen=True)
class Family:
    """One tested Hugging Face MoE family (transformers 5)."""

    model_type: str
    experts: str                 # how the experts are stored
    router: str                  # how the router scores and picks
    expert_axes: dict[str, int] = field(default_factory=dict)   # declaration it needs; {} = defaults


FAMILIES = {f.model_type: f for f in (
    Family("mixtral", "fused gate_up_proj (E, 2I, H), down_proj (E, H, I)", "softmax, top-k, renormalised"),
    Family("qwen2_moe", "fused, plus a shared expert (shared)", "softmax, top-k, optional renormalisation"),
    Family("qwen3_moe", "fused", "softmax, top-k, optional renormalisation"),
    Family("olmoe", "fused", "softmax, top-k, optional renormalisation"),
    Family("deepseek_v3", "fused, plus shared experts (shared)",
           "sigmoid + correction bias, group-limited top-k, scaled"),
    Family("gpt_oss", "fused with per-expert biases (E, 2I), (E, H)", "top-k of biased logits, softmax over them"),
    Family("jetmoe", "input_linear / output_linear weights (E, out, in) in MLP and attention experts",
           "top-k of logits (nn.Linear inside the gating module)",
           expert_axes={r"\.(input|output)_linear\.weight$": 0}),
)}
"""Families run through both adapters by the test suite (``tests/hf_cases.py``)."""


def expert_count(config: object) -> int | None:
    """Experts per MoE layer read from a Hugging Face config (None if it names none)."""
    for name in EXPERT_COUNT_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


__all__ = ["EXPERT_COUNT_NAMES", "FAMILIES", "Family", "GROUP_LIMITS", "ROUTER_NAMES", "TOP_K_NAMES", "expert_count"]
