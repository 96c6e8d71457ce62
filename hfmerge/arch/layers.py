"""Which block of which layer stack a tensor belongs to, read from its name alone.

Transformers checkpoints name their blocks `<stack>.<index>.`: `model.layers.3.`,
`transformer.h.3.`, `encoder.layer.3.`, `encoder.block.3.`, `blocks.3.`. The leftmost such part
is the tensor's block (T5's `encoder.block.2.layer.0.` is block 2 of `encoder.block`).
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"(?:^|\.)(layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack, block index) of the tensor `name`, e.g. `("model.layers", 3)`; None for a tensor
    outside the blocks (embeddings, final norm, head)."""
    found = _BLOCK.search(name)
    if found is None:
        return None
    return name[: found.end(1)], int(found.group(2))


def layer_index(name: str) -> int | None:
    """The block index of the tensor `name`, or None outside the blocks."""
    where = layer_of(name)
    return None if where is None else where[1]
