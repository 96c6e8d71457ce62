"""Merges that mix the models with coefficients set by inner products of their tensors (SLERP's
angle, Model Stock's mean cosine), whole or in row chunks.

Such a method names the tensors whose inner products it needs (`vectors`, as [rows, cols] views
from `rows_of`), turns their Gram matrix into mixing coefficients (`coefficients`) and mixes the
tensors with them (`combine`). The Gram matrix is kept per row ([N, N, rows]): each row's products
are summed in float32, which gives the same sum whichever chunk holds the row, and rows are added
up in float64. A method with one coefficient set per tensor sums over the rows first ([N, N, 1]),
so a tensor merged in chunks gets the whole tensor's coefficients within float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hfmerge.methods.chunks import Chunk, Submit, TensorMerge, apply_halves
from hfmerge.methods.params import MethodParams, ModelParams

# chunk -> the N vectors to take inner products of, each [rows, cols] (`rows_of`)
Vectors = Callable[[Chunk], Sequence[torch.Tensor]]
# [N, N, rows] (per row) or [N, N, 1] (per tensor) float64 Gram matrix -> mixing coefficients
Coefficients = Callable[[torch.Tensor], Any]
# (chunk, coefficients) -> the chunk's merged rows
Combine = Callable[[Chunk, Any], torch.Tensor]

_SUM_ELEMENTS = 1 << 20  # elements per product temporary: bounds scratch memory on whole tensors


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """[rows, cols] view of a tensor's rows along dim 0; a 1-D tensor's rows are its elements,
    and a 0-d tensor is one row of one."""
    if tensor.dim() >= 2:
        return tensor.flatten(1)  # [rows, ...] -> [rows, cols], zero rows included
    return tensor.reshape(-1, 1)  # [n] -> [n, 1]


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, N, rows] float64: the row-wise dot products of every pair of [rows, cols] vectors,
    each row summed in float32."""
    count = len(vectors)
    rows, cols = vectors[0].shape
    out = torch.empty(count, count, rows, dtype=torch.float64, device=vectors[0].device)
    step = max(1, _SUM_ELEMENTS // max(1, cols))  # rows per product temporary
    for i, a in enumerate(vectors):
        for j in range(i, count):
            b = vectors[j]
            for start in range(0, rows, step):
                stop = start + step
                out[i, j, start:stop] = (a[start:stop] * b[start:stop]).sum(dim=1)
            out[j, i] = out[i, j]
    return out


def per_tensor(products: torch.Tensor) -> torch.Tensor:
    """[N, N, rows] -> [N, N, 1]: the Gram matrix of whole tensors, rows added in float64."""
    return products.sum(dim=2, keepdim=True)


@dataclass(frozen=True)
class GramMethod:
    """A method's three parts (see the module docstring)."""

    vectors: Vectors
    coefficients: Coefficients
    combine: Combine

    def merge(self, chunk: Chunk, *, per_row: bool) -> torch.Tensor:
        """The merge of a chunk whose Gram matrix is its own: a whole tensor, or whole rows of a
        tensor with coefficients per row (`per_row`)."""
        products = gram(self.vectors(chunk))
        return self.combine(chunk, self.coefficients(products if per_row else per_tensor(products)))


@dataclass(frozen=True)
class GramForms:
    """A Gram method's whole-tensor function (`merge`, a `MergeFn`) and chunked form (`stream`, a
    `StreamFactory`), from its parts for given parameters.

    `row_local(params, shape)`: whether the method has coefficients per row of that tensor.
    """

    name: str
    parts: Callable[[MethodParams, Sequence[ModelParams]], GramMethod]
    row_local: Callable[[MethodParams, tuple[int, ...]], bool] = lambda params, shape: False

    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The merge of whole tensors."""
        chunk = Chunk(tensors, base, 0, whole=True)  # a method that needs the base checks it
        per_row = self.row_local(params, tuple(chunk.tensors[0].shape))
        return self.parts(params, model_params).merge(chunk, per_row=per_row)

    def stream(
        self,
        shape: tuple[int, ...],
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge:
        """The merge of one tensor of `shape` in row chunks."""
        return GramMerge(self.parts(params, model_params), row_local=self.row_local(params, shape))


class GramMerge:
    """One tensor of a `GramMethod` in row chunks.

    `row_local`: coefficients per row, so each chunk (whole rows) is merged on its own. Otherwise a
    statistics pass first adds up the chunks' Gram matrices, and the apply pass mixes every chunk
    with the coefficients of the total.
    """

    whole_only = False
    elementwise = False
    splittable = True

    def __init__(self, method: GramMethod, *, row_local: bool) -> None:
        self.method = method
        self.row_local = row_local
        self._gram: torch.Tensor | None = None
        self._coefficients: Any = None

    @property
    def passes(self) -> int:
        """Statistics passes: none with coefficients per row, else one."""
        return 0 if self.row_local else 1

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Add the chunk's Gram matrix to the tensor's."""
        self._add(self._chunk_gram(chunk))

    def observe_split(self, pass_index: int, head: Chunk, tail: Chunk, submit: Submit) -> None:
        """Both halves' Gram matrices at once, added head first as `observe` would."""
        later = submit(self._chunk_gram, tail)
        self._add(self._chunk_gram(head))
        self._add(later.result())

    def end_pass(self, pass_index: int) -> None:
        """The tensor's coefficients, from its total Gram matrix."""
        assert self._gram is not None, "no chunk was observed"
        self._coefficients = self.method.coefficients(self._gram)

    def apply(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's merged rows."""
        if self.row_local:
            return self.method.merge(chunk, per_row=True)
        return self.method.combine(chunk, self._coefficients)

    def apply_split(self, head: Chunk, tail: Chunk, submit: Submit) -> tuple[torch.Tensor, Any]:
        """`apply` of both halves at once: no state links the halves."""
        return apply_halves(self.apply, head, tail, submit)

    def _chunk_gram(self, chunk: Chunk) -> torch.Tensor:
        return per_tensor(gram(self.method.vectors(chunk)))

    def _add(self, chunk_gram: torch.Tensor) -> None:
        self._gram = chunk_gram if self._gram is None else self._gram + chunk_gram
