"""Where REPAIR corrects each family: module outputs or inputs whose channels shrink when averaged.

A site is a module and a side. `output`: the module's output channels, folded into its output rows
(and bias), or into a norm's gain (and bias). `input`: the module's input channels, folded into its
weight's input axis. Every correction is a per-channel factor, so the repaired model is the same
architecture with the same tensors. Sites per block, in forward order:

- norm outputs (pre-LN: the sublayer inputs; post-LN: the residual stream itself);
- query and key projection outputs, one factor per RoPE pair so rotation still commutes with it
  (attention sharpness is the product of the two scales: the largest single lever);
- the attention output projection's input (the heads' value mixtures);
- the FF down projection's input (the hidden units after the nonlinearity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from hfmerge.arch import family_of
from hfmerge.arch.common import config_int
from hfmerge.arch.decoder import head_dim_of
from hfmerge.arch.gpt_neox import rotary_fraction
from hfmerge.errors import ArchitectureError

Side = Literal["output", "input"]


@dataclass(frozen=True)
class RepairSite:
    """One corrected activation: a module's output or input, some or all of its last-axis channels.

    `channels` ([n] positions on the activation's last axis; None: all of them) are corrected;
    `ties` ([n] factor index per corrected channel; None: one factor each) makes channels share a
    factor, as the two dims of one RoPE pair must.
    """

    module: str
    side: Side
    channels: torch.Tensor | None = None
    ties: torch.Tensor | None = None


def rope_ties(num_heads: int, head_dim: int, rotary_dims: int) -> torch.Tensor:
    """[num_heads * head_dim] factor ids, head-major; dims j and j + r/2 of a head share one.

    transformers rotates dim j with dim j + rotary_dims/2 (`rotate_half`); dims past the rotary
    part get a factor each.
    """
    half = rotary_dims // 2
    dims = torch.arange(head_dim)
    within = torch.where(dims < 2 * half, dims % max(half, 1), dims)  # [head_dim]
    ids = torch.arange(num_heads).unsqueeze(1) * head_dim + within  # [heads, head_dim]
    inverse: torch.Tensor = torch.unique(ids.flatten(), return_inverse=True)[1]
    return inverse  # contiguous ids 0..n_factors-1


def _prefix(model: PreTrainedModel, layers: str) -> str:
    """The dotted path of the model body holding `layers` (e.g. `model.` for `*ForCausalLM`)."""
    names = {str(name) for name, _ in model.named_modules()}
    for prefix in sorted({n[: -len(layers)] for n in names if n.endswith(layers)}, key=len):
        if f"{prefix}{layers}.0" in names:
            return prefix
    raise ArchitectureError(
        type(model).__name__,
        f"has no `{layers}` block list to repair",
        fix="load the model with its transformers class",
    )


# One site of every block: (module path inside the block, side, channels, ties).
BlockSite = tuple[str, Side, torch.Tensor | None, torch.Tensor | None]


def _blocks(blocks: str, count: int, per_block: Sequence[BlockSite]) -> list[RepairSite]:
    """`per_block` in each of `count` blocks named `{blocks}.{i}`, block by block."""
    return [
        RepairSite(f"{blocks}.{i}.{module}", side, channels, ties)
        for i in range(count)
        for module, side, channels, ties in per_block
    ]


def _llama(model: PreTrainedModel) -> list[RepairSite]:
    config, name = model.config.to_dict(), type(model).__name__
    hidden = config_int(config, "hidden_size", label=name)
    heads = config_int(config, "num_attention_heads", label=name)
    kv_heads = config_int(config, "num_key_value_heads", label=name, default=heads)
    head_dim = head_dim_of(config, hidden, heads, label=name)
    rotary = int(head_dim * rotary_fraction(config, label=name, default=1.0))
    p = _prefix(model, "layers")
    return [
        *_blocks(
            f"{p}layers",
            config_int(config, "num_hidden_layers", label=name),
            [
                ("input_layernorm", "output", None, None),
                ("self_attn.q_proj", "output", None, rope_ties(heads, head_dim, rotary)),
                ("self_attn.k_proj", "output", None, rope_ties(kv_heads, head_dim, rotary)),
                ("self_attn.o_proj", "input", None, None),
                ("post_attention_layernorm", "output", None, None),
                ("mlp.down_proj", "input", None, None),
            ],
        ),
        RepairSite(f"{p}norm", "output"),
    ]


def _gpt2(model: PreTrainedModel) -> list[RepairSite]:
    config = model.config
    p = _prefix(model, "h")
    query_key = torch.arange(2 * config.n_embd)  # c_attn's output is [Q | K | V]; V is not touched
    return [
        *_blocks(
            f"{p}h",
            config.n_layer,
            [
                ("ln_1", "output", None, None),
                ("attn.c_attn", "output", query_key, None),
                ("attn.c_proj", "input", None, None),
                ("ln_2", "output", None, None),
                ("mlp.c_proj", "input", None, None),
            ],
        ),
        RepairSite(f"{p}ln_f", "output"),
    ]


def _gpt_neox(model: PreTrainedModel) -> list[RepairSite]:
    config = model.config
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads
    rotary = int(head_dim * rotary_fraction(config.to_dict(), label=type(model).__name__))
    # query_key_value's output is [head][q | k | v][head_dim]: take q and k of every head.
    base = torch.arange(heads).unsqueeze(1) * 3 * head_dim  # [heads, 1]
    query = (base + torch.arange(head_dim)).flatten()  # [heads * head_dim]
    key = (base + head_dim + torch.arange(head_dim)).flatten()
    ties = rope_ties(heads, head_dim, rotary)
    p = _prefix(model, "layers")
    return [
        *_blocks(
            f"{p}layers",
            config.num_hidden_layers,
            [
                ("input_layernorm", "output", None, None),
                (
                    "attention.query_key_value",
                    "output",
                    torch.cat([query, key]),
                    torch.cat([ties, ties + int(ties.max()) + 1]),
                ),
                ("attention.dense", "input", None, None),
                ("post_attention_layernorm", "output", None, None),
                ("mlp.dense_4h_to_h", "input", None, None),
            ],
        ),
        RepairSite(f"{p}final_layer_norm", "output"),
    ]


def _bert(model: PreTrainedModel) -> list[RepairSite]:
    p = _prefix(model, "encoder.layer")
    return [
        RepairSite(f"{p}embeddings.LayerNorm", "output"),
        *_blocks(
            f"{p}encoder.layer",
            model.config.num_hidden_layers,
            [
                ("attention.self.query", "output", None, None),
                ("attention.self.key", "output", None, None),
                ("attention.output.dense", "input", None, None),
                ("attention.output.LayerNorm", "output", None, None),
                ("output.dense", "input", None, None),
                ("output.LayerNorm", "output", None, None),
            ],
        ),
    ]


SITES: Mapping[str, Callable[[PreTrainedModel], list[RepairSite]]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
}


def repair_sites(model: PreTrainedModel) -> list[RepairSite]:
    """The family's sites for a loaded model, every block plus the final norm."""
    config = {"model_type": getattr(model.config, "model_type", None)}
    return SITES[family_of(config, label=type(model).__name__)](model)


__all__ = ["SITES", "RepairSite", "Side", "repair_sites", "rope_ties"]
