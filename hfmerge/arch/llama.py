"""Llama-style decoders (Llama, Mistral, Qwen2): RMSNorm, full RoPE, GQA, SwiGLU, maybe tied head.

RoPE pins every Q/K dim inside a head, so attention permutes KV groups (with their query heads),
query heads inside a group, and V/O dims inside a head; gate_proj and up_proj share one FF order.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from hfmerge.arch.common import (
    RESIDUAL,
    R,
    SpecBuilder,
    attention_group,
    attn,
    config_flag,
    config_int,
    detect_prefix,
    ff,
    has_lm_head,
    mlp_group,
    split_heads,
)
from hfmerge.arch.spec import ArchSpec, Layout, PermGroup

NAME = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2")
DESCRIPTION = "Llama-style decoders (Llama, Mistral, Qwen2); RoPE, GQA, SwiGLU, tied or untied head"


@dataclass(frozen=True)
class _Biases:
    """Which projections carry a bias; the modeling code of each model type fixes or reads it."""

    qkv: bool
    o: bool
    mlp: bool

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> _Biases:
        model_type = config.get("model_type")
        if model_type == "qwen2":  # Qwen2Attention hard-codes bias=True on q/k/v only
            return cls(qkv=True, o=False, mlp=False)
        if model_type == "mistral":  # MistralAttention/MLP hard-code bias=False
            return cls(qkv=False, o=False, mlp=False)
        attention_bias = config_flag(config, "attention_bias", default=False)
        return cls(
            qkv=attention_bias, o=attention_bias, mlp=config_flag(config, "mlp_bias", default=False)
        )


def _layer(b: SpecBuilder, p: str, i: int, *, biases: _Biases) -> None:
    base = f"{p}layers.{i}."
    b.add(f"{base}input_layernorm.weight", R)
    for proj, layout in (("q_proj", Layout.Q), ("k_proj", Layout.K), ("v_proj", Layout.V)):
        b.add(f"{base}self_attn.{proj}.weight", attn(i, layout), R)
        if biases.qkv:
            b.add(f"{base}self_attn.{proj}.bias", attn(i, layout))
    b.add(f"{base}self_attn.o_proj.weight", R, attn(i, Layout.O))
    if biases.o:
        b.add(f"{base}self_attn.o_proj.bias", R)
    b.add(f"{base}post_attention_layernorm.weight", R)
    # SwiGLU multiplies gate and up elementwise, so both rows follow one FF permutation.
    for proj in ("gate_proj", "up_proj"):
        b.add(f"{base}mlp.{proj}.weight", ff(i), R)
        if biases.mlp:
            b.add(f"{base}mlp.{proj}.bias", ff(i))
    b.add(f"{base}mlp.down_proj.weight", R, ff(i))
    if biases.mlp:
        b.add(f"{base}mlp.down_proj.bias", R)
    b.buffer(f"{base}self_attn.rotary_emb.inv_freq", ndim=1)  # saved by transformers < 4.31


def head_dim_of(config: Mapping[str, Any], hidden: int, heads: int, *, label: str) -> int:
    """The width of one attention head: the config's `head_dim`, else `hidden / heads`."""
    # head_dim may differ from hidden / heads (e.g. Mistral-Nemo); null head_dim means the default.
    if config.get("head_dim") is None:
        return split_heads(hidden, heads, label=label)
    return config_int(config, "head_dim", label=label)


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Llama-family spec of one checkpoint; the `model.` prefix is read from tensor names."""
    hidden = config_int(config, "hidden_size", label=label)
    heads = config_int(config, "num_attention_heads", label=label)
    kv_heads = config_int(config, "num_key_value_heads", label=label, default=heads)
    head_dim = head_dim_of(config, hidden, heads, label=label)
    layers = config_int(config, "num_hidden_layers", label=label)
    inner = config_int(config, "intermediate_size", label=label)
    names = set(tensor_names)
    p = detect_prefix(names, "embed_tokens.weight", ("model.", ""), label=label, family=NAME)
    b = SpecBuilder(NAME, str(config.get("model_type", NAME)), label)
    b.group(PermGroup(RESIDUAL, "residual", hidden))
    b.add(f"{p}embed_tokens.weight", None, R)
    b.buffer(f"{p}rotary_emb.inv_freq", ndim=1)
    biases = _Biases.of(config)
    for i in range(layers):
        b.group(PermGroup(mlp_group(i), "ff", inner))
        # Q/K dims stay fixed even under partial rotary: identity inside a head is always exact.
        b.group(
            attention_group(
                i,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                qk_free_dims=(0, 0),
                label=label,
            )
        )
        _layer(b, p, i, biases=biases)
    b.add(f"{p}norm.weight", R)
    if has_lm_head(config, names, prefix=p, head_names=("lm_head.weight",)):
        is_tied = config_flag(config, "tie_word_embeddings", default=False)
        b.tied("lm_head.weight", None, R, to=f"{p}embed_tokens.weight", is_tied=is_tied)
    return b.finish(names)
