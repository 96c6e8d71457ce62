"""adapter_config.json as hfmerge reads it, and the adapted reader's whole and row reads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.lora import AdaptedReader, parse_adapter_config, plan_adapter, read_local_adapter
from hfmerge.tensors import LazyCheckpoint, file_index, read_checkpoint_index
from tests.support.lora import save_adapter

BASIC: dict[str, Any] = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
        ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
        ({"r": 0}, "`r` is 0"),
        ({"rank_pattern": {"q_proj": "four"}}, "rank_pattern"),
    ],
)
def test_settings_that_are_not_w_plus_ba_are_refused(setting: dict[str, Any], refusal: str) -> None:
    config, problems = parse_adapter_config({**BASIC, **setting})
    assert config is None
    assert any(refusal in problem for problem in problems), problems


def test_patterns_pick_rank_and_alpha_by_module_name_suffix() -> None:
    config, problems = parse_adapter_config(
        {
            **BASIC,
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "up_proj": 4},
            "alpha_pattern": {"up_proj": 2},
            "target_modules": ["q_proj", "up_proj"],
        }
    )
    assert problems == []
    assert config is not None
    assert config.scale("model.layers.1.self_attn.q_proj") == 16 / 2
    assert config.scale("model.layers.11.self_attn.q_proj") == 16 / 8  # not layers.1
    assert config.scale("model.layers.0.mlp.up_proj") == 2 / 4
    assert config.targets("model.layers.0.mlp.up_proj")
    assert not config.targets("model.layers.0.mlp.down_proj")
    rs, _ = parse_adapter_config({**BASIC, "use_rslora": True})
    assert rs is not None
    assert rs.scale("anything") == pytest.approx(16 / math.sqrt(8))


def test_an_adapted_module_outside_target_modules_is_a_lie(tmp_path: Path) -> None:
    base, adapter, _ = save_adapter("llama", tmp_path, r=2, target_modules=["q_proj"])
    files, _ = read_local_adapter(adapter, label="a")
    assert files is not None
    config, _ = parse_adapter_config({**files.config, "target_modules": ["k_proj"]})
    assert config is not None
    index = read_checkpoint_index(base)
    _, problems = plan_adapter(config, files.tensors, {i.name: i for i in index}, conv1d=False)
    assert "module model.layers.0.self_attn.q_proj is not among target_modules" in problems[0]


def test_whole_and_row_reads_agree(tmp_path: Path) -> None:
    base, adapter, expected = save_adapter(
        "gpt2", tmp_path, r=3, target_modules=["c_attn", "wte"], fan_in_fan_out=True
    )
    files, _ = read_local_adapter(adapter, label="a")
    assert files is not None
    config, _ = parse_adapter_config(files.config)
    assert config is not None
    index = read_checkpoint_index(base)
    layout, problems = plan_adapter(config, files.tensors, {i.name: i for i in index}, conv1d=True)
    assert problems == []
    weights = adapter / "adapter_model.safetensors"
    with (
        LazyCheckpoint(base) as checkpoint,
        LazyCheckpoint(adapter, index=file_index(weights, label="a")) as adapter_file,
    ):
        reader = AdaptedReader(checkpoint, adapter_file, layout)
        for name in ("transformer.h.1.attn.c_attn.weight", "transformer.wte.weight"):
            whole = reader.get(name)
            rows = torch.cat(
                [
                    reader.get_rows(name, s, min(s + 7, whole.shape[0]))
                    for s in range(0, whole.shape[0], 7)
                ]
            )
            assert torch.allclose(whole, rows, rtol=0, atol=1e-6)
            assert torch.allclose(whole, expected[name], rtol=0, atol=1e-6)
        untouched = reader.get("transformer.h.0.mlp.c_fc.weight")
        assert untouched.dtype == torch.float32
        assert torch.equal(untouched, checkpoint.get("transformer.h.0.mlp.c_fc.weight"))
