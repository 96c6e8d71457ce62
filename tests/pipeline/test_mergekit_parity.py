"""A mergekit config run by `hfmerge run` and by mergekit itself gives the same tensors.

On tiny local Llama models in float32: a base and two fine-tunes of it (tests/support/engine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hfmerge import api
from tests.support.engine import make_models
from tests.support.mergekit import TOLERANCE, run_both
from tests.support.weights import read_weights

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]

# Per method: (index into the models, its parameters) for each listed model (0 is the base),
# and the global parameters, as model cards write them (with mergekit-only switches).
LISTED: dict[str, list[tuple[int, dict[str, float]]]] = {
    "linear": [(0, {"weight": 0.2}), (1, {"weight": 0.5}), (2, {"weight": 0.3})],
    "task_arithmetic": [(1, {"weight": 0.6, "density": 0.5}), (2, {"weight": 0.7})],
    "ties": [(0, {}), (1, {"weight": 0.6, "density": 0.5}), (2, {"weight": 0.4})],
    "breadcrumbs_ties": [(1, {"weight": 0.6, "gamma": 0.05}), (2, {"weight": 0.4})],
    "slerp": [(0, {}), (1, {})],
    "model_stock": [(1, {}), (2, {})],
    "multislerp": [(0, {}), (1, {"weight": 0.7}), (2, {"weight": 0.4})],
    "karcher": [(0, {}), (1, {}), (2, {})],
    "sce": [(0, {}), (1, {}), (2, {})],
    "arcee_fusion": [(0, {}), (1, {})],
}
PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"lambda": 0.9, "normalize": False},
    "ties": {"density": 0.7, "int8_mask": True, "normalize": True},
    "breadcrumbs_ties": {"density": 0.6, "normalize": True},
    "slerp": {"t": 0.3},
    "model_stock": {},
    "multislerp": {"normalize_weights": False},
    "karcher": {"max_iter": 20, "tol": 1e-6},
    "sce": {"select_topk": 0.5, "int8_mask": True},
    "arcee_fusion": {},
}
# mergekit configs without `base_model`: (method, models listed as in LISTED).
WITHOUT_BASE: dict[str, list[tuple[int, dict[str, float]]]] = {
    "multislerp": [(1, {"weight": 0.7}), (2, {"weight": 0.4})],
    "linear": [(1, {"weight": 0.7}), (2, {"weight": 0.4})],
}


def config_text(method: str, models: list[Path], *, base: bool = True) -> str:
    """A mergekit config of `method` as a model card would carry it; models[0] is the base,
    named as `base_model` unless `base` is false."""
    parameters = PARAMETERS[method]
    config = {
        "models": [
            {"model": str(models[index]), **({"parameters": params} if params else {})}
            for index, params in (LISTED if base else WITHOUT_BASE)[method]
        ],
        "merge_method": method,
        **({"base_model": str(models[0])} if base else {}),
        **({"parameters": parameters} if parameters else {}),
        "dtype": "float32",
    }
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize(
    ("method", "base"),
    [*((method, True) for method in LISTED), *((method, False) for method in WITHOUT_BASE)],
    ids=lambda value: {True: "base", False: "no-base"}.get(value, value),
)
def test_hfmerge_runs_a_mergekit_config_to_mergekits_tensors(
    method: str, base: bool, models: list[Path], tmp_path: Path
) -> None:
    result, ours, theirs = run_both(config_text(method, models, base=base), tmp_path)
    assert all(ours[name].dtype == torch.float32 for name in ours)
    inputs = [read_weights(m) for m in models]
    worst = max(float((ours[name] - theirs[name]).abs().max()) for name in ours)
    print(f"{method}: max |hfmerge - mergekit| = {worst:.3g}")  # shown with -s
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=TOLERANCE), name
        # Not a copy of an input: the parameters took effect.
        assert not any(torch.equal(ours[name], model[name]) for model in inputs[1:]), name
    assert result.out_dir is not None
    saved = yaml.safe_load((result.out_dir / "hfmerge_recipe.yaml").read_text())
    assert saved["merge_method"] == method  # the card records the config as given
    card = (result.out_dir / "README.md").read_text()
    converted = card.split("## As an hfmerge recipe", 1)[1].split("```yaml\n", 1)[1]
    as_recipe = yaml.safe_load(converted.split("```", 1)[0])  # and as converted
    assert as_recipe["merge"]["method"] == method


def test_validate_plans_a_mergekit_config(models: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(config_text("ties", models))
    summary = api.validate(config).summary()
    assert summary.startswith("ties over 2 models")
