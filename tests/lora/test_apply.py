"""An adapter applied on read gives the tensors PEFT's own merge gives (`merge_and_unload`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.engine.tuning import EngineTuning
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.support.lora import merge_adapter, save_adapter
from tests.support.weights import read_weights

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    ),
    "patterns": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "o_proj", "up_proj"],
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "up_proj": 6},
            "alpha_pattern": {"o_proj": 3},
        },
    ),
    "rslora": (
        "llama",
        {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    ),
    "conv1d": (
        "gpt2",
        {
            "r": 4,
            "lora_alpha": 16,
            "fan_in_fan_out": True,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
        },
    ),
    "embedding": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "k_proj"]}),
    "modules_to_save": (
        "llama",
        {"r": 2, "target_modules": ["gate_proj"], "modules_to_save": ["lm_head"]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_on_read_equals_peft_merge(tmp_path: Path, case: str) -> None:
    kind, lora = CASES[case]
    base, adapter, expected = save_adapter(kind, tmp_path, **lora)
    merged = merge_adapter(base, adapter, tmp_path / "out")
    changed = [n for n in merged if not torch.equal(merged[n], _base_tensor(base, n))]
    assert changed  # the adapter did something
    for name, tensor in merged.items():
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name


def _base_tensor(base: Path, name: str) -> torch.Tensor:
    return read_weights(base)[name]


@pytest.mark.parametrize(
    ("method", "fields"),
    [("task_arithmetic", {"weight": 1.0}), ("ties", {"weight": 1.0, "density": 1.0})],
)
def test_an_adapted_input_over_its_base_in_small_chunks(
    tmp_path: Path, method: str, fields: dict[str, float]
) -> None:
    """Task vectors (and TIES's statistics pass) read the adapted rows chunk by chunk."""
    base, adapter, expected = save_adapter("gpt2", tmp_path, **CASES["conv1d"][1])
    data = {
        "models": [{"model": f"{base}+{adapter}", **fields}, str(base)],
        "base": str(base),
        "merge": {"method": method},
        "output": {"path": str(tmp_path / "out"), "dtype": "float32"},
    }
    tuning = EngineTuning(target_chunk_elements=500, elementwise_chunk_elements=500)
    run_recipe(parse_recipe(data), RunOptions(force=True, progress=False, tuning=tuning))
    merged = read_weights(tmp_path / "out")
    for name, tensor in merged.items():
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-5), name
