"""Qwen3 decoders: Llama-style blocks plus a per-head RMSNorm on queries and keys before RoPE.

q_norm / k_norm hold one gain over head_dim that every head shares: a head permutation leaves them
in place, and RoPE pins the within-head Q/K dims they are indexed by, so they are never permuted.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import DecoderBlock, attention_biases, build_decoder
from hfmerge.arch.spec import ArchSpec

NAME = "qwen3"
MODEL_TYPES = ("qwen3",)
DESCRIPTION = "Qwen3 decoders; per-head q/k RMSNorm, RoPE, GQA, SwiGLU, tied or untied head"


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Qwen3 spec of one checkpoint; the `model.` prefix is read from tensor names."""
    block = DecoderBlock(qk_norm="per_head", biases=attention_biases(config), folds=True)
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=False, label=label
    )
