"""Merging one tensor from row chunks, so float32 temporaries stay bounded whatever its size.

A `TensorMerge` sees the tensor's chunks `passes` times to gather statistics (a threshold, a norm),
then once more to produce the merged chunks. Element-wise methods need no statistics pass; methods
without a chunked form are wrapped by `WholeTensorMerge`, which takes the tensor as one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from hfmerge.methods.params import MergeFn, MethodParams, ModelParams


# Runs fn(*args) on another thread: ThreadPoolExecutor.submit's shape.
Submit = Callable[..., Future[Any]]


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows of one tensor from every input, float32 on the compute device.

    `first` is the flat index of the chunk's first element; chunks come in flat order, each pass.
    """

    tensors: Sequence[torch.Tensor]
    base: torch.Tensor | None
    first: int
    whole: bool  # the chunk is the whole tensor

    def split(self, rows: int) -> tuple[Chunk, Chunk]:
        """The chunk's first `rows` rows and the rest, as two partial chunks (views, no copy)."""
        return self.rows(0, rows), self.rows(rows, len(self.tensors[0]))

    def rows(self, start: int, stop: int, *, as_float: bool = False) -> Chunk:
        """Rows `start:stop` of the chunk (a 0-d chunk is its own only row): views, or float32
        copies with `as_float` (no copy where they already are float32)."""

        def cut(tensor: torch.Tensor) -> torch.Tensor:
            piece = tensor[start:stop] if tensor.dim() else tensor
            return piece.float() if as_float else piece

        first = self.tensors[0]
        row_elements = first[:1].numel() if first.dim() else 1  # [rows, ...] -> [1, ...]
        return Chunk(
            [cut(t) for t in self.tensors],
            None if self.base is None else cut(self.base),
            self.first + start * row_elements,
            whole=self.whole and start == 0 and (first.dim() == 0 or stop >= len(first)),
        )


class TensorMerge(Protocol):
    """One tensor's merge: `observe` every chunk in each statistics pass (`end_pass` after the
    last), then `apply` every chunk in order, which returns that chunk's merged rows.
    `apply_split` may stand in for `apply` on two halves of one chunk, run at once."""

    whole_only: bool  # the chunk must be the whole tensor
    # `apply` of any rows gives those rows' output and keeps no state, so the engine may feed it
    # a chunk piece by piece, converting each piece to float32 only when it is merged.
    elementwise: bool

    @property
    def passes(self) -> int:
        """How many statistics passes over the chunks come before `apply` (0 for most methods)."""
        ...

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Take one chunk's statistics in pass `pass_index`."""
        ...

    def observe_split(self, pass_index: int, head: Chunk, tail: Chunk, submit: Submit) -> None:
        """Exactly `observe(head)` then `observe(tail)`, where the merge may hand the tail's work
        to `submit` (another thread) so the two halves run at once."""
        ...

    def end_pass(self, pass_index: int) -> None:
        """Finish pass `pass_index`: every chunk has been observed in it."""
        ...

    def apply(self, chunk: Chunk) -> torch.Tensor:
        """The merged rows of one chunk."""
        ...

    @property
    def splittable(self) -> bool:
        """Whether `observe_split` and `apply_split` may be used (whole-tensor methods need the
        chunk whole)."""
        ...

    def apply_split(self, head: Chunk, tail: Chunk, submit: Submit) -> tuple[torch.Tensor, Any]:
        """Exactly `apply(head)` and `apply(tail)`, with the tail's work handed to `submit`
        (another thread) so the two halves run at once. Returns the head's rows and whatever the
        tail's future yields: its rows, or what `submit`'s caller made of them (e.g. cast)."""
        ...


def apply_halves(
    apply: Callable[[Chunk], torch.Tensor], head: Chunk, tail: Chunk, submit: Submit
) -> tuple[torch.Tensor, Any]:
    """`apply_split` of a merge whose rows are merged independently: `apply(head)` here and
    `apply(tail)` through `submit`, at once."""
    later = submit(apply, tail)
    return apply(head), later.result()


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
    ) -> TensorMerge:
        """The merge of one tensor of `shape`, with these models' and the method's parameters,
        drawing random numbers from `generator`, computing on `device`."""
        ...


class _NoStatistics:
    """Base for merges with no statistics pass."""

    passes = 0

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        """Never called: there are no statistics passes."""
        raise AssertionError("this merge has no statistics pass")

    def end_pass(self, pass_index: int) -> None:
        """Never called: there are no statistics passes."""
        raise AssertionError("this merge has no statistics pass")

    def observe_split(self, pass_index: int, head: Chunk, tail: Chunk, submit: Submit) -> None:
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
        self.elementwise = not whole_only

    @property
    def splittable(self) -> bool:
        """Element-wise functions are; whole-tensor ones (and their generators) are not."""
        return not self.whole_only

    def apply_split(self, head: Chunk, tail: Chunk, submit: Submit) -> tuple[torch.Tensor, Any]:
        """`apply` of both halves at once: no state links the chunks."""
        return apply_halves(self.apply, head, tail, submit)

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
