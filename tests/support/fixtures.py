"""Fixtures every test can use, loaded through `pytest_plugins` in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hfmerge.runtime import fixed_threads


@pytest.fixture(autouse=True)
def _isolated_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own HF cache and token-free environment."""
    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; two spin at barriers on a shared 2-core box."""
    with fixed_threads(1):
        yield


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside its tmp directory (relative output paths land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
