"""NaN and Inf weights, caught as chunks stream through the merge engine.

Every float chunk read from an input, and every merged chunk before it is written, is checked
with a sum: a sum is finite only if every element is (NaN and Inf propagate, and +Inf + -Inf is
NaN), so one vectorised reduction per chunk stands in for an element-wise test, which costs ten
times as much on a CPU. Only when a sum is not finite are the values counted, exactly; a sum of
finite values that overflows is counted too and found clean. The counts of one tensor are summed
over its chunks (`FiniteTally`); at the tensor's end they become a `NonFiniteWeightsError`, raised
before the output is renamed into place, or, when the run allows them, a finding for the warning
`warn_non_finite` prints once the merge is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hfmerge.errors import NonFiniteWeightsError
from hfmerge.progress import say

# The findings a warning lists one by one; the rest are counted.
_WARN_LINES = 20


@dataclass(frozen=True)
class NonFiniteCount:
    """How many values of a tensor (or part of one) are NaN, +Inf and -Inf."""

    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    @property
    def total(self) -> int:
        """All non-finite values."""
        return self.nan + self.posinf + self.neginf

    def __add__(self, other: NonFiniteCount) -> NonFiniteCount:
        return NonFiniteCount(
            self.nan + other.nan, self.posinf + other.posinf, self.neginf + other.neginf
        )


@dataclass(frozen=True)
class NonFiniteFinding:
    """Non-finite values in one tensor of one input model (its label), or of the merged output
    (`model` None), counted over the whole tensor."""

    model: str | None
    tensor: str
    count: NonFiniteCount

    def describe(self) -> str:
        """`m1, tensor x.weight: 3 NaN, 0 +Inf, 0 -Inf`."""
        where = self.model if self.model is not None else "the merged output"
        c = self.count
        return f"{where}, tensor {self.tensor}: {c.nan} NaN, {c.posinf} +Inf, {c.neginf} -Inf"


def quick_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The 0-d sum of `tensor`: not finite whenever an element is not (and, rarely, when finite
    values overflow). float16 sums in float32, since 64K values near 1 already pass its 65504."""
    if tensor.dtype == torch.float16:
        return tensor.sum(dtype=torch.float32)
    return tensor.sum()


def sums_finite(sums: Sequence[torch.Tensor]) -> bool:
    """Whether every sum in `sums` (0-d tensors of `quick_sum`) is finite: one value read back."""
    if not sums:
        return True
    return math.isfinite(torch.stack(list(sums)).sum().item())  # +Inf + -Inf is NaN: no escape


def count_non_finite(tensor: torch.Tensor) -> NonFiniteCount:
    """The exact counts of `tensor` (any float dtype), for when `quick_sum` was not finite."""
    if not tensor.is_floating_point():
        return NonFiniteCount()
    return NonFiniteCount(
        nan=int(torch.isnan(tensor).sum()),
        posinf=int(torch.isposinf(tensor).sum()),
        neginf=int(torch.isneginf(tensor).sum()),
    )


def check_chunk(tensor: torch.Tensor) -> NonFiniteCount:
    """The non-finite counts of a whole chunk: the quick sum, then exact counts only if needed."""
    if not tensor.is_floating_point() or sums_finite([quick_sum(tensor)]):
        return NonFiniteCount()
    return count_non_finite(tensor)


def check_sources(
    labels: Sequence[str], sources: Sequence[torch.Tensor]
) -> tuple[tuple[str, NonFiniteCount], ...]:
    """`check_chunk` of each of a chunk's `sources`: (model label, counts) of those not finite."""
    counts = [(label, check_chunk(t)) for label, t in zip(labels, sources, strict=True)]
    return tuple((label, count) for label, count in counts if count.total)


class FiniteTally:
    """One merging process's non-finite counts: those of the tensor being merged, summed over
    its chunks, and the findings of finished tensors (when the run allows them).

    Used from the main thread only; the reader thread's counts travel on each step.
    """

    def __init__(self, *, allow: bool, method: str) -> None:
        self.allow = allow
        self.method = method
        self.found: list[NonFiniteFinding] = []
        self._current: dict[str | None, NonFiniteCount] = {}  # model label (None: output)

    def add(self, model: str | None, count: NonFiniteCount) -> None:
        """Count `count` against `model` (None: the merged output) in the current tensor."""
        if count.total:
            self._current[model] = self._current.get(model, NonFiniteCount()) + count

    def add_part(
        self,
        labels: Sequence[str],
        sources: Sequence[torch.Tensor],
        offset: int,
        part: torch.Tensor,
    ) -> None:
        """Count exactly the chunk's `sources` (against `labels`) over the flat elements
        `offset:offset + part.numel()`, and `part`, their merged output (`OnNonFinite`)."""
        stop = offset + part.numel()
        for label, source in zip(labels, sources, strict=True):
            self.add(label, count_non_finite(source.reshape(-1)[offset:stop]))
        self.add(None, count_non_finite(part))

    def end_tensor(self, tensor: str) -> None:
        """The tensor is done: raise for its first non-finite input (else for the output), or
        keep its findings for the warning when the run allows them."""
        current, self._current = self._current, {}
        findings = [NonFiniteFinding(model, tensor, count) for model, count in current.items()]
        if not findings:
            return
        if self.allow:
            self.found.extend(findings)
            return
        inputs = [f for f in findings if f.model is not None]
        first = inputs[0] if inputs else findings[0]
        raise NonFiniteWeightsError(
            first.model,
            tensor,
            nan=first.count.nan,
            posinf=first.count.posinf,
            neginf=first.count.neginf,
            method=self.method,
            others=[f.model for f in inputs[1:] if f.model is not None],
        )


def warn_non_finite(findings: Sequence[NonFiniteFinding]) -> None:
    """One warning on stderr listing what a run that allows non-finite weights found."""
    if not findings:
        return
    tensors = len({f.tensor for f in findings})
    lines = [
        f"warning: non-finite weights in {tensors} tensor{'s' if tensors != 1 else ''}, merged "
        "anyway as allow_non_finite (--allow-non-finite) asks; counts are per whole tensor:"
    ]
    lines += [f"  - {f.describe()}" for f in findings[:_WARN_LINES]]
    if len(findings) > _WARN_LINES:
        lines.append(f"  - and {len(findings) - _WARN_LINES} more")
    say("\n".join(lines))
