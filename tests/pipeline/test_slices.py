"""`slices:` recipes: frankenmerges, depth up-scaling and per-slice merges, against mergekit.

Tiny local Llama models with five blocks, in float32: a base and two fine-tunes of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hfmerge import api
from hfmerge.errors import HfMergeError, RecipeError
from tests.pipeline.test_mergekit_gradients import models  # noqa: F401 (fixture)
from tests.support.mergekit import TOLERANCE, run_both
from tests.support.weights import read_weights


def _src(model: Path, start: int, stop: int, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(model), "layer_range": [start, stop]}
    return entry | ({"parameters": params} if params else {})


def configs(m: list[Path]) -> dict[str, dict[str, Any]]:
    """mergekit configs as model cards write them."""
    return {
        # A frankenmerge: blocks of two models interleaved into a deeper model.
        "frankenmerge": {
            "slices": [
                {"sources": [_src(m[1], 0, 3)]},
                {"sources": [_src(m[2], 1, 4)]},
                {"sources": [_src(m[1], 3, 5)]},
            ],
            "merge_method": "passthrough",
            "dtype": "float32",
        },
        # Depth up-scaling: one model's overlapping ranges, the copies' attention output scaled.
        "depth_upscaling": {
            "slices": [
                {"sources": [_src(m[0], 0, 4)]},
                {
                    "sources": [
                        _src(
                            m[0],
                            1,
                            5,
                            scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}],
                        )
                    ]
                },
            ],
            "merge_method": "passthrough",
            "dtype": "float32",
        },
        # A merge per slice: slerp with a gradient over each slice's blocks.
        "slerp_per_slice": {
            "slices": [
                {
                    "sources": [_src(m[0], 0, 3), _src(m[1], 0, 3)],
                    "parameters": {"t": [0.0, 1.0]},
                },
                {
                    "sources": [_src(m[0], 3, 5), _src(m[2], 3, 5)],
                    "base_model": str(m[0]),
                    "parameters": {"t": [{"filter": "mlp", "value": 0.8}]},
                },
            ],
            "merge_method": "slerp",
            "base_model": str(m[0]),
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
        # An optional base: multislerp of the task vectors over base_model in each slice.
        "multislerp_per_slice": {
            "slices": [
                {"sources": [_src(m[0], 0, 3), _src(m[1], 0, 3, weight=0.7), _src(m[2], 0, 3)]},
                {"sources": [_src(m[0], 3, 5), _src(m[1], 3, 5), _src(m[2], 3, 5, weight=2.0)]},
            ],
            "merge_method": "multislerp",
            "base_model": str(m[0]),
            "parameters": {"weight": 0.4},
            "dtype": "float32",
        },
    }


@pytest.mark.mergekit
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["frankenmerge", "depth_upscaling", "slerp_per_slice", "multislerp_per_slice"]
)
def test_slices_give_mergekits_tensors_and_a_loadable_model(
    name: str,
    models: list[Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, ours, theirs = run_both(yaml.safe_dump(configs(models)[name], sort_keys=False), tmp_path)
    for tensor in ours:
        assert torch.allclose(ours[tensor], theirs[tensor], rtol=0, atol=TOLERANCE), tensor
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_a_frankenmerge_stacks_the_blocks_it_names(
    models: list[Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "slices": [
                    {"sources": [{"model": str(models[1]), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(models[2]), "layer_range": [4, 5], "scale": 2.0}]},
                ],
                "merge": {"method": "passthrough"},
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    api.run(recipe, api.RunOptions(force=True, progress=False))
    out, one, two = (read_weights(p) for p in (tmp_path / "out", models[1], models[2]))
    assert len([n for n in out if n.endswith("mlp.up_proj.weight")]) == 3
    up = "mlp.up_proj.weight"
    assert torch.equal(out[f"model.layers.1.{up}"], one[f"model.layers.1.{up}"])
    assert torch.equal(out[f"model.layers.2.{up}"], 2.0 * two[f"model.layers.4.{up}"])
    # Embeddings from the first slice's model, the final norm and head from the last one's,
    # with that slice's settings (as mergekit takes them).
    assert torch.equal(out["model.embed_tokens.weight"], one["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], 2.0 * two["model.norm.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3


def test_a_range_past_the_last_block_is_refused_before_anything_is_written(
    models: list[Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "slices": [{"sources": [{"model": str(models[1]), "layer_range": [3, 9]}]}],
                "merge": {"method": "passthrough"},
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    with pytest.raises(RecipeError) as caught:
        api.run(recipe, api.RunOptions(progress=False))
    assert "goes past" in str(caught.value)
    assert "at most 5" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_slice_problems_are_reported_at_their_lines() -> None:
    from hfmerge.recipe.schema import parse_recipe_text

    text = """\
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 3]}
  - sources:
      - {model: a, layer_range: [5, 5], t: 2}
    base: c
merge: {method: slerp, parameters: {t: 0.5}}
align: {method: weight}
"""
    with pytest.raises(HfMergeError) as caught:
        parse_recipe_text(text)
    assert isinstance(caught.value, RecipeError)
    found = {p.location: p.line for p in caught.value.problems}
    assert found == {
        "align": 9,
        "slices.0.base": 2,  # a missing key is shown at its slice
        "slices.0.sources": 2,
        "slices.1.sources.0.layer_range": 6,
        "slices.1.base": 7,
    }


def test_an_optional_base_in_slices_is_the_recipes_base() -> None:
    from hfmerge.recipe.schema import parse_recipe_text

    text = """\
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2]}
    base: a
merge: {method: multislerp}
"""
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    [problem] = caught.value.problems
    assert (problem.location, problem.line) == ("slices.0.base", 5)
    assert "top-level `base:`" in problem.message
    # At the top, the base is every slice's base, and must be among each slice's sources.
    top = text.replace("    base: a\n", "").replace("merge:", "base: c\nmerge:")
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(top)
    assert [p.location for p in caught.value.problems] == ["slices.0.base"]
    parse_recipe_text(top.replace("base: c", "base: a"))


def test_a_slice_source_may_name_an_adapter_in_either_spelling() -> None:
    from hfmerge.recipe.schema import parse_recipe_text

    text = """\
slices:
  - sources: [{model: a, lora: ad, layer_range: [0, 2]}]
  - sources: [{model: a+ad, layer_range: [2, 4], scale: 0.5}]
merge: {method: passthrough}
"""
    recipe = parse_recipe_text(text)
    assert recipe.slices is not None
    assert [s.lora for one in recipe.slices for s in one.sources] == ["ad", "ad"]
    assert [s.method_params for one in recipe.slices for s in one.sources] == [{}, {"scale": 0.5}]
    assert [m.ref for m in recipe.models] == ["a+ad"]
