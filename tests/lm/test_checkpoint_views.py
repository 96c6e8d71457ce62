"""Checkpoint names onto a loaded model: every file tensor is a view of the storage it loads into,
fused mixture-of-experts parameters included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfmerge.lm.checkpoint_views import checkpoint_targets
from hfmerge.tensors import read_checkpoint_index
from tests.support.tiny_moe import MOE_KINDS, load_moe_model, save_moe_model

_UP = {
    "mixtral": "model.layers.1.block_sparse_moe.experts.2.w3.weight",
    "qwen3_moe": "model.layers.1.mlp.experts.2.up_proj.weight",
}


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_every_per_expert_tensor_is_its_slice_of_the_fused_parameter(
    kind: str, tmp_path: Path
) -> None:
    path = save_moe_model(kind, tmp_path / "m", seed=3)
    model = load_moe_model(path)
    targets = checkpoint_targets(model, read_checkpoint_index(path, label="m"), label="m")
    saved = load_file(path / "model.safetensors")
    assert targets.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(targets[name], tensor.to(targets[name].dtype)), name
    # Writing expert 2's up rows writes the second half of its fused rows, nothing else.
    fused = dict(model.named_parameters())["model.layers.1.mlp.experts.gate_up_proj"]
    with torch.no_grad():
        targets[_UP[kind]].fill_(7.0)
    inner = fused.shape[1] // 2  # [experts, 2 * inner, hidden]: gate rows, then up rows
    assert fused[2, inner:].eq(7.0).all()
    assert int(fused.eq(7.0).sum()) == fused[2, inner:].numel()
