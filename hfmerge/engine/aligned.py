"""An input's tensors read in the base's basis: the map found by alignment (permutations, and for
the orthogonal methods the norm fold and residual rotation, `arch/residual.py`) is applied as rows
are read, so aligned copies of the inputs are never written or held whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfmerge.arch.residual import BasisMap, read_in_basis
from hfmerge.arch.spec import ArchSpec
from hfmerge.tensors import TensorReader


@dataclass(frozen=True)
class AlignedReader:
    """One input's tensors, mapped on read into the base's basis when `basis` is set.

    A permutation or rotation can move rows anywhere, so a mapped tensor is read whole once and
    its chunks are cut from it (the last one is kept for the next pass).
    """

    checkpoint: TensorReader  # the input's checkpoint (with its adapter, if any)
    spec: ArchSpec
    basis: BasisMap | None
    _last: dict[str, torch.Tensor] = field(default_factory=dict, compare=False)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of tensor `name`, in the base's basis."""
        if self.basis is None:
            return self.checkpoint.get_rows(name, start, stop)
        if name not in self._last:
            self._last.clear()
            # An expert's slot may read another expert's tensor (its source under the order).
            self._last[name] = read_in_basis(name, self.checkpoint.get, self.spec, self.basis)
        whole = self._last[name]
        return whole[start:stop] if whole.dim() else whole
