"""Phi-3 decoders: Llama-style blocks with fused projections and maybe partial rotary.

`qkv_proj` rows are [Q | K | V] (GQA: num_heads, num_kv_heads, num_kv_heads heads); `gate_up_proj`
rows are [gate | up], both halves in one FF order because they multiply unit by unit. RoPE rotates
the first `partial_rotary_factor * head_dim` dims of each head; the dims past it may move.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import DecoderBlock, build_decoder
from hfmerge.arch.spec import ArchSpec

NAME = "phi3"
MODEL_TYPES = ("phi3",)
DESCRIPTION = "Phi-3 decoders; fused qkv_proj and gate_up_proj, partial rotary, GQA, untied head"


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Phi-3 spec of one checkpoint; the `model.` prefix is read from tensor names."""
    block = DecoderBlock(fused=True, free_pass_dims=True)  # Phi3Attention/MLP: no biases
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=False, label=label
    )
