"""Test isolation: no network, no real caches, deterministic torch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehub import fake_hub  # noqa: F401  (fixture: a Hub-compatible server on 127.0.0.1)

from hfmerge.zoo.train import fixed_threads

# Set before any test module imports huggingface_hub / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run the test inside its tmp directory (relative output paths land there)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
