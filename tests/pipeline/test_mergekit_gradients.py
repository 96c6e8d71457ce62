"""mergekit configs with gradients over the layers and tensor-name filters give mergekit's tensors.

Tiny local Llama models with five blocks (so a five-entry gradient is read between its entries),
in float32: a base and two fine-tunes of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hfmerge import api
from tests.support.mergekit import TOLERANCE, run_both
from tests.support.tiny_models import add_noise, make_tiny_model
from tests.support.weights import read_weights

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]

SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
# (models with their own parameters, global parameters), as model cards write them.
CONFIGS: dict[str, tuple[str, list[tuple[int, dict[str, Any]]], dict[str, Any]]] = {
    "slerp_filtered_gradients": ("slerp", [(0, {}), (1, {})], {"t": SLERP_T}),
    "ties_density_gradient": (
        "ties",
        [(1, {"weight": [0.2, 0.9], "density": [0.3, 0.8, 0.5]}), (2, {"weight": 0.4})],
        {"density": 0.7, "normalize": True},
    ),
    "linear_weights_by_filter": (
        "linear",
        [
            (0, {"weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]}),
            # No entry for the rest: the tensors outside `self_attn` take the global weight.
            (1, {"weight": [{"filter": "self_attn", "value": [0.9, 0.2]}]}),
            (2, {}),
        ],
        {"weight": 0.3},
    ),
    "task_arithmetic_lambda_gradient": (
        "task_arithmetic",
        [(1, {"weight": 0.6}), (2, {"weight": [1.0, 0.0, 0.5]})],
        {"lambda": [1.0, 0.5]},
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("deep")
    paths = []
    for seed in range(3):
        model = make_tiny_model("llama", seed=0, num_hidden_layers=5)
        path = root / f"m{seed}"
        add_noise(model, seed=seed, scale=0.02 * seed).save_pretrained(path)
        paths.append(path)
    return paths


def config_text(name: str, models: list[Path]) -> str:
    method, listed, parameters = CONFIGS[name]
    config = {
        "models": [
            {"model": str(models[index]), **({"parameters": params} if params else {})}
            for index, params in listed
        ],
        "merge_method": method,
        "base_model": str(models[0]),
        "parameters": parameters,
        "dtype": "float32",
    }
    return yaml.safe_dump(config, sort_keys=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_and_filters_give_mergekits_tensors(
    name: str, models: list[Path], tmp_path: Path
) -> None:
    _, ours, theirs = run_both(config_text(name, models), tmp_path)
    worst = max(float((ours[name] - theirs[name]).abs().max()) for name in ours)
    print(f"{name}: max |hfmerge - mergekit| = {worst:.3g}")  # shown with -s
    for tensor in ours:
        assert torch.allclose(ours[tensor], theirs[tensor], rtol=0, atol=TOLERANCE), tensor


def test_the_settings_took_effect_layer_by_layer(models: list[Path], tmp_path: Path) -> None:
    # slerp's t runs 0 -> 1 over the attention blocks: block 0 is the base, block 4 the other.
    config = tmp_path / "config.yml"
    config.write_text(config_text("slerp_filtered_gradients", models))
    api.run(config, api.RunOptions(out=tmp_path / "ours", force=True, progress=False))
    ours = read_weights(tmp_path / "ours")
    base, other = read_weights(models[0]), read_weights(models[1])
    first, last = "model.layers.0.self_attn.q_proj.weight", "model.layers.4.self_attn.q_proj.weight"
    assert torch.equal(ours[first], base[first])
    assert torch.allclose(ours[last], other[last], atol=1e-6)
    up = "model.layers.0.mlp.up_proj.weight"  # the mlp gradient runs the other way
    assert torch.allclose(ours[up], other[up], atol=1e-6)
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "self_attn" in card  # the card shows the setting as given
