"""Mixtral decoders: Llama-style attention, and a sparse mixture of SwiGLU experts in every block.

`block_sparse_moe.gate` routes each token to its top-k experts; expert e's w1 (gate) and w3 (up)
rows share one FF order, which w2 reads. The order of the experts is a symmetry too (`arch/moe.py`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.decoder import Biases, DecoderBlock, build_decoder
from hfmerge.arch.moe import MoeBlock
from hfmerge.arch.spec import ArchSpec

NAME = "mixtral"
MODEL_TYPES = ("mixtral",)
DESCRIPTION = "Mixtral sparse mixtures of experts; expert order and per-expert FF, RoPE, GQA"
_MOE = MoeBlock(module="block_sparse_moe", gate_up=("w1", "w3"), down="w2")


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Mixtral spec of one checkpoint; the `model.` prefix is read from tensor names."""
    block = DecoderBlock(biases=Biases(), moe=_MOE)  # MixtralAttention hard-codes bias=False
    return build_decoder(
        config, tensor_names, family=NAME, block=block, tied_by_default=False, label=label
    )
