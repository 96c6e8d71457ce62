"""Gemma, Gemma 2 and Gemma 3 (text) decoders: Llama-style blocks with Gemma's own norms.

Gemma's RMSNorm gains are stored as an offset from 1 (`x * (1 + w)`): still one entry per channel,
so permuting them is the same gather. `head_dim` is independent of hidden / heads, the head is tied
by default, and the embedding is scaled by sqrt(hidden): a constant, which commutes with permuting.
Gemma 2 and 3 add a post-attention norm on the attention output and pre/post feed-forward norms;
Gemma 3 adds a per-head q/k norm (one gain over head_dim shared by every head, never permuted, as
in Qwen3). Logit soft-capping and sliding windows act per score or per position: untouched.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import PRE_NORMS, DecoderBlock, attention_biases, build_decoder
from hfmerge.arch.spec import ArchSpec

NAME = "gemma"
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
DESCRIPTION = (
    "Gemma, Gemma 2, Gemma 3 text decoders; offset RMSNorm gains, pre/post FF norms, "
    "per-head q/k norm (Gemma 3), tied head"
)
SANDWICH_NORMS = (*PRE_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Gemma spec of one checkpoint; norms and q/k norms follow config.json's model_type."""
    model_type = config.get("model_type")
    block = DecoderBlock(
        norms=PRE_NORMS if model_type == "gemma" else SANDWICH_NORMS,
        qk_norm="per_head" if model_type == "gemma3_text" else "none",
        biases=attention_biases(config),
    )
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=True, label=label
    )
