"""Exact top-k by magnitude over a tensor seen in flat-order chunks: a two-pass radix selection.

Non-negative float32 values order like their bit patterns read as int32, so the k-th largest
magnitude is found from a histogram of the keys' top 16 bits (pass 1), then of the low 16 bits of
the keys inside the one bin that holds it (pass 2). Integer counts add exactly, so any chunking
gives the same cut, and it is the value `torch.kthvalue` returns, bit for bit: no sort, no
whole-tensor temporary, only integer counting in each pass. `CutMask` then applies the cut chunk by
chunk with `topk_mask`'s tie rule (ties at the cut are taken in flat-index order).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"
_ABS = 0x7FFFFFFF  # clears the float32 sign bit: key(x) = bits of |x|
HI_BINS = 1 << 15  # top 16 bits of a key (the sign bit is always 0)
LO_BINS = 1 << 16
ALL = -1  # a cut below every key: every entry is in
NONE = _ABS  # a cut at the largest key: no (finite) entry is in


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys of `|values|` (float32, contiguous), ordered as the magnitudes are."""
    # abs clears the sign bit (NaNs' too): the same bits as `& _ABS`, in a faster float kernel.
    return values.abs().view(torch.int32)


@dataclass(frozen=True)
class Cut:
    """The k largest entries: every entry whose key is above `key`, then the first `ties`
    entries (in flat order) whose key equals it."""

    key: int
    ties: int
    all_ties: bool = False  # every entry equal to `key` is in (the usual case): no bookkeeping


class RadixSelect:
    """Cuts for several `k` over one stream of keys: `observe_hi` every chunk, `end_hi`, then
    `observe_lo` every chunk again, `end_lo`; `cuts` then holds one `Cut` per k."""

    def __init__(self, ks: Sequence[int], n: int, *, device: torch.device) -> None:
        self.ks = list(ks)
        self.n = n
        self.device = device
        self._hi = torch.zeros(HI_BINS, dtype=torch.int64, device=device)
        self._bins: dict[int, tuple[int, torch.Tensor]] = {}  # bin -> (count above, low hist)
        self.cuts: list[Cut] = []

    @property
    def needed(self) -> bool:
        """Whether any k needs the passes (k <= 0 and k >= n are known without data)."""
        return any(0 < k < self.n for k in self.ks)

    def observe_hi(self, keys: torch.Tensor) -> None:
        """Pass 1: count the chunk's keys by their top 16 bits."""
        self.add_hi(self.count_hi(keys))

    @staticmethod
    def count_hi(keys: torch.Tensor) -> torch.Tensor:
        """Pass 1's counts for one chunk, without adding them (safe on any thread)."""
        flat = keys.reshape(-1)
        if _LITTLE_ENDIAN:
            # The top halves read in place as int16 (keys are >= 0): no shift, and no int32
            # temporary to hold its result.
            return torch.bincount(flat.view(torch.int16)[1::2], minlength=HI_BINS)
        return torch.bincount(flat >> 16, minlength=HI_BINS)

    def add_hi(self, counts: torch.Tensor) -> None:
        """Add `count_hi`'s counts: integer sums, so chunks may be counted in any order."""
        self._hi += counts

    def end_hi(self) -> None:
        """Find the bin holding each k-th largest key."""
        # at_least[b]: keys whose top bits are >= b, so a bin's upper neighbour counts "above".
        at_least = self._hi.flip(0).cumsum(0).flip(0).tolist()
        at_least.append(0)
        for k in self.ks:
            if 0 < k < self.n:
                b = _last_index_at_least(at_least, k)
                if b not in self._bins:
                    low = torch.zeros(LO_BINS, dtype=torch.int64, device=self.device)
                    self._bins[b] = (at_least[b + 1], low)

    def observe_lo(self, keys: torch.Tensor) -> None:
        """Pass 2: count the low 16 bits of the keys that fall in a wanted bin."""
        self.add_lo(self.count_lo(keys))

    def count_lo(self, keys: torch.Tensor) -> list[torch.Tensor]:
        """Pass 2's counts for one chunk, one histogram per wanted bin, without adding them."""
        flat = keys.reshape(-1)
        counts = []
        for b in self._bins:
            # Keys below the bin land in slot 0, above it in the last: one bincount, no select.
            if b > 0:
                slots = (flat - ((b << 16) - 1)).clamp_(0, LO_BINS + 1)  # key - bin start + 1
            else:  # key + 1 would overflow at the largest NaN's key
                slots = flat.clamp(max=LO_BINS).add_(1)
            counts.append(torch.bincount(slots, minlength=LO_BINS + 2)[1 : LO_BINS + 1])
        return counts

    def add_lo(self, counts: list[torch.Tensor]) -> None:
        """Add `count_lo`'s counts, bin by bin."""
        for (_, hist), count in zip(self._bins.values(), counts, strict=True):
            hist += count

    def end_lo(self) -> None:
        """Turn the histograms into one exact `Cut` per k."""
        lows = {
            b: (above, hist.flip(0).cumsum(0).flip(0).tolist())
            for b, (above, hist) in self._bins.items()
        }
        self.cuts = [self._cut(k, lows) for k in self.ks]

    def _cut(self, k: int, lows: dict[int, tuple[int, list[int]]]) -> Cut:
        if k <= 0:
            return Cut(NONE, 0)
        if k >= self.n:
            return Cut(ALL, 0)
        for b, (above, at_least) in lows.items():
            if above < k <= above + at_least[0]:
                at_least = [*at_least, 0]
                low = _last_index_at_least(at_least, k - above)
                greater = above + at_least[low + 1]
                tied = at_least[low] - at_least[low + 1]
                return Cut((b << 16) | low, k - greater, all_ties=k - greater == tied)
        raise AssertionError("radix selection lost its bin")  # the passes saw different data


