"""hfmerge/runtime.py: process-wide torch settings."""

from __future__ import annotations

import time

import pytest
import torch

from hfmerge.runtime import capped_threads, fastest_seconds, fixed_threads, resolve_device


def test_fixed_threads_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_fixed_threads_restores_after_an_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), fixed_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_capped_threads_lowers_never_raises_and_restores() -> None:
    before = torch.get_num_threads()
    with capped_threads(before + 4):
        assert torch.get_num_threads() == before  # a cap above the count changes nothing
    with capped_threads(1):
        assert torch.get_num_threads() == 1
    with capped_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_resolve_device_takes_the_asked_device_else_cuda_or_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


def test_fastest_seconds_is_the_shortest_call() -> None:
    pauses = iter([0.05, 0.001, 0.03])
    shortest = fastest_seconds(lambda: time.sleep(next(pauses)), tries=3)
    assert 0.001 <= shortest < 0.03
    with pytest.raises(StopIteration):
        next(pauses)  # every try ran
