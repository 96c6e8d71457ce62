"""How much the merge engine holds at once: chunk size and read/write queues from a memory budget.

Per chunk element the engine holds the inputs as float32 (the chunk being merged), the method's
float32 temporaries and the output cast to its dtype; queued behind it are up to
`EngineTuning.read_ahead` chunks read ahead and `EngineTuning.write_behind` merged chunks waiting
to be written. With a budget, the chunk is sized so all of that fits in what the budget leaves
beside the process's current RSS.

Element-wise merges (linear, task arithmetic) have no chunk-sized temporaries: they convert and
merge a chunk in cache-sized pieces through a few fixed buffers (`apply_in_pieces` in
`engine/compute.py`). Their chunk size only sets how often the reader, main and writer threads
hand a chunk over, and each hand-over costs GIL traffic between the three, so their chunks are
four times larger (`ELEMENTWISE_CHUNK_ELEMENTS`): four times fewer hand-overs.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from dataclasses import dataclass

from hfmerge.engine.plan import MergePlan, TensorJob
from hfmerge.engine.tuning import EngineTuning
from hfmerge.errors import HfMergeError, OptionError
from hfmerge.tensors import element_size, format_size, parse_size

F32 = 4


def workspace_floats(loaded: int) -> int:
    """float32 temporaries per element while merging `loaded` inputs (TIES's: a delta and a
    pruned copy per model, sum, mixed, divisor, masks): the most any chunked method uses."""
    return 2 * loaded + 4


@dataclass(frozen=True)
class ChunkPolicy:
    """Chunk size (elements) and queue limits (bytes) the engine works with."""

    chunk_elements: int
    read_bytes: int  # inputs read and not yet merged, at most (one larger chunk may pass alone)
    write_bytes: int  # merged output not yet written, at most (idem)
    elementwise: bool = False  # sized for element-wise merges: no chunk-sized temporaries
    processes: int = 1  # merging processes, each holding a chunk and queues of these sizes

    def rows_per_chunk(self, job: TensorJob, *, whole: bool, elementwise: bool = False) -> int:
        """Rows (along dim 0) per chunk of `job`: all of them for whole-tensor methods.

        `elementwise` says whether the tensor's merge is element-wise; a policy sized for
        element-wise merges has no room for a merge with chunk-sized temporaries.
        """
        if self.elementwise and not elementwise:
            raise AssertionError(
                f"{job.name}: a merge with chunk-sized temporaries under a policy sized for "
                "element-wise merges (a method's tensors must all be one kind)"
            )
        rows = job.shape[0] if job.shape else 1
        if whole or rows == 0:
            return max(rows, 1)
        return max(1, min(rows, self.chunk_elements // max(1, _row_elements(job))))


def parse_memory_budget(size: str | int | None) -> int | None:
    """Bytes in a `--max-memory` value such as "1GB" or "800MiB"; None stays None.

    Raises:
        OptionError: the value is not a size.
    """
    if size is None:
        return None
    try:
        return parse_size(size)
    except ValueError as exc:
        raise OptionError(
            "--max-memory",
            str(size),
            "is not a memory budget",
            why=str(exc),
            fix="give a size such as 1GB or 800MiB",
        ) from None


def chunk_policy(
    plan: MergePlan,
    max_memory_bytes: int | None,
    *,
    tuning: EngineTuning,
    elementwise: bool = False,
    processes: int = 1,
) -> ChunkPolicy:
    """The policy for `plan`; with a budget, checked against every tensor's smallest chunk.

    `tuning`: target chunk sizes, queue depths and the bytes reserved beside them.
    `elementwise`: every tensor of the plan merges element by element, so chunks need no
    float32 temporaries and may be larger. `processes`: merging processes wanted. Each holds
    what one process would (its own copy of the process's current RSS counted too), so the
    budget is shared between them; where the shares leave too little for a chunk, one process.

    Raises:
        HfMergeError: the budget leaves too little for one chunk of some tensor (a row, or a
            whole tensor for methods without a chunked form).
    """
    if processes > 1:
        with contextlib.suppress(HfMergeError):
            return _policy(plan, max_memory_bytes, tuning, elementwise, processes)
    return _policy(plan, max_memory_bytes, tuning, elementwise, 1)


def _policy(
    plan: MergePlan,
    max_memory_bytes: int | None,
    tuning: EngineTuning,
    elementwise: bool,
    processes: int,
) -> ChunkPolicy:
    per_element = _bytes_per_element(plan, tuning, elementwise=elementwise)
    target = tuning.elementwise_chunk_elements if elementwise else tuning.target_chunk_elements
    if max_memory_bytes is None:
        chunk = target
    else:
        share = max_memory_bytes // processes  # each process's part of the budget
        available = share - current_rss() - tuning.reserve_bytes
        chunk = min(target, max(0, available) // per_element)
        _check_fits(plan, chunk, share, available, per_element)
    loaded = _loaded(plan)
    return ChunkPolicy(
        chunk_elements=max(1, chunk),
        read_bytes=tuning.read_ahead * max(1, chunk) * loaded * F32,
        write_bytes=tuning.write_behind * max(1, chunk) * _out_size(plan),
        elementwise=elementwise,
        processes=processes,
    )


def _bytes_per_element(plan: MergePlan, tuning: EngineTuning, *, elementwise: bool = False) -> int:
    loaded = _loaded(plan)
    # Inputs counted as float32 even where element-wise merges hold them in their storage dtype.
    temporaries = 0 if elementwise else workspace_floats(loaded) * F32
    chunk = loaded * F32 + temporaries + _out_size(plan)
    queued = tuning.read_ahead * loaded * F32 + tuning.write_behind * _out_size(plan)
    return chunk + queued


def _check_fits(plan: MergePlan, chunk: int, budget: int, available: int, per_element: int) -> None:
    whole = plan.method.stream is None
    for job in plan.jobs:
        need = math.prod(job.shape) if whole and job.action == "merge" else _row_elements(job)
        if need > chunk:
            wanted = budget - available + need * per_element
            unit = "tensor" if whole else "row of tensor"
            raise OptionError(
                "--max-memory",
                format_size(budget),
                "is below what one chunk needs",
                why=f"merging one {unit} {job.name} ({need:,} elements) takes about "
                f"{format_size(need * per_element)} beside the "
                f"{format_size(budget - available)} the process already uses"
                + (f"; {plan.method.name} merges whole tensors" if whole else ""),
                fix=f"raise --max-memory to at least {format_size(wanted)}, or leave it out",
            )


def _row_elements(job: TensorJob) -> int:
    return math.prod(job.shape[1:]) if job.shape else 1


def _loaded(plan: MergePlan) -> int:
    """Tensors read per output tensor, at most: the method's, and the base for task-vector
    methods."""
    return plan.most_reads


def _out_size(plan: MergePlan) -> int:
    return max((element_size(job.dtype) for job in plan.jobs), default=F32)


def current_rss() -> int:
    """This process's resident memory now, in bytes (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
