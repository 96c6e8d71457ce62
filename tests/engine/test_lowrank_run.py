"""Low-rank task vectors and TSV-Merge through the engine: truncated matrices merge whole, beside
tensors that keep their chunked (even element-wise) form, with the method's whole-tensor output."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.methods import get_method
from hfmerge.methods.schedule import ParamSchedule
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from hfmerge.tensors import LazyCheckpoint
from tests.support.engine import make_models
from tests.support.weights import read_weights


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("lowrank"))


SEED = 11
# task_arithmetic merges element-wise unless `rank` makes a tensor whole: filtered to the MLP,
# the plan mixes both kinds (its first tensor, the embedding, stays element-wise).
CASES = [
    ("task_arithmetic", {"rank": [{"filter": "mlp", "value": 2}]}, {"weight": 0.5}),
    ("ties", {"energy": 0.8}, {"weight": 0.5, "density": 0.5}),
    ("dare_linear", {"rank": 3}, {"weight": 0.5, "density": 0.5}),
    ("tsv", {"lambda": 0.9}, {}),
]


@pytest.mark.parametrize(("method", "parameters", "fields"), CASES)
def test_engine_output_is_the_method_on_whole_tensors(
    models: list[Path],
    tmp_path: Path,
    method: str,
    parameters: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    out = tmp_path / "out"
    data = {
        "models": [{"model": str(m), **fields} for m in models[1:]],
        "base": str(models[0]),
        "merge": {"method": method, "parameters": parameters, "seed": SEED},
        "output": {"path": str(out), "dtype": "float32"},
    }
    run_recipe(parse_recipe(data), RunOptions(force=True, progress=False))
    merged = read_weights(out)
    merge_method = get_method(method)
    schedule = ParamSchedule(merge_method, parameters, (fields, fields))
    with (
        LazyCheckpoint(models[0]) as base,
        LazyCheckpoint(models[1]) as a,
        LazyCheckpoint(models[2]) as b,
    ):
        for name in base.names:
            typed = schedule.at(name, 0.0)  # no gradients here: depth does not matter
            expected = merge_method.merge(
                [a.get(name).float(), b.get(name).float()],
                base=base.get(name).float(),
                model_params=typed.models,
                params=typed.method,
                # The engine's per-tensor generator.
                generator=torch.Generator().manual_seed(SEED + zlib.crc32(name.encode())),
            )
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_low_rank_changes_the_truncated_matrices_only(models: list[Path], tmp_path: Path) -> None:
    runs = {}
    for label, parameters in (("full", {}), ("low", {"rank": [{"filter": "mlp", "value": 1}]})):
        data = {
            "models": [{"model": str(m), "weight": 0.5} for m in models[1:]],
            "base": str(models[0]),
            "merge": {"method": "task_arithmetic", "parameters": parameters},
            "output": {"path": str(tmp_path / label), "dtype": "float32"},
        }
        run_recipe(parse_recipe(data), RunOptions(force=True, progress=False))
        runs[label] = read_weights(tmp_path / label)
    for name, full in runs["full"].items():
        changed = not torch.equal(runs["low"][name], full)
        assert changed == ("mlp" in name and full.dim() == 2), name
