"""Process-wide torch settings: the intra-op thread count, the device work runs on, and how fast
this machine runs a piece of work (the estimates said before long work starts)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """Run with `count` intra-op threads (float sums depend on the split), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def capped_threads(count: int | None) -> Iterator[None]:
    """Run with at most `count` intra-op threads (None: as they are), then restore the count."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(min(count, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when it is available and none was asked for, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fastest_seconds(run: Callable[[], object], *, tries: int = 4) -> float:
    """The shortest wall time of `tries` calls of `run`: the first warms up the BLAS threads, and
    the shortest is the least disturbed by whatever else the machine runs."""
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)
