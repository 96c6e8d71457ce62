"""Process-wide torch settings: the intra-op thread count, and the device work runs on."""

from __future__ import annotations

from collections.abc import Iterator
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
