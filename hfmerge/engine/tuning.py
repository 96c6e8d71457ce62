"""The merge engine's tuning knobs in one object, handed from the pipeline down to each part of
the engine that sizes something: chunks and queues (`engine/budget.py`), row splits and element-wise
pieces (`engine/compute.py`), merging processes (`engine/procs.py`) and torch's threads
(`engine/stream.py`).

The defaults were measured on a 2-core VM; a test or a benchmark passes its own values with
`dataclasses.replace(EngineTuning(), ...)`, never by changing a module's globals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineTuning:
    """Chunk, queue, piece, thread and process sizes of the merge engine."""

    # Elements per chunk of merges with float32 temporaries: 4 MiB each, a core's cache share.
    target_chunk_elements: int = 1 << 20
    # Element-wise merges have no chunk-sized temporaries: fewer, larger thread hand-overs.
    elementwise_chunk_elements: int = 1 << 22
    # Chunks read while one is merged: hides read latency, pread runs beside the math.
    read_ahead: int = 2
    # Merged chunks queued for the writer thread, so a slow write does not stall the math.
    write_behind: int = 2
    # Bytes kept out of a memory budget: allocator slack, histograms, small tensors.
    reserve_bytes: int = 64 << 20
    # Helper threads beside the main one: whole op chains in parallel (TIES 1.5x on 2 cores).
    split_workers: int = 1
    # Chunks with fewer elements are merged on one thread: not worth a hand-off.
    split_min_elements: int = 1 << 16
    # An element-wise merge's piece: 256 KiB per float32 temporary, so they stay in cache.
    piece_elements: int = 1 << 16
    # An element-wise merge's output part: 2 MiB in bf16, still in a core's L2 for the writer.
    part_elements: int = 1 << 20
    # Merging processes for element-wise merges: measured on 2 cores; more are untried.
    max_processes: int = 2
    # torch intra-op threads while merging: the I/O threads take the other core's share.
    compute_threads: int = 1


# The measured defaults, as a module-level instance so signatures can default to it.
DEFAULT_TUNING = EngineTuning()
