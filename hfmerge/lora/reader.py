"""A base checkpoint read with a LoRA adapter applied, tensor by tensor: no merged copy is
written or held.

A changed tensor comes back in float32 (the merge computes in float32 anyway), as
`W + scale·B·A` for a delta (rows of `(B·A)ᵀ` for [in, out] storage) or as the adapter's own
tensor for a replacement. Tensors the adapter does not change come back as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfmerge.lora.layout import AdapterLayout, LowRankDelta
from hfmerge.tensors import LazyCheckpoint, TensorReader


@dataclass(frozen=True)
class AdaptedReader:
    """The tensors of `checkpoint` (the base) with `adapter`'s changes applied on read.

    One module's A and B are read whole once (they are small: rank × width) and kept while its
    tensor's chunks are read.
    """

    checkpoint: TensorReader
    adapter: LazyCheckpoint
    layout: AdapterLayout
    _pair: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, whole, with the adapter applied."""
        if not self.layout.changes(name):
            return self.checkpoint.get(name)
        whole = self._source_rows(name, None)
        delta = self.layout.deltas.get(name)
        return whole if delta is None else whole.add_(self._delta_rows(delta, 0, whole.shape[0]))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of tensor `name`, with the adapter applied."""
        if not self.layout.changes(name):
            return self.checkpoint.get_rows(name, start, stop)
        rows = self._source_rows(name, (start, stop))
        delta = self.layout.deltas.get(name)
        return rows if delta is None else rows.add_(self._delta_rows(delta, start, stop))

    def _source_rows(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """The base's rows of `name` (or the adapter's replacement), as a float32 copy."""
        replacement = self.layout.replaced.get(name)
        reader: TensorReader = self.checkpoint if replacement is None else self.adapter
        source = replacement or name
        read = reader.get(source) if rows is None else reader.get_rows(source, *rows)
        return read.to(torch.float32, copy=True)

    def _delta_rows(self, delta: LowRankDelta, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the delta in the base tensor's layout, float32."""
        a, b = self._factors(delta)  # a: [r, in], b: [out, r]
        if delta.transposed:  # stored [in, out]: rows of (B·A)ᵀ are columns of B·A
            return (b @ a[:, start:stop]).T.mul_(delta.scale)  # [stop - start, out]
        return (b[start:stop] @ a).mul_(delta.scale)  # [stop - start, in]

    def _factors(self, delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
        if delta.tensor not in self._pair:
            self._pair.clear()
            a = self.adapter.get(delta.a).to(torch.float32)
            b = self.adapter.get(delta.b).to(torch.float32)
            self._pair[delta.tensor] = (a, b)
        return self._pair[delta.tensor]
