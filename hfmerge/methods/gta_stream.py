"""Task-vector methods (task arithmetic, TIES, breadcrumbs) chunk by chunk, exactly.

Magnitude cuts are per tensor, as in mergekit, so they are found first over the whole task vector:
two radix-selection passes (`methods/select.py`) give the exact k-th largest |delta| and how many
ties at it to keep. An optional third pass sums the L1 norms for `rescale`. The apply pass then
prunes each chunk with those cuts and combines it with the element-wise rule of `gta_sum.py`.

The output equals the whole-tensor function bit for bit, except with `rescale`: there the L1 norms
are chunk sums added in float64 rather than one float32 `sum`, so the rescale factor may differ in
its last bits (relative difference < 1e-6; tested in tests/engine/test_chunks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from hfmerge.methods.chunks import Chunk, Submit
from hfmerge.methods.select import CutMask, RadixSelect, magnitude_keys
from hfmerge.methods.sparsify import RESCALE_EPS, Band

# (task vector, model index) -> that model's task vector sparsified.
Prune = Callable[[torch.Tensor, int], torch.Tensor]
# (input tensors, base, prune) -> merged: the element-wise combination, `gta_sum.TaskVectorSum`.
Combine = Callable[[Sequence[torch.Tensor], torch.Tensor, Prune | None], torch.Tensor]


class TaskVectorMerge:
    """One tensor of a task-vector method: radix passes, an optional L1 pass, then apply."""

    whole_only = False

    def __init__(
        self,
        n: int,
        *,
        bands: Sequence[Band | None] | None,
        rescale: bool,
        combine: Combine,
        device: torch.device,
    ) -> None:
        self.bands = list(bands) if bands is not None else None
        self.elementwise = bands is None  # no magnitude cuts: plain task arithmetic
        self.combine = combine
        cut_lists = [_band_ks(band) for band in self.bands or []]
        self._selects = [RadixSelect(ks, n, device=device) for ks in cut_lists]
        radix = any(select.needed for select in self._selects)
        pruning = any(band is not None and not band.zero for band in self.bands or [])
        self._kinds = ["hi", "lo"] * radix + ["l1"] * (rescale and pruning)
        self._masks: list[list[CutMask]] = []
        self._sums = [[0.0, 0.0] for _ in cut_lists]  # per model: L1 before, after pruning
        self._scales: list[torch.Tensor | None] = [None] * len(cut_lists)
        if not radix:
            for select in self._selects:
                select.end_lo()  # trivial cuts (keep all / none), known without data

    @property
    def passes(self) -> int:
        """Statistics passes before the apply pass: 0 (no pruning), 2 (cuts) or 3 (+ L1)."""
        return len(self._kinds)

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Feed one chunk to the radix selections or to the L1 sums."""
        if self._kinds[pass_index] == "l1":
            self._observe_l1(chunk)
        else:
            self._add_counts(pass_index, self._count(pass_index, chunk))

    def observe_split(self, pass_index: int, head: Chunk, tail: Chunk, submit: Submit) -> None:
        """`observe(head)` then `observe(tail)`; the radix passes count the tail through
        `submit` (integer counts add exactly in any order). The L1 pass runs in order: its masks
        use tie quotas in flat order."""
        if self._kinds[pass_index] == "l1":
            self._observe_l1(head)
            self._observe_l1(tail)
            return
        later = submit(self._count, pass_index, tail)
        self._add_counts(pass_index, self._count(pass_index, head))
        self._add_counts(pass_index, later.result())

    def _count(self, pass_index: int, chunk: Chunk) -> list[Any]:
        """One radix pass's counts of `chunk`, per model (None: that model needs no cut)."""
        hi = self._kinds[pass_index] == "hi"
        base = need_base(chunk)
        counts: list[Any] = []
        for select, tensor in zip(self._selects, chunk.tensors, strict=True):
            if not select.needed:
                counts.append(None)
                continue
            keys = magnitude_keys(tensor - base)
            counts.append(select.count_hi(keys) if hi else select.count_lo(keys))
        return counts

    def _add_counts(self, pass_index: int, counts: list[Any]) -> None:
        hi = self._kinds[pass_index] == "hi"
        for select, count in zip(self._selects, counts, strict=True):
            if count is None:
                continue
            if hi:
                select.add_hi(count)
            else:
                select.add_lo(count)

    def _observe_l1(self, chunk: Chunk) -> None:
        """Add the chunk's L1 norms before and after pruning, per model."""
        base = need_base(chunk)
        if chunk.first == 0:
            self._reset_masks()
        for index, tensor in enumerate(chunk.tensors):
            delta = tensor - base
            pruned = self._mask_only(self._masks, delta, index)
            self._sums[index][0] += float(delta.abs().sum(dtype=torch.float64))
            self._sums[index][1] += float(pruned.abs().sum(dtype=torch.float64))

    def end_pass(self, pass_index: int) -> None:
        """Finish a statistics pass: fix the histograms' bins, the cuts, or the L1 scales."""
        kind = self._kinds[pass_index]
        for index, select in enumerate(self._selects):
            if kind == "hi" and select.needed:
                select.end_hi()
            elif kind == "lo":
                select.end_lo()
            elif kind == "l1":
                self._scales[index] = l1_scale(*self._sums[index])

    @property
    def splittable(self) -> bool:
        """Always: the radix counts add in any order, and `apply_split` hands the tail the tie
        quotas the head leaves."""
        return True

    def apply(self, chunk: Chunk) -> torch.Tensor:
        """The merged rows of `chunk` (chunks must come in flat order)."""
        if chunk.first == 0:
            self._reset_masks()
        return self._apply_with(self._masks, chunk)

    def apply_split(self, head: Chunk, tail: Chunk, submit: Submit) -> tuple[torch.Tensor, Any]:
        """`apply(head)` and `apply(tail)` at once; the tail runs through `submit`."""
        if head.first == 0:
            self._reset_masks()
        tail_masks = self._masks_after(head)
        later = submit(self._apply_with, tail_masks, tail)
        merged = self._apply_with(self._masks, head), later.result()
        self._masks = tail_masks
        return merged

    def _apply_with(self, masks: list[list[CutMask]], chunk: Chunk) -> torch.Tensor:
        prune = partial(self._prune, masks) if self.bands is not None else None
        return self.combine(chunk.tensors, need_base(chunk), prune)

    def _reset_masks(self) -> None:
        # Tie quotas are consumed in flat order, so every pass over the chunks starts afresh.
        self._masks = [[CutMask(cut) for cut in select.cuts] for select in self._selects]

    def _masks_after(self, chunk: Chunk) -> list[list[CutMask]]:
        """The masks as they will be once `chunk` is applied: its ties at each cut used up."""
        after = []
        for index, masks in enumerate(self._masks):
            if all(mask.stateless for mask in masks):
                after.append(masks)  # nothing to hand over, so both halves may share them
                continue
            keys = magnitude_keys(chunk.tensors[index] - need_base(chunk))
            after.append([mask.after(keys) for mask in masks])
        return after

    def _mask_only(
        self, masks: list[list[CutMask]], delta: torch.Tensor, index: int
    ) -> torch.Tensor:
        """`delta` with the entries outside its band zeroed (`sparsify.band_prune` unscaled)."""
        band = self.bands[index] if self.bands is not None else None
        if band is None:
            return delta
        if band.zero:
            return torch.zeros_like(delta)
        keys = magnitude_keys(delta)
        keep = masks[index][0].keep(keys)
        if len(masks[index]) > 1:  # breadcrumbs: drop the skip_top largest (a subset: 1 - 1)
            keep -= masks[index][1].keep(keys)
        return delta * keep

    def _prune(self, masks: list[list[CutMask]], delta: torch.Tensor, index: int) -> torch.Tensor:
        pruned = self._mask_only(masks, delta, index)
        scale = self._scales[index]
        return pruned if scale is None else pruned * scale


def _band_ks(band: Band | None) -> list[int]:
    """The top-k counts a band needs: k = skip_top + keep, and skip_top to drop when positive."""
    if band is None or band.zero:
        return []
    return [band.skip_top + band.keep] + ([band.skip_top] if band.skip_top > 0 else [])


def l1_scale(before: float, after: float) -> torch.Tensor | None:
    """`sparsify.rescale_l1`'s factor, from L1 sums; None where it leaves the tensor alone."""
    before32 = torch.tensor(before, dtype=torch.float32)
    after32 = torch.tensor(after, dtype=torch.float32)
    if before32 < RESCALE_EPS or after32 < RESCALE_EPS:
        return None
    return before32 / after32


def need_base(chunk: Chunk) -> torch.Tensor:
    """The chunk's base-model rows; a ValueError (a caller's bug) when it carries none."""
    if chunk.base is None:
        raise ValueError("task-vector methods need the base model's tensors")
    return chunk.base
