"""Keep glibc from returning and re-faulting the merge's chunk buffers on every chunk.

The engine allocates and frees the same few chunk-sized buffers thousands of times, from three
threads. By default glibc serves blocks of this size with fresh `mmap`s (or trims them off the
heap) and gives them back on `free`, so every chunk pays page faults in the kernel on top of the
memory-bound merge itself (benchmarks/NOTES.md). Raising the mmap and trim thresholds and sharing
one arena keeps the buffers in the heap, reused; peak memory is unchanged (the same buffers),
memory is simply not handed back between chunks. A no-op where glibc's `mallopt` is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value: chunks below it come from the heap
_TRIM_THRESHOLD = 512 << 20  # keep up to this much freed memory at the top of the heap


@functools.cache
def keep_chunk_buffers() -> bool:
    """Tune glibc's allocator once per process; whether it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        (_M_ARENA_MAX, 1),  # the reader thread's buffers are freed by the main thread
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
