"""glibc's allocator, tuned per job: merges keep their chunk buffers, probes give layers back.

Merging: keep glibc from returning and re-faulting the merge's chunk buffers on every chunk.

The engine allocates and frees the same few chunk-sized buffers thousands of times, from three
threads. By default glibc serves blocks of this size with fresh `mmap`s (or trims them off the
heap) and gives them back on `free`, so every chunk pays page faults in the kernel on top of the
memory-bound merge itself (benchmarks/NOTES.md). Raising the mmap and trim thresholds and sharing
one arena keeps the buffers in the heap, reused; peak memory is unchanged (the same buffers),
memory is simply not handed back between chunks.

Probing (`hfmerge cka` within a budget): the opposite. A model with layers offloaded to disk
materialises each layer's float32 weights as it runs and frees them after. glibc raises its mmap
threshold as large blocks are freed, so the next layers' blocks come from the heap, and freed heap
memory stays with the process: a 1.1B model offloaded to disk grew from 0.6 to 2.3 GB resident over
one forward pass. A fixed threshold of 1 MiB keeps every layer-sized block an mmap of its own,
returned when freed, and `malloc_trim` hands back what the heap holds between the two models.

Each is a no-op where glibc is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value: chunks below it come from the heap
_TRIM_THRESHOLD = 512 << 20  # keep up to this much freed memory at the top of the heap


_RETURNED_BLOCKS = 1 << 20  # blocks from 1 MiB up are mmaps of their own, unmapped when freed


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc `mallopt` settings in order; whether every one took."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in settings)


@functools.cache
def keep_chunk_buffers() -> bool:
    """Tune glibc's allocator once per process; whether it took effect."""
    return _mallopt(
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        (_M_ARENA_MAX, 1),  # the reader thread's buffers are freed by the main thread
    )


def return_freed_blocks() -> bool:
    """Give freed layer-sized blocks back to the system at once (probing); whether it took."""
    return _mallopt((_M_MMAP_THRESHOLD, _RETURNED_BLOCKS))


def trim_heap() -> None:
    """Free what is unreachable (`gc.collect`), then hand the heap's freed memory back to the
    system (`malloc_trim(0)`)."""
    gc.collect()  # a model's layers sit in reference cycles: freed only by the collector
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
