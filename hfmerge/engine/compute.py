"""How the merge engine spends its cores on a chunk: the main thread and a helper each take half
of its rows (torch drops the GIL inside each op), and element-wise merges convert and merge a
chunk's elements in cache-sized flat pieces so their float32 temporaries stay in cache (and are
checked for NaN and Inf there, `engine/finite.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from hfmerge.engine.finite import quick_sum, sums_finite
from hfmerge.engine.tuning import EngineTuning
from hfmerge.methods.chunks import Chunk, TensorMerge

# Called with a part's offset in the chunk's flat elements and the part as written, before the
# part is yielded, when the quick sums of its inputs or its output are not all finite.
OnNonFinite = Callable[[int, torch.Tensor], None]


class RowSplitter:
    """Runs `observe` and `apply` on a chunk's two row halves at once when the chunk has at
    least `min_elements` and the merge allows it.

    Whole chains of ops run in parallel, not each op's inner loop, which on 2 cores makes TIES
    about 1.5x faster where intra-op threads gained nothing.
    """

    def __init__(self, workers: int, min_elements: int) -> None:
        self._pool = ThreadPoolExecutor(workers, "hfmerge-compute") if workers > 0 else None
        self._min_elements = min_elements

    @classmethod
    def for_device(cls, device: torch.device, tuning: EngineTuning) -> RowSplitter:
        """`tuning.split_workers` helpers on a multi-core CPU; none on a GPU (its kernels are
        asynchronous anyway)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = tuning.split_workers if device.type == "cpu" and (cores or 1) > 1 else 0
        return cls(workers, tuning.split_min_elements)

    def _worth_splitting(self, chunk: Chunk) -> bool:
        first = chunk.tensors[0] if chunk.tensors else None
        return (
            self._pool is not None
            and first is not None
            and first.dim() > 0
            and first.shape[0] >= 2
            and first.numel() >= self._min_elements
        )

    def observe(self, merge: TensorMerge, pass_index: int, chunk: Chunk) -> None:
        """`merge.observe(pass_index, chunk)`, its row halves on two threads when worth it."""
        if not self._worth_splitting(chunk) or not merge.splittable:
            merge.observe(pass_index, chunk)
            return
        assert self._pool is not None
        head, tail = chunk.split(chunk.tensors[0].shape[0] // 2)
        merge.observe_split(pass_index, head, tail, self._pool.submit)

    def apply(
        self, merge: TensorMerge, chunk: Chunk, dtype: torch.dtype
    ) -> list[tuple[int, torch.Tensor]]:
        """`merge.apply(chunk)` cast to `dtype`, as (first element, rows) parts: the chunk's row
        halves on two threads when worth it and allowed, each cast on its own thread."""
        if not self._worth_splitting(chunk) or not merge.splittable:
            return [(chunk.first, merge.apply(chunk).to(dtype))]
        assert self._pool is not None
        pool = self._pool
        first = chunk.tensors[0]

        def cast_on_helper(fn: Callable[..., torch.Tensor], *args: Any) -> Future[torch.Tensor]:
            return pool.submit(lambda: fn(*args).to(dtype))

        head, tail = chunk.split(first.shape[0] // 2)
        head_rows, tail_rows = merge.apply_split(head, tail, cast_on_helper)
        return [(head.first, head_rows.to(dtype)), (tail.first, tail_rows)]

    def __enter__(self) -> RowSplitter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def apply_in_pieces(
    merge: TensorMerge,
    chunk: Chunk,
    dtype: torch.dtype,
    tuning: EngineTuning,
    on_non_finite: OnNonFinite | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """An element-wise merge of a chunk held in its storage dtype, cast to `dtype`, as
    (first element, flat output) parts of `tuning.part_elements`, each yielded once it is merged.

    The chunk's elements are converted to float32, merged and cast back `tuning.piece_elements`
    at a time (flat runs: an element-wise merge does not care about rows), through float32 buffers
    reused for every piece, so the temporaries stay in a core's cache instead of streaming
    through memory. On the main thread only: memory-bound work gains nothing from a helper, and
    the writer thread needs the other core (a helper made linear merges slower). Yielding parts
    lets the writer copy each one while it is still in cache, where a whole chunk's output would
    have left the cache before the writer reached it. One piece on a GPU, where the conversions
    cost nothing.

    With `on_non_finite`, each piece's float32 inputs and cast output are summed while in cache
    (one sum for all converted inputs: they share one buffer), and a part whose sums are not all
    finite is passed to it before it is yielded.
    """
    first = chunk.tensors[0]
    if first.device.type != "cpu":
        yield chunk.first, _apply_on_device(merge, chunk, dtype, on_non_finite)
        return
    sources = [*chunk.tensors, *([] if chunk.base is None else [chunk.base])]
    flat = [source.reshape(-1) for source in sources]  # [rows, ...] -> [n]: views, no copy
    out = torch.empty(first.numel(), dtype=dtype)  # [n]: the chunk's rows, flat
    total = out.numel()
    size = max(1, min(tuning.piece_elements, total))  # an empty chunk has no piece
    converted = [i for i, t in enumerate(flat) if t.dtype != torch.float32]
    joint = torch.empty(len(converted), size)  # [converted sources, piece]: one sum checks all
    buffers: list[torch.Tensor | None] = [None] * len(flat)
    for row, index in enumerate(converted):
        buffers[index] = joint[row]
    inputs = len(chunk.tensors)
    sums: list[torch.Tensor] = []
    part_start = 0
    for start in range(0, total, size):
        stop = min(total, start + size)
        floats = [
            part if buffer is None else buffer[: stop - start].copy_(part)
            for part, buffer in zip((t[start:stop] for t in flat), buffers, strict=True)
        ]
        if on_non_finite is not None:  # before the merge, which may reuse its inputs
            sums.append(quick_sum(joint[:, : stop - start]))
            sums += [quick_sum(f) for f, b in zip(floats, buffers, strict=True) if b is None]
        piece = Chunk(
            floats[:inputs],
            floats[inputs] if len(floats) > inputs else None,
            chunk.first + start,
            whole=False,
        )
        merged = out[start:stop]
        merged.copy_(merge.apply(piece))
        if on_non_finite is not None:
            sums.append(quick_sum(merged))
        if stop - part_start >= tuning.part_elements or stop == total:
            if on_non_finite is not None and not sums_finite(sums):
                on_non_finite(part_start, out[part_start:stop])
            sums.clear()
            yield chunk.first + part_start, out[part_start:stop]
            part_start = stop
    if total == 0:
        yield chunk.first, out


def _apply_on_device(
    merge: TensorMerge, chunk: Chunk, dtype: torch.dtype, on_non_finite: OnNonFinite | None
) -> torch.Tensor:
    """`apply_in_pieces` on a GPU: the whole chunk as one flat piece."""
    first = chunk.tensors[0]
    floats = chunk.rows(0, len(first) if first.dim() else 1, as_float=True)
    if on_non_finite is None:
        return merge.apply(floats).to(dtype).reshape(-1)
    sources = [*floats.tensors, *([] if floats.base is None else [floats.base])]
    sums = [quick_sum(t) for t in sources]  # before the merge, which may reuse its inputs
    out = merge.apply(floats).to(dtype).reshape(-1)
    if not sums_finite([*sums, quick_sum(out)]):
        on_non_finite(0, out)
    return out
