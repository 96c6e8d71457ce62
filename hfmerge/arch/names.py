"""What a checkpoint tensor's name tells without a family spec: its block index, and whether it is
a buffer (a tensor transformers saves or keeps but never loads as a parameter).

Transformers names blocks `<stack>.<index>.` with a handful of stack names (`layers`, `h`, `layer`,
`block`, `blocks`), under any prefix (`model.`, `transformer.`, `encoder.`, `decoder.`, ...).
"""

from __future__ import annotations

import re

# The first `<stack>.<index>.` in the name: T5's `encoder.block.3.layer.1.` is block 3 (its
# `layer.1` is a sub-layer), Mixtral's `layers.0.block_sparse_moe.experts.5.` is block 0.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")

# Last name components that are always buffers: RoPE frequencies, position and token-type ids.
_BUFFER_LEAVES = frozenset({"inv_freq", "position_ids", "token_type_ids", "masked_bias"})
_CAUSAL_MASK_NDIM = 4  # GPT-2-style `attn.bias`: a [1, 1, n, n] causal mask, not a bias vector


def layer_index(name: str) -> int | None:
    """The block index of a tensor (`model.layers.3.mlp.up_proj.weight` -> 3), None outside blocks.

    Encoder and decoder stacks number their blocks separately: `encoder.layers.0.` and
    `decoder.layers.0.` are both block 0.
    """
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def is_buffer_name(name: str, ndim: int) -> bool:
    """Whether a tensor of this name and rank is a buffer rather than a learned parameter."""
    parts = name.split(".")
    if parts[-1] in _BUFFER_LEAVES:
        return True
    return parts[-2:-1] == ["attn"] and parts[-1] == "bias" and ndim == _CAUSAL_MASK_NDIM
