"""GPT-NeoX / Pythia (GPTNeoXModel, GPTNeoXForCausalLM): LayerNorm, partial RoPE, untied head.

`attention.query_key_value` rows are head-major and interleaved, `[head][q | k | v][head_dim]`;
rotary acts on the first `rotary_ndims` dims of each q/k head, so only the other dims may move.
Both block LayerNorms read the block's input (in parallel or in turn) and the final one feeds the
head, so each norm's gain and bias fold into its readers (`arch/residual.py`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
from hfmerge.errors import ArchitectureError

NAME = "gpt_neox"
MODEL_TYPES = ("gpt_neox",)
DESCRIPTION = "GPT-NeoX / Pythia decoders; fused per-head QKV, partial rotary, parallel residual"
DEFAULT_ROTARY_PCT = 0.25  # transformers' GPTNeoXConfig default (every Pythia size uses it)
# transformers 5 loads `embed_out.weight` as `lm_head.weight` and saves it back as `embed_out`.
HEAD_NAMES = ("embed_out.weight", "lm_head.weight")


def rotary_fraction(
    config: Mapping[str, Any], *, label: str, default: float = DEFAULT_ROTARY_PCT
) -> float:
    """Share of each head's dims under RoPE: transformers 5 `rope_parameters`, else `rotary_pct`.

    `default` applies when the config names none (GPT-NeoX's own default; 1.0 for Llama-style)."""
    rope = config.get("rope_parameters") or {}
    candidates = (
        rope.get("partial_rotary_factor"),
        config.get("partial_rotary_factor"),
        config.get("rotary_pct"),
    )
    value = next((v for v in candidates if v is not None), default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ArchitectureError(label, f"config.json rotary fraction {value!r} is not in [0, 1]")
    return float(value)


def _norm(b: SpecBuilder, base: str) -> None:
    b.add(f"{base}.weight", R)
    b.add(f"{base}.bias", R)


def _folded_norm(b: SpecBuilder, base: str, *readers: str) -> None:
    """A LayerNorm in front of `readers`: its gain and bias fold into them."""
    _norm(b, base)
    b.norm(f"{base}.weight", readers=readers, bias=f"{base}.bias")


def _layer(b: SpecBuilder, p: str, i: int, *, attention_bias: bool) -> None:
    base = f"{p}layers.{i}."
    _folded_norm(b, f"{base}input_layernorm", f"{base}attention.query_key_value.weight")
    _folded_norm(b, f"{base}post_attention_layernorm", f"{base}mlp.dense_h_to_4h.weight")
    b.add(f"{base}attention.query_key_value.weight", attn(i, Layout.QKV_PER_HEAD), R)
    b.add(f"{base}attention.dense.weight", R, attn(i, Layout.O))
    if attention_bias:
        b.add(f"{base}attention.query_key_value.bias", attn(i, Layout.QKV_PER_HEAD))
        b.add(f"{base}attention.dense.bias", R)
    b.add(f"{base}mlp.dense_h_to_4h.weight", ff(i), R)
    b.add(f"{base}mlp.dense_h_to_4h.bias", ff(i))
    b.add(f"{base}mlp.dense_4h_to_h.weight", R, ff(i))
    b.add(f"{base}mlp.dense_4h_to_h.bias", R)
    # Buffers saved by older transformers versions (Pythia checkpoints hold all three).
    b.buffer(f"{base}attention.rotary_emb.inv_freq", ndim=1)
    b.buffer(f"{base}attention.bias", ndim=4)
    b.buffer(f"{base}attention.masked_bias", ndim=0)


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The GPT-NeoX spec of one checkpoint; the `gpt_neox.` prefix is read from its tensor names."""
    hidden = config_int(config, "hidden_size", label=label)
    heads = config_int(config, "num_attention_heads", label=label)
    head_dim = split_heads(hidden, heads, label=label)
    layers = config_int(config, "num_hidden_layers", label=label)
    inner = config_int(config, "intermediate_size", label=label)
    rotary_ndims = int(head_dim * rotary_fraction(config, label=label))  # as GPTNeoXAttention
    names = set(tensor_names)
    p = detect_prefix(names, "embed_in.weight", ("gpt_neox.", ""), label=label, family=NAME)
    b = SpecBuilder(NAME, str(config.get("model_type", NAME)), label)
    b.centred_norms = True
    b.group(PermGroup(RESIDUAL, "residual", hidden))
    b.add(f"{p}embed_in.weight", None, R)
    b.buffer(f"{p}rotary_emb.inv_freq", ndim=1)
    for i in range(layers):
        b.group(PermGroup(mlp_group(i), "ff", inner))
        b.group(
            attention_group(
                i,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=head_dim,
                qk_free_dims=(rotary_ndims, head_dim),
                label=label,
            )
        )
        _layer(b, p, i, attention_bias=config_flag(config, "attention_bias", default=True))
    if has_lm_head(config, names, prefix=p, head_names=HEAD_NAMES):
        _folded_norm(b, f"{p}final_layer_norm", *HEAD_NAMES)  # the spelling present is kept
        is_tied = config_flag(config, "tie_word_embeddings", default=False)
        b.tied(HEAD_NAMES, None, R, to=f"{p}embed_in.weight", is_tied=is_tied)
    else:
        # A bare model hands its final norm's output to the caller: nothing to fold it into.
        _norm(b, f"{p}final_layer_norm")
        b.norm_readers.clear()
    return b.finish(names)
