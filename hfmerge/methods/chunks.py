"""Merging one tensor from row chunks, so float32 temporaries stay bounded whatever its size.

A `TensorMerge` sees the tensor's chunks `passes` times to gather statistics (a threshold, a norm),
then once more to produce the merged chunks. Element-wise methods need no statistics pass; methods
without a chunked form are wrapped by `WholeTensorMerge`, which takes the tensor as one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from hfmerge.methods.base import MergeFn, MethodParams, ModelParams


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows of one tensor from every input, float32 on the compute device.

    `first` is the flat index of the chunk's first element; chunks come in flat order, each pass.
    """

    tensors: Sequence[torch.Tensor]
    base: torch.Tensor | None
    first: int
    whole: bool  # the chunk is the whole tensor


class TensorMerge(Protocol):
    """One tensor's merge: `observe` every chunk in each statistics pass (`end_pass` after the
    last), then `apply` every chunk in order, which returns that chunk's merged rows."""

    @property
    def passes(self) -> int: ...

    def observe(self, pass_index: int, chunk: Chunk) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def apply(self, chunk: Chunk) -> torch.Tensor: ...


class StreamFactory(Protocol):
    """Makes the `TensorMerge` of one tensor of `shape` (a method's chunked form)."""

    def __call__(
        self,
        shape: tuple[int, ...],
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge: ...


class _NoStatistics:
    """Base for merges with no statistics pass."""

    passes = 0

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Never called: there are no statistics passes."""
        raise AssertionError("this merge has no statistics pass")

    def end_pass(self, pass_index: int) -> None:
        """Never called: there are no statistics passes."""
        raise AssertionError("this merge has no statistics pass")


class FunctionMerge(_NoStatistics):
    """`fn` applied to each chunk: exact for element-wise methods, and for any method when the
    chunk is the whole tensor (`whole_only`)."""

    def __init__(
        self,
        fn: MergeFn,
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        whole_only: bool,
    ) -> None:
        self.fn = fn
        self.model_params = model_params
        self.params = params
        self.generator = generator
        self.whole_only = whole_only

    def apply(self, chunk: Chunk) -> torch.Tensor:
        """The merged rows of `chunk`."""
        if self.whole_only and not chunk.whole:
            raise AssertionError("a whole-tensor method was given a partial chunk")
        return self.fn(
            chunk.tensors,
            base=chunk.base,
            model_params=self.model_params,
            params=self.params,
            generator=self.generator,
        )


def elementwise(fn: MergeFn) -> StreamFactory:
    """The chunked form of an element-wise method: `fn` on every chunk."""

    def factory(
        shape: tuple[int, ...],
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge:
        return FunctionMerge(
            fn, model_params=model_params, params=params, generator=generator, whole_only=False
        )

    return factory
