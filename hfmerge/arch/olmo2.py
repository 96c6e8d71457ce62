"""OLMo 2 and OLMo 3 decoders: norms after each sublayer, q/k RMSNorm over the whole projection.

No pre-norms: `post_attention_layernorm` and `post_feedforward_layernorm` normalise each sublayer's
output before the residual add. q_norm / k_norm normalise the full query / key projection
(hidden-sized / kv-sized), so their gains follow the Q and K head layouts. OLMo 3 adds sliding
windows, which act per position: the same spec holds.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import DecoderBlock, attention_biases, build_decoder
from hfmerge.arch.spec import ArchSpec

NAME = "olmo2"
MODEL_TYPES = ("olmo2", "olmo3")
DESCRIPTION = "OLMo 2 / OLMo 3 decoders; post-sublayer norms, whole-projection q/k norm, RoPE, GQA"
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The OLMo 2 spec of one checkpoint; the `model.` prefix is read from tensor names."""
    block = DecoderBlock(norms=POST_NORMS, qk_norm="projection", biases=attention_biases(config))
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=False, label=label
    )
