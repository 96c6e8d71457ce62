"""hfmerge/runtime.py: process-wide torch settings."""

from __future__ import annotations

import pytest
import torch

from hfmerge.runtime import fixed_threads


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
