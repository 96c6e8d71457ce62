"""Llama-style decoder blocks, shared by the llama, qwen3, gemma, phi3, olmo2 and exaone4 families.

A block is attention (separate q/k/v/o, or Phi-3's fused qkv) and a gated FF (gate and up, or
Phi-3's fused gate_up) around RMSNorms over the residual stream. The families differ only in the
data of `DecoderBlock`: which norms a block holds, whether queries and keys are normalised (per head
or over the whole projection), which projections carry a bias, and whether Q/K dims past a partial
rotary part may move. Mixture-of-experts families (Mixtral, Qwen3-MoE) replace the FF of their
sparse blocks by a router and experts (`arch/moe.py`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
from hfmerge.arch.gpt_neox import rotary_fraction
from hfmerge.arch.moe import MoeBlock, MoeShape, add_moe, moe_shape
from hfmerge.arch.spec import ArchSpec, AxisRole, Layout, PermGroup

# "per_head": one gain over head_dim shared by every head (Qwen3, Gemma 3); "projection": one gain
# over the whole q/k projection output (OLMo 2).
QkNorm = Literal["none", "per_head", "projection"]
PRE_NORMS = ("input_layernorm", "post_attention_layernorm")  # Llama: before attention and FF


@dataclass(frozen=True)
class Biases:
    """Which projections carry a bias; the modeling code of each model type fixes or reads it."""

    qkv: bool = False
    o: bool = False
    mlp: bool = False


def attention_biases(config: Mapping[str, Any]) -> Biases:
    """q/k/v/o all read `attention_bias` (default off); the MLP has none (Qwen3, Gemma, OLMo 2)."""
    attention_bias = config_flag(config, "attention_bias", default=False)
    return Biases(qkv=attention_bias, o=attention_bias)


@dataclass(frozen=True)
class DecoderBlock:
    """What one family's blocks hold, besides q/k/v/o and gate/up/down projections.

    Attributes:
        norms: the residual-width RMSNorms of a block (all read or write the residual basis).
        qk_norm: how queries and keys are normalised before RoPE, if at all.
        fused: Phi-3 style `qkv_proj` ([Q | K | V] rows) and `gate_up_proj` ([gate | up] rows).
        biases: which projections carry a bias.
        free_pass_dims: Q/K dims past the rotary part may move inside a head (GPT-NeoX style);
            otherwise every Q/K dim stays in place, which is always exact.
        moe: the names of the MoE block that replaces the FF in sparse blocks, if any.
        folds: the block's two pre-norms are plain RMSNorms (`x / rms(x) * gain`) read only by
            the attention's q/k/v and the FF's gate/up projections, so their gains fold into
            those projections exactly (`ArchSpec.norm_readers`).
    """

    norms: tuple[str, ...] = PRE_NORMS
    qk_norm: QkNorm = "none"
    fused: bool = False
    biases: Biases = Biases()
    free_pass_dims: bool = False
    moe: MoeBlock | None = None
    folds: bool = False

    def __post_init__(self) -> None:
        if self.qk_norm == "per_head" and self.free_pass_dims:
            # Every head shares the norm's gain, so no head may reorder its Q/K dims alone.
            raise ValueError("a per-head q/k norm needs every Q/K dim pinned")
        if self.folds and (self.norms != PRE_NORMS or self.moe is not None):
            raise ValueError("only the two pre-norms of a dense block fold into their readers")


def head_dim_of(config: Mapping[str, Any], hidden: int, heads: int, *, label: str) -> int:
    """The width of one attention head: the config's `head_dim`, else `hidden / heads`."""
    # head_dim may differ from hidden / heads (e.g. Mistral-Nemo, Gemma); null means the default.
    if config.get("head_dim") is None:
        return split_heads(hidden, heads, label=label)
    return config_int(config, "head_dim", label=label)


def _with_bias(b: SpecBuilder, module: str, has_bias: bool, *axes: AxisRole | None) -> None:
    """`{module}.weight` with `axes` ([out, in]), and `{module}.bias` ([out]) when it has one."""
    b.add(f"{module}.weight", *axes)
    if has_bias:
        b.add(f"{module}.bias", axes[0])


def _attention(b: SpecBuilder, base: str, i: int, block: DecoderBlock) -> None:
    if block.fused:
        _with_bias(b, f"{base}qkv_proj", block.biases.qkv, attn(i, Layout.QKV_CONCAT), R)
    else:
        for proj, layout in (("q_proj", Layout.Q), ("k_proj", Layout.K), ("v_proj", Layout.V)):
            _with_bias(b, f"{base}{proj}", block.biases.qkv, attn(i, layout), R)
    _with_bias(b, f"{base}o_proj", block.biases.o, R, attn(i, Layout.O))
    if block.qk_norm == "per_head":
        # One gain over head_dim shared by all heads: a head permutation leaves it alone, and the
        # dims it is indexed by are pinned by RoPE (per-head dim orders could not share it).
        b.add(f"{base}q_norm.weight", None)
        b.add(f"{base}k_norm.weight", None)
    elif block.qk_norm == "projection":
        # Normalised over the whole projection, so its gain moves with the query / key rows.
        b.add(f"{base}q_norm.weight", attn(i, Layout.Q))
        b.add(f"{base}k_norm.weight", attn(i, Layout.K))


