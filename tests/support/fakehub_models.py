"""Seeding the fake Hub with tiny transformers models, and recipes that name them by Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from tests.support.fakehub import FakeHub
from tests.support.tiny_models import make_tiny_model
from tests.support.weights import read_weights


def seed_llama(
    hub: FakeHub,
    tmp: Path,
    repo_id: str,
    *,
    seed: int,
    license: str | None = "apache-2.0",
    private: bool = False,
    gated: bool = False,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> str:
    """Save a tiny Llama (seeded) and publish it as `repo_id`; the commit sha of main."""
    folder = tmp / "_seed" / repo_id.replace("/", "--")
    model = make_tiny_model("llama", seed=seed, **overrides)
    if max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    return hub.add_model(repo_id, folder, private=private, gated=gated, license=license)


def replace_weights(hub: FakeHub, tmp: Path, repo_id: str, *, seed: int) -> str:
    """A new commit on main with other weights (the repo "moves on"); its sha."""
    folder = tmp / "_seed_moved" / repo_id.replace("/", "--")
    make_tiny_model("llama", seed=seed).save_pretrained(folder)
    return hub.commit_files(
        repo_id, {"model.safetensors": (folder / "model.safetensors").read_bytes()}
    )


def write_recipe(
    path: Path,
    models: list[Any],
    *,
    method: str = "linear",
    out: str = "merged",
    base: str | None = None,
    **output: Any,
) -> Path:
    """A recipe file merging `models` into `out` (more `output:` keys as keywords)."""
    data: dict[str, Any] = {
        "models": models,
        "merge": {"method": method},
        "output": {"path": out, **output},
    }
    if base:
        data["base"] = base
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_weights(a), read_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def cached_weight_files(cache: Path) -> list[Path]:
    """Safetensors files in an HF cache (blobs are named by hash, so look at snapshots)."""
    return sorted(cache.glob("models--*/snapshots/*/*.safetensors"))
