"""Where REPAIR corrects each family: module outputs or inputs whose channels shrink when averaged.

A site is a module and a side. `output`: the module's output channels, folded into its output rows
(and bias), or into a norm's gain (and bias). `input`: the module's input channels, folded into its
weight's input axis. Every correction is a per-channel factor, so the repaired model is the same
architecture with the same tensors. Sites per block, in forward order:

- norm outputs (pre-LN: the sublayer inputs; post-LN: the residual stream itself);
- query and key projection outputs, one factor per RoPE pair so rotation still commutes with it
  (attention sharpness is the product of the two scales: the largest single lever); where queries
  and keys are normalised (Qwen3, Gemma 3, OLMo 2, EXAONE 4.0), the q/k norm outputs instead;
- the attention output projection's input (the heads' value mixtures);
- the FF down projection's input (the hidden units after the nonlinearity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from transformers import PreTrainedModel

from hfmerge.arch import permutable_family
from hfmerge.arch.common import config_int
from hfmerge.arch.decoder import head_dim_of
from hfmerge.arch.gpt_neox import rotary_fraction
from hfmerge.errors import AlignmentError, ArchitectureError

Side = Literal["output", "input"]


@dataclass(frozen=True)
class RepairSite:
    """One corrected activation: a module's output or input, some or all of its last-axis channels.

    `channels` ([n] positions on the activation's last axis; None: all of them) are corrected;
    `ties` ([n] factor index per corrected channel; None: one factor each) makes channels share a
    factor, as the two dims of one RoPE pair must. `gain_offset`: a norm whose gain is stored as
    an offset (Gemma computes `x * (gain_offset + w)`), which folding must respect. `head_axis`:
    where a per-head activation ([b, t, heads, c] or [b, heads, t, c]) holds its heads, each of
    which then counts as a sample of the channels.
    """

    module: str
    side: Side
    channels: torch.Tensor | None = None
    ties: torch.Tensor | None = None
    gain_offset: float = 0.0
    head_axis: int | None = None


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


def _blocks(blocks: str, count: int, per_block: Sequence[RepairSite]) -> list[RepairSite]:
    """`per_block` (module paths inside one block) in each of `count` blocks `{blocks}.{i}`."""
    return [
        replace(site, module=f"{blocks}.{i}.{site.module}")
        for i in range(count)
        for site in per_block
    ]


@dataclass(frozen=True)
class _Heads:
    """Attention sizes of a Llama-style decoder, read from its config."""

    heads: int
    kv_heads: int
    head_dim: int
    rotary: int  # leading dims of each head that RoPE rotates
    layers: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> _Heads:
        config, name = model.config.to_dict(), type(model).__name__
        hidden = config_int(config, "hidden_size", label=name)
        heads = config_int(config, "num_attention_heads", label=name)
        head_dim = head_dim_of(config, hidden, heads, label=name)
        return cls(
            heads=heads,
            kv_heads=config_int(config, "num_key_value_heads", label=name, default=heads),
            head_dim=head_dim,
            rotary=int(head_dim * rotary_fraction(config, label=name, default=1.0)),
            layers=config_int(config, "num_hidden_layers", label=name),
        )

    def ties(self, heads: int) -> torch.Tensor:
        """RoPE ties of `heads` heads, head-major."""
        return rope_ties(heads, self.head_dim, self.rotary)


def _qk_projections(h: _Heads) -> list[RepairSite]:
    """Query and key projection outputs, one factor per RoPE pair."""
    return [
        RepairSite("self_attn.q_proj", "output", ties=h.ties(h.heads)),
        RepairSite("self_attn.k_proj", "output", ties=h.ties(h.kv_heads)),
    ]


def _qk_norms(h: _Heads, *, head_axis: int | None) -> list[RepairSite]:
    """q_norm / k_norm outputs: the projections' scale is normalised away, the norms' gains remain.

    A whole-projection norm (OLMo 2, `head_axis` None) has a gain per query / key row. A per-head
    norm (Qwen3, Gemma 3) has one gain over head_dim that every head shares: one factor per RoPE
    pair of one head, each head a sample; its output is [b, t, heads, head_dim] (`head_axis` 2,
    Qwen3) or [b, heads, t, head_dim] (1, Gemma 3).
    """
    queries, keys = (h.heads, h.kv_heads) if head_axis is None else (1, 1)
    return [
        RepairSite("self_attn.q_norm", "output", ties=h.ties(queries), head_axis=head_axis),
        RepairSite("self_attn.k_norm", "output", ties=h.ties(keys), head_axis=head_axis),
    ]


_O_INPUT = RepairSite("self_attn.o_proj", "input")
_DOWN_INPUT = RepairSite("mlp.down_proj", "input")


def _norm(name: str) -> RepairSite:
    return RepairSite(name, "output")


def _decoder(
    model: PreTrainedModel,
    h: _Heads,
    per_block: Sequence[RepairSite],
    *,
    gain_offset: float = 0.0,
) -> list[RepairSite]:
    """`per_block` in every block, then the final norm; `gain_offset` goes to every norm site."""
    p = _prefix(model, "layers")
    sites = [*_blocks(f"{p}layers", h.layers, per_block), RepairSite(f"{p}norm", "output")]
    # Every norm of these decoders is named `*norm`; Gemma stores their gains as `1 + w`.
    return [
        replace(site, gain_offset=gain_offset) if site.module.endswith("norm") else site
        for site in sites
    ]


def _llama(model: PreTrainedModel) -> list[RepairSite]:
    h = _Heads.of(model)
    return _decoder(
        model,
        h,
        [
            _norm("input_layernorm"),
            *_qk_projections(h),
            _O_INPUT,
            _norm("post_attention_layernorm"),
            _DOWN_INPUT,
        ],
    )


def _qwen3(model: PreTrainedModel) -> list[RepairSite]:
    h = _Heads.of(model)
    return _decoder(
        model,
        h,
        [
            _norm("input_layernorm"),
            *_qk_norms(h, head_axis=2),  # normalised after .view, before .transpose
            _O_INPUT,
            _norm("post_attention_layernorm"),
            _DOWN_INPUT,
        ],
    )


def _gemma(model: PreTrainedModel) -> list[RepairSite]:
    h = _Heads.of(model)
    model_type = model.config.model_type
    sandwich = model_type != "gemma"  # Gemma 2 and 3: pre- and post-feed-forward norms
    # Gemma 3 normalises after .transpose: [b, heads, t, head_dim].
    qk = _qk_norms(h, head_axis=1) if model_type == "gemma3_text" else _qk_projections(h)
    per_block = [
        _norm("input_layernorm"),
        *qk,
        _O_INPUT,
        _norm("post_attention_layernorm"),
        *([_norm("pre_feedforward_layernorm")] if sandwich else []),
        _DOWN_INPUT,
        *([_norm("post_feedforward_layernorm")] if sandwich else []),
    ]
    return _decoder(model, h, per_block, gain_offset=1.0)


def _phi3(model: PreTrainedModel) -> list[RepairSite]:
    h = _Heads.of(model)
    # qkv_proj's output is [Q | K | V]: take Q and K, V is not touched.
    query_key = torch.arange((h.heads + h.kv_heads) * h.head_dim)
    query_ties = h.ties(h.heads)
    ties = torch.cat([query_ties, h.ties(h.kv_heads) + int(query_ties.max()) + 1])
    return _decoder(
        model,
        h,
        [
            _norm("input_layernorm"),
            RepairSite("self_attn.qkv_proj", "output", query_key, ties),
            _O_INPUT,
            _norm("post_attention_layernorm"),
            _DOWN_INPUT,
        ],
    )


def _olmo2(model: PreTrainedModel) -> list[RepairSite]:
    return _post_norm_decoder(model, head_axis=None)


def _exaone4(model: PreTrainedModel) -> list[RepairSite]:
    return _post_norm_decoder(model, head_axis=1)  # q/k normalised after .transpose


def _post_norm_decoder(model: PreTrainedModel, *, head_axis: int | None) -> list[RepairSite]:
    """Norms after each sublayer (OLMo 2, EXAONE 4.0): q/k norm outputs, then the post-norms."""
    h = _Heads.of(model)
    return _decoder(
        model,
        h,
        [
            *_qk_norms(h, head_axis=head_axis),
            _O_INPUT,
            _norm("post_attention_layernorm"),
            _DOWN_INPUT,
            _norm("post_feedforward_layernorm"),
        ],
    )


def _gpt2(model: PreTrainedModel) -> list[RepairSite]:
    config = model.config
    p = _prefix(model, "h")
    query_key = torch.arange(2 * config.n_embd)  # c_attn's output is [Q | K | V]; V is not touched
    return [
        *_blocks(
            f"{p}h",
            config.n_layer,
            [
                RepairSite("ln_1", "output"),
                RepairSite("attn.c_attn", "output", query_key),
                RepairSite("attn.c_proj", "input"),
                RepairSite("ln_2", "output"),
                RepairSite("mlp.c_proj", "input"),
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
                RepairSite("input_layernorm", "output"),
                RepairSite(
                    "attention.query_key_value",
                    "output",
                    torch.cat([query, key]),
                    torch.cat([ties, ties + int(ties.max()) + 1]),
                ),
                RepairSite("attention.dense", "input"),
                RepairSite("post_attention_layernorm", "output"),
                RepairSite("mlp.dense_4h_to_h", "input"),
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
                RepairSite("attention.self.query", "output"),
                RepairSite("attention.self.key", "output"),
                RepairSite("attention.output.dense", "input"),
                RepairSite("attention.output.LayerNorm", "output"),
                RepairSite("output.dense", "input"),
                RepairSite("output.LayerNorm", "output"),
            ],
        ),
    ]


SITES: Mapping[str, Callable[[PreTrainedModel], list[RepairSite]]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "exaone4": _exaone4,
}


def repair_sites(model: PreTrainedModel) -> list[RepairSite]:
    """The family's sites for a loaded model, every block plus the final norm."""
    config = {"model_type": getattr(model.config, "model_type", None)}
    label = type(model).__name__
    family = permutable_family(config, label=label, feature="REPAIR")
    if family not in SITES:  # mixtures of experts: no per-expert statistics sites yet
        raise AlignmentError(
            f"REPAIR has no statistics sites for the {family} family ({label})",
            fix="align without repair (drop `+repair` / `align.repair`)",
        )
    return SITES[family](model)


__all__ = ["SITES", "RepairSite", "Side", "repair_sites", "rope_ties"]