def _last_index_at_least(at_least: list[int], k: int) -> int:
    """Largest index i with at_least[i] >= k (at_least is non-increasing, at_least[0] >= k)."""
    low, high = 0, len(at_least) - 1
    while low < high:  # invariant: at_least[low] >= k
        mid = (low + high + 1) // 2
        if at_least[mid] >= k:
            low = mid
        else:
            high = mid - 1
    return low


def select_cuts(keys: torch.Tensor, ks: Sequence[int]) -> list[Cut]:
    """The cuts for `ks` over one in-memory tensor of keys (both passes on it)."""
    select = RadixSelect(ks, keys.numel(), device=keys.device)
    if select.needed:
        select.observe_hi(keys)
        select.end_hi()
        select.observe_lo(keys)
    select.end_lo()
    return select.cuts


class CutMask:
    """Applies a `Cut` to consecutive chunks of the keys, in flat order, taking ties from the
    front until the cut's quota is used (so the chunks' masks concatenate to `topk_mask`)."""

    def __init__(self, cut: Cut) -> None:
        self.key = cut.key
        self.ties_left = cut.ties
        self.all_ties = cut.all_ties

    @property
    def stateless(self) -> bool:
        """Whether chunks may be masked in any order: no partial tie quota is left to use."""
        return self.all_ties or self.ties_left == 0

    def after(self, keys: torch.Tensor) -> CutMask:
        """A copy of this mask as it will be after masking `keys` (their ties used up)."""
        later = CutMask(Cut(self.key, self.ties_left, self.all_ties))
        if not self.stateless:
            later.ties_left = max(0, self.ties_left - self._count_ties(keys))
        return later

    def keep(self, keys: torch.Tensor) -> torch.Tensor:
        """1.0 for the entries of this chunk that are among the k largest, else 0.0 (float32).

        Comparing into a float tensor, and multiplying by one, is faster on CPU than making a
        bool mask and multiplying by it, a mixed-dtype product."""
        kept = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
        if self.all_ties:
            return torch.ge(keys, self.key, out=kept)
        if self.ties_left == 0:
            return torch.gt(keys, self.key, out=kept)
        count = self._count_ties(keys)
        if count <= self.ties_left:  # every tie here is within the quota
            self.ties_left -= count
            return torch.ge(keys, self.key, out=kept)
        torch.gt(keys, self.key, out=kept)
        tied = torch.nonzero(keys.reshape(-1) == self.key).squeeze(1)  # [ties here]
        kept.view(-1)[tied[: self.ties_left]] = 1.0
        self.ties_left = 0
        return kept

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """`keep` as a boolean mask."""
        return self.keep(keys) != 0

    def _count_ties(self, keys: torch.Tensor) -> int:
        tied = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
        return int(torch.count_nonzero(torch.eq(keys, self.key, out=tied)))
