"""GPT-2 (GPT2Model, GPT2LMHeadModel): pre-LayerNorm decoder with Conv1D weights stored [in, out].

`attn.c_attn` fuses Q | K | V along its output axis (axis 1), heads contiguous inside each block.
Each LayerNorm sits in front of what reads it (ln_1: c_attn, ln_2: c_fc, ln_f: the head), so its
gain and bias fold into those readers (`arch/residual.py`); positions are learned (`wpe`, written
into the residual stream like `wte`), so no RoPE constrains the within-head Q/K maps.
"""

from __future__ import annotations

from collections.abc import Collection
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

NAME = "gpt2"
MODEL_TYPES = ("gpt2",)
DESCRIPTION = "GPT-2 decoders (GPT2Model, GPT2LMHeadModel); Conv1D [in, out], fused c_attn"


def _norm(b: SpecBuilder, base: str) -> None:
    b.add(f"{base}.weight", R)
    b.add(f"{base}.bias", R)


def _folded_norm(b: SpecBuilder, base: str, *readers: str) -> None:
    """A LayerNorm in front of `readers`: its gain and bias fold into them."""
    _norm(b, base)
    b.norm(f"{base}.weight", readers=readers, bias=f"{base}.bias")


def _layer(b: SpecBuilder, p: str, i: int) -> None:
    base = f"{p}h.{i}."
    _folded_norm(b, f"{base}ln_1", f"{base}attn.c_attn.weight")
    # Conv1D is [in, out]: the residual is axis 0, the fused Q|K|V output is axis 1.
    b.add(f"{base}attn.c_attn.weight", R, attn(i, Layout.QKV_CONCAT))
    b.add(f"{base}attn.c_attn.bias", attn(i, Layout.QKV_CONCAT))
    b.add(f"{base}attn.c_proj.weight", attn(i, Layout.O), R)
    b.add(f"{base}attn.c_proj.bias", R)
    _folded_norm(b, f"{base}ln_2", f"{base}mlp.c_fc.weight")
    b.add(f"{base}mlp.c_fc.weight", R, ff(i))
    b.add(f"{base}mlp.c_fc.bias", ff(i))
    b.add(f"{base}mlp.c_proj.weight", ff(i), R)
    b.add(f"{base}mlp.c_proj.bias", R)
    # Causal-mask buffers saved by older transformers versions (e.g. the original `gpt2` repo).
    b.buffer(f"{base}attn.bias", ndim=4)
    b.buffer(f"{base}attn.masked_bias", ndim=0)


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The GPT-2 spec of one checkpoint; the `transformer.` prefix is read from its tensor names."""
    hidden = config_int(config, "n_embd", "hidden_size", label=label)
    heads = config_int(config, "n_head", "num_attention_heads", label=label)
    head_dim = split_heads(hidden, heads, label=label)
    layers = config_int(config, "n_layer", "num_hidden_layers", label=label)
    inner = config_int(config, "n_inner", label=label, default=4 * hidden)
    names = set(tensor_names)
    p = detect_prefix(names, "wte.weight", ("transformer.", ""), label=label, family=NAME)
    b = SpecBuilder(NAME, str(config.get("model_type", NAME)), label)
    b.centred_norms, b.rotary = True, False
    b.group(PermGroup(RESIDUAL, "residual", hidden))
    # Rows are token ids / positions: never permuted.
    b.add(f"{p}wte.weight", None, R)
    b.add(f"{p}wpe.weight", None, R)
    for i in range(layers):
        b.group(PermGroup(mlp_group(i), "ff", inner))
        # No rotary embedding: Q/K may reorder every dim inside a head.
        b.group(
            attention_group(
                i,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=head_dim,
                qk_free_dims=(0, head_dim),
                label=label,
            )
        )
        _layer(b, p, i)
    # The bare GPT2Model has no head; the original `gpt2` repo has no prefix and a tied head.
    is_tied = config_flag(config, "tie_word_embeddings", default=True)
    if has_lm_head(config, names, prefix=p, head_names=("lm_head.weight",)):
        _folded_norm(b, f"{p}ln_f", "lm_head.weight")
        b.tied("lm_head.weight", None, R, to=f"{p}wte.weight", is_tied=is_tied)
    else:
        # A bare model hands its final norm's output to the caller: nothing to fold it into.
        _norm(b, f"{p}ln_f")
        b.norm_readers.clear()
    return b.finish(names)
