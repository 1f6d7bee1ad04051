"""PyTorch helpers, per-layer units and the loud refusal of a model without expert keys (tests/torch_cases.py)."""

import pytest

from alignment_solver.integrations.units import EXPERT_PATTERNS, UnitMap, expert_of

from .conftest import run_cases_file

pytest.importorskip("torch")


def test_default_mapping_recognises_module_lists_in_any_layer_and_the_numpy_prefix():
    assert expert_of("blocks.1.moe.experts.3.fc1.weight") == 3
    assert expert_of("experts.0.weight") == 0
    assert expert_of("expert5.W") == 5
    assert expert_of("blocks.1.moe.router.weight") is None
    assert expert_of("my_experts.2.w") is None and expert_of("xexpert1.W") is None


def test_per_layer_units_number_layers_in_natural_order():
    keys = [f"blocks.{b}.experts.{j}.w" for b in (10, 2) for j in (1, 0)] + ["head.w"]
    m = UnitMap(keys, units="layer", num_experts=2)
    assert m.groups == [0, 0, 1, 1]
    assert m.labels == ["blocks.2.experts.0", "blocks.2.experts.1", "blocks.10.experts.0", "blocks.10.experts.1"]
    assert m.unit_of("blocks.10.experts.1.w") == 3 and m.unit_of("head.w") is None


def test_no_expert_key_is_a_value_error_naming_a_key_and_the_patterns():
    with pytest.raises(ValueError) as err:
        UnitMap(["body.weight", "moe.expert_list.0.w"])
    text = str(err.value)
    assert "'moe.expert_list.0.w'" in text and EXPERT_PATTERNS[0] in text and "expert_of=" in text


def test_expert_count_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        UnitMap(["experts.0.w", "experts.1.w"], num_experts=3)
    with pytest.raises(ValueError, match="units must be one of"):
        UnitMap(["experts.0.w"], units="block")


def test_torch_cases_in_their_own_interpreter():
    run_cases_file("torch_cases.py", timeout=900)
