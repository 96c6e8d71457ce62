"""EXAONE 4.0 decoders: OLMo 2's norms after each sublayer, with Qwen3's per-head q/k norm.

q_norm / k_norm hold one gain over head_dim that every head shares: never permuted. Global
layers skip RoPE and sliding layers use it; pinning every Q/K dim is exact for both.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import DecoderBlock, build_decoder
from hfmerge.arch.olmo2 import POST_NORMS
from hfmerge.arch.spec import ArchSpec

NAME = "exaone4"
MODEL_TYPES = ("exaone4",)
DESCRIPTION = "EXAONE 4.0 decoders; post-sublayer norms, per-head q/k norm, RoPE and NoPE layers"


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The EXAONE 4.0 spec of one checkpoint; the `model.` prefix is read from tensor names."""
    block = DecoderBlock(norms=POST_NORMS, qk_norm="per_head")  # Exaone4Attention: no biases
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=False, label=label
    )
