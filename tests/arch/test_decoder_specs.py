"""Spec details of the Llama-style decoder families (arch/decoder.py and its users)."""

from __future__ import annotations

import pytest

from hfmerge.arch import spec_for
from hfmerge.arch.decoder import DecoderBlock
from hfmerge.arch.spec import ArchSpec, Layout
from hfmerge.errors import ArchitectureError
from tests.support.tiny_models import make_tiny_model


def _layouts(spec: ArchSpec, name: str) -> list[Layout | None]:
    return [role.layout if role else None for role in spec.tensors[name].axes]


def test_spec_details_of_the_decoder_families() -> None:
    specs = {}
    for kind in ("gemma", "qwen3", "olmo2", "phi3", "seed_oss"):
        model = make_tiny_model(kind)
        specs[kind] = spec_for(model.config.to_dict(), model.state_dict().keys())
    gemma = specs["gemma"].groups["layers.0.attn"]  # head_dim 16, hidden 48: q rows 64
    assert (gemma.num_heads, gemma.num_kv_heads, gemma.head_dim, gemma.size) == (4, 2, 16, 64)
    attn = "model.layers.0.self_attn."
    assert _layouts(specs["qwen3"], attn + "q_norm.weight") == [None]
    assert _layouts(specs["olmo2"], attn + "q_norm.weight") == [Layout.Q]
    assert _layouts(specs["olmo2"], attn + "k_norm.weight") == [Layout.K]
    assert "model.layers.0.input_layernorm.weight" not in specs["olmo2"].tensors
    assert _layouts(specs["phi3"], attn + "qkv_proj.weight") == [Layout.QKV_CONCAT, Layout.UNITS]
    gate_up = _layouts(specs["phi3"], "model.layers.0.mlp.gate_up_proj.weight")
    assert gate_up == [Layout.UNITS_PAIR, Layout.UNITS]
    assert {n for n in specs["seed_oss"].tensors if n.endswith("proj.bias")} == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"
    }
    with pytest.raises(ValueError, match="pinned"):
        DecoderBlock(qk_norm="per_head", free_pass_dims=True)


def test_internlm3_reads_its_own_spelling_of_the_bias_flags() -> None:
    """InternLM3's config.json on the Hub says `qkv_bias` and `bias` (InternLM3Config aliases)."""
    model = make_tiny_model("internlm3")
    config = model.config.to_dict()
    names = model.state_dict().keys()
    assert any(n.endswith("mlp.up_proj.bias") for n in names)
    hub_style = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias")}
    assert set(spec_for({**hub_style, "qkv_bias": True, "bias": True}, names).tensors) == set(names)
    with pytest.raises(ArchitectureError, match="not in the llama spec"):
        spec_for({**hub_style, "qkv_bias": False, "bias": False}, names)
