"""Qwen3-MoE decoders: Qwen3 attention (per-head q/k RMSNorm) and sparse mixtures of experts.

`mlp.gate` routes each token to its top-k experts; expert e's gate_proj and up_proj rows share one
FF order, which down_proj reads. Blocks that config.json keeps dense (`mlp_only_layers`,
`decoder_sparse_step`) hold a plain SwiGLU FF of `intermediate_size` units.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import DecoderBlock, attention_biases, build_decoder
from hfmerge.arch.moe import MoeBlock
from hfmerge.arch.spec import ArchSpec

NAME = "qwen3_moe"
MODEL_TYPES = ("qwen3_moe",)
DESCRIPTION = "Qwen3-MoE sparse mixtures of experts; expert order and per-expert FF, q/k RMSNorm"
_MOE = MoeBlock(module="mlp", gate_up=("gate_proj", "up_proj"), down="down_proj")


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Qwen3-MoE spec of one checkpoint; the `model.` prefix is read from tensor names."""
    block = DecoderBlock(qk_norm="per_head", biases=attention_biases(config), moe=_MOE)
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=False, label=label
    )
