"""DARE and DELLA chunk by chunk, with the same random masks as the whole-tensor function.

The whole-tensor function draws each model's mask with `torch.bernoulli` from one generator, model
after model, one draw per entry in flat order; drawn in flat-order pieces, the stream is the same.
So model i's draws start where model i-1's end. (DELLA's keep probabilities rank each row, and
chunks hold whole rows; a 1-D tensor is one row, so it is merged whole.) One statistics pass per
model that drops entries
walks its masks in order, which both finds where the next model's draws start and sums the L1
norms for `rescale`; the apply pass then replays every model's draws from its saved start, each
model on its own generator state.

With `rescale`, the L1 norms are chunk sums added in float64 rather than one float32 `sum`, so the
factor may differ in its last bits (as for chunked TIES; tested in tests/test_engine_chunks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hfmerge.methods.chunks import Chunk, Submit
from hfmerge.methods.gta_stream import Combine, l1_scale
from hfmerge.methods.sparsify import DropRule


class RandomDropMerge:
    """One tensor of DARE/DELLA: a pass per dropping model, then apply with the masks replayed."""

    whole_only = False

    def __init__(self, n: int, *, rules: Sequence[DropRule], rescale: bool, combine: Combine,
                 generator: torch.Generator | None) -> None:
        if generator is None:
            raise ValueError("a random method needs a generator to stream (its masks replay)")
        self.rules = list(rules)
        self.dropping = [i for i, rule in enumerate(self.rules) if callable(rule) and n > 0]
        self.rescale = rescale
        self.combine = combine
        self._generator = generator
        self._starts: dict[int, torch.Tensor] = {}  # model -> generator state at its first draw
        self._states: dict[int, torch.Tensor] = {}  # apply pass: where each model's draws are
        self._sums = {i: [0.0, 0.0] for i in self.dropping}  # L1 before, after dropping
        self._scales: dict[int, torch.Tensor | None] = {}

    @property
    def passes(self) -> int:
        """One statistics pass per model that drops entries."""
        return len(self.dropping)

    @property
    def splittable(self) -> bool:
        """Never: the masks come from one sequential stream per model."""
        return False

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Draw model `dropping[pass_index]`'s mask for the chunk; add its L1 norms."""
        index = self.dropping[pass_index]
        if chunk.first == 0:
            self._starts[index] = self._generator.get_state()
        delta = chunk.tensors[index] - _base(chunk)
        pruned = delta * self._mask(delta, index, self._generator)
        if self.rescale:
            self._sums[index][0] += float(delta.abs().sum(dtype=torch.float64))
            self._sums[index][1] += float(pruned.abs().sum(dtype=torch.float64))

    def end_pass(self, pass_index: int) -> None:
        """The model's draws are done (the generator now sits at the next model's first)."""
        index = self.dropping[pass_index]
        self._scales[index] = l1_scale(*self._sums[index]) if self.rescale else None

    def apply(self, chunk: Chunk) -> torch.Tensor:
        """The merged rows of `chunk` (chunks must come in flat order)."""
        if chunk.first == 0:
            self._states = dict(self._starts)
        return self.combine(chunk.tensors, _base(chunk), self._prune)

    def apply_split(self, head: Chunk, tail: Chunk, submit: Submit) -> tuple[torch.Tensor, Any]:
        """Never called: `splittable` is False."""
        raise AssertionError("random masks cannot be split across threads")

    def _prune(self, delta: torch.Tensor, index: int) -> torch.Tensor:
        if self.rules[index] == "drop all":
            return torch.zeros_like(delta)
        if index not in self._states:
            return delta  # keeps everything
        generator = torch.Generator().set_state(self._states[index])
        pruned = delta * self._mask(delta, index, generator)
        self._states[index] = generator.get_state()
        scale = self._scales.get(index)
        return pruned if scale is None else pruned * scale

    def _mask(self, delta: torch.Tensor, index: int, generator: torch.Generator) -> torch.Tensor:
        rule = self.rules[index]
        assert callable(rule)
        return torch.bernoulli(rule(delta), generator=generator)


def _base(chunk: Chunk) -> torch.Tensor:
    if chunk.base is None:
        raise ValueError("task-vector methods need the base model's tensors")
    return chunk.base


__all__ = ["RandomDropMerge"]
