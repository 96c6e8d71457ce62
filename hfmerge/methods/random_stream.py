"""DARE and DELLA chunk by chunk, with the same random masks as the whole-tensor function.

The whole-tensor function draws each model's mask with `torch.bernoulli` from one generator, model
after model, one draw per entry in flat order; drawn in flat-order pieces, the stream is the same.
So model i's draws start where model i-1's end. (DELLA's keep probabilities rank each row, and
chunks hold whole rows; a 1-D tensor is one row, so it is merged whole.) One statistics pass per
model that drops entries draws its masks in order, keeps them as bits (n/8 bytes per model) and
sums the L1 norms for `rescale`; the apply pass then uses the kept masks, so nothing is drawn or
ranked twice.

With `rescale`, the L1 norms are chunk sums added in float64 rather than one float32 `sum`, so the
factor may differ in its last bits (as for chunked TIES; tested in tests/engine/test_chunks.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from hfmerge.methods.chunks import Chunk, Submit
from hfmerge.methods.gta_stream import Combine, l1_scale, need_base
from hfmerge.methods.sparsify import DropRule

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as bits, 8 entries per byte (flat order, zero-padded to a whole byte)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)])
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)  # [n/8, 8] -> [n/8]


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask `pack_mask` packed, shaped and typed like `like`."""
    bits = packed.unsqueeze(1).bitwise_and(_BITS).ne(0)  # [n/8] -> [n/8, 8]
    return bits.reshape(-1)[: like.numel()].reshape(like.shape).to(like.dtype)


class RandomDropMerge:
    """One tensor of DARE/DELLA: a pass per dropping model draws and keeps its masks (as bits),
    then the apply pass uses them."""

    whole_only = False
    elementwise = False  # its masks are consumed chunk by chunk

    def __init__(
        self,
        n: int,
        *,
        rules: Sequence[DropRule],
        rescale: bool,
        combine: Combine,
        generator: torch.Generator | None,
    ) -> None:
        if generator is None:
            raise ValueError("a random method needs its seeded generator to stream")
        self.rules = list(rules)
        self.dropping = [i for i, rule in enumerate(self.rules) if callable(rule) and n > 0]
        self.rescale = rescale
        self.combine = combine
        self._generator = generator
        # Per dropping model, its chunks' masks in flat order: n/8 bytes each, not a float copy.
        self._masks: dict[int, deque[torch.Tensor]] = {i: deque() for i in self.dropping}
        self._sums = {i: [0.0, 0.0] for i in self.dropping}  # L1 before, after dropping
        self._scales: dict[int, torch.Tensor | None] = {}

    @property
    def passes(self) -> int:
        """One statistics pass per model that drops entries."""
        return len(self.dropping)

    @property
    def splittable(self) -> bool:
        """Never: the masks are drawn and consumed chunk by chunk, in flat order."""
        return False

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Draw model `dropping[pass_index]`'s mask for the chunk, keep it; add its L1 norms."""
        index = self.dropping[pass_index]
        delta = chunk.tensors[index] - need_base(chunk)
        rule = self.rules[index]
        assert callable(rule)
        mask = torch.bernoulli(rule(delta), generator=self._generator)
        self._masks[index].append(pack_mask(mask))
        if self.rescale:
            self._sums[index][0] += float(delta.abs().sum(dtype=torch.float64))
            self._sums[index][1] += float((delta * mask).abs().sum(dtype=torch.float64))

    def observe_split(self, pass_index: int, head: Chunk, tail: Chunk, submit: Submit) -> None:
        """Never called: `splittable` is False."""
        raise AssertionError("random masks cannot be split across threads")

    def end_pass(self, pass_index: int) -> None:
        """The model's draws are done (the generator now sits at the next model's first)."""
        index = self.dropping[pass_index]
        self._scales[index] = l1_scale(*self._sums[index]) if self.rescale else None

    def apply(self, chunk: Chunk) -> torch.Tensor:
        """The merged rows of `chunk` (chunks must come in flat order, as they were observed)."""
        return self.combine(chunk.tensors, need_base(chunk), self._prune)

    def apply_split(self, head: Chunk, tail: Chunk, submit: Submit) -> tuple[torch.Tensor, Any]:
        """Never called: `splittable` is False."""
        raise AssertionError("random masks cannot be split across threads")

    def _prune(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        if self.rules[index] == "drop all":
            return torch.zeros_like(delta)
        if index not in self._masks:
            return delta  # keeps everything
        pruned = delta * unpack_mask(self._masks[index].popleft(), delta)
        scale = self._scales.get(index)
        return pruned if scale is None else pruned * scale


__all__ = ["RandomDropMerge", "pack_mask", "unpack_mask"]
