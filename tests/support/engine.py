"""Shared by the engine tests: a tiny Llama base with two fine-tunes, and a merge of them run
through the pipeline, read back as tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.support.tiny_models import add_noise, make_tiny_model
from tests.support.weights import read_weights


def make_models(root: Path) -> list[Path]:
    """A tiny Llama base and two fine-tunes of it, saved under `root`."""
    paths = []
    for seed in range(3):
        model = add_noise(make_tiny_model("llama", seed=0), seed=seed, scale=0.02 * seed)
        path = root / f"m{seed}"
        model.save_pretrained(path, safe_serialization=True)
        paths.append(path)
    return paths


# Methods that take one model besides the base, and global parameters a method requires. The
# fine-tunes differ from the base by about 0.02: NearSwap's t = 0.01 blends most entries.
ONE_OTHER = {"nearswap"}
GLOBAL_PARAMS: dict[str, dict[str, Any]] = {"nearswap": {"t": 0.01}}


def merge(models: list[Path], out: Path, method: str, **run: Any) -> dict[str, torch.Tensor]:
    """Run `method` over models 1 and 2 with model 0 as base; the output's tensors. `run` holds
    further `RunOptions` fields."""
    per_model = {
        "linear": {"weight": 0.5},
        "task_arithmetic": {"weight": 0.5},
        "model_stock": {},
        "nearswap": {},
        "nuslerp": {"weight": 0.3},
    }
    fields = per_model.get(method, {"weight": 0.5, "density": 0.5})
    listed = models[:2] if method in ONE_OTHER else models[1:]  # the base listed as in slerp
    entries = [{"model": str(m), **fields} for m in listed]
    data = {
        "models": entries,
        "base": str(models[0]),
        "merge": {"method": method, "parameters": GLOBAL_PARAMS.get(method, {})},
        "output": {"path": str(out), "dtype": "bfloat16", "max_shard_size": "60KB"},
    }
    run_recipe(parse_recipe(data), RunOptions(force=True, progress=False, **run))
    return read_weights(out)