def _mlp(b: SpecBuilder, base: str, i: int, block: DecoderBlock) -> None:
    if block.fused:
        # gate and up halves multiply unit by unit, so both follow one FF permutation.
        _with_bias(
            b, f"{base}gate_up_proj", block.biases.mlp, AxisRole(mlp_group(i), Layout.UNITS_PAIR), R
        )
    else:
        # SwiGLU multiplies gate and up elementwise, so both rows follow one FF permutation.
        for proj in ("gate_proj", "up_proj"):
            _with_bias(b, f"{base}{proj}", block.biases.mlp, ff(i), R)
    _with_bias(b, f"{base}down_proj", block.biases.mlp, R, ff(i))


def _feed_forward(
    b: SpecBuilder, base: str, i: int, block: DecoderBlock, sizes: tuple[int, MoeShape | None]
) -> None:
    """Block i's FF: an MoE block where the config makes it sparse, else a dense one."""
    inner, moe = sizes
    if block.moe is not None and moe is not None and i in moe.sparse:
        add_moe(b, base, i, block.moe, moe)
        return
    b.group(PermGroup(mlp_group(i), "ff", inner))
    _mlp(b, f"{base}mlp.", i, block)


def _norm_readers(base: str, block: DecoderBlock) -> dict[str, tuple[str, ...]]:
    """Block pre-norm gain -> the projections reading it (`DecoderBlock.folds`)."""
    attention = ("qkv_proj",) if block.fused else ("q_proj", "k_proj", "v_proj")
    mlp = ("gate_up_proj",) if block.fused else ("gate_proj", "up_proj")
    return {
        f"{base}input_layernorm.weight": tuple(f"{base}self_attn.{m}.weight" for m in attention),
        f"{base}post_attention_layernorm.weight": tuple(f"{base}mlp.{m}.weight" for m in mlp),
    }


def _layer(
    b: SpecBuilder, p: str, i: int, block: DecoderBlock, sizes: tuple[int, MoeShape | None]
) -> None:
    base = f"{p}layers.{i}."
    for norm in block.norms:
        b.add(f"{base}{norm}.weight", R)
    if block.folds:
        for norm, readers in _norm_readers(base, block).items():
            b.norm(norm, readers=readers)
    _attention(b, f"{base}self_attn.", i, block)
    _feed_forward(b, base, i, block, sizes)
    b.buffer(f"{base}self_attn.rotary_emb.inv_freq", ndim=1)  # saved by transformers < 4.31


def _qk_free_dims(
    config: Mapping[str, Any], head_dim: int, block: DecoderBlock, *, label: str
) -> tuple[int, int]:
    """Within-head Q/K dims that may move: none, or those past the rotary part if allowed."""
    if not block.free_pass_dims:
        return (0, 0)
    rotary = int(head_dim * rotary_fraction(config, label=label, default=1.0))  # as transformers
    return (rotary, head_dim)


def build_decoder(
    config: Mapping[str, Any],
    tensor_names: Collection[str],
    *,
    family: str,
    block: DecoderBlock,
    tied_by_default: bool,
    label: str,
) -> ArchSpec:
    """The spec of one Llama-style decoder checkpoint; the `model.` prefix is read from its names.

    `tied_by_default`: the model type's `tie_word_embeddings` default, used when config.json
    omits the field.
    """
    hidden = config_int(config, "hidden_size", label=label)
    heads = config_int(config, "num_attention_heads", label=label)
    kv_heads = config_int(config, "num_key_value_heads", label=label, default=heads)
    head_dim = head_dim_of(config, hidden, heads, label=label)
    layers = config_int(config, "num_hidden_layers", label=label)
    inner = config_int(config, "intermediate_size", label=label)
    moe = None if block.moe is None else moe_shape(config, layers, label=label)
    qk_free_dims = _qk_free_dims(config, head_dim, block, label=label)
    names = set(tensor_names)
    p = detect_prefix(names, "embed_tokens.weight", ("model.", ""), label=label, family=family)
    b = SpecBuilder(family, str(config.get("model_type", family)), label)
    b.group(PermGroup(RESIDUAL, "residual", hidden))
    # Rows are token ids; a constant embedding scale (Gemma, Granite) commutes with permuting.
    b.add(f"{p}embed_tokens.weight", None, R)
    b.buffer(f"{p}rotary_emb.inv_freq", ndim=1)
    for i in range(layers):
        b.group(
            attention_group(
                i,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                qk_free_dims=qk_free_dims,
                label=label,
            )
        )
        _layer(b, p, i, block, (inner, moe))
    b.add(f"{p}norm.weight", R)
    if has_lm_head(config, names, prefix=p, head_names=("lm_head.weight",)):
        is_tied = config_flag(config, "tie_word_embeddings", default=tied_by_default)
        b.tied("lm_head.weight", None, R, to=f"{p}embed_tokens.weight", is_tied=is_tied)
        if block.folds:
            b.norm(f"{p}norm.weight", readers=("lm_head.weight",))
    elif block.folds:
        # A bare model hands its final norm's output to the caller: nothing to fold it into.
        b.norm_readers.clear()
    return b.finish(names)
