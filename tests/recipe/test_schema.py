"""Recipe validation: every problem at once, located in the YAML file, nothing read or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.errors import RecipeError
from hfmerge.recipe.align_methods import ALIGN_METHODS
from hfmerge.recipe.schema import load_recipe, parse_recipe_text

GOOD = """\
models:
  - a/model
  - model: b/model
    weight: 0.5
    density: 0.4
base: a/model
merge:
  method: ties
  parameters: {normalize: true}
output:
  path: out/x
  dtype: bfloat16
  max_shard_size: 500MB
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe_text(text, source="r.yaml")
    return [p.describe() for p in info.value.problems]


def test_good_recipe_parses_with_per_model_parameters() -> None:
    recipe = parse_recipe_text(GOOD)
    assert [m.model for m in recipe.models] == ["a/model", "b/model"]
    assert recipe.models[1].method_params == {"weight": 0.5, "density": 0.4}
    assert recipe.models[0].method_params == {}
    assert recipe.base_entry().model == "a/model"
    assert recipe.output.dtype == "bfloat16"
    assert recipe.align.method == "none"


def test_misspelt_key_and_method_are_reported_together_with_lines() -> None:
    text = GOOD.replace("output:", "outptu:").replace("method: ties", "method: tise")
    found = problems_of(text)
    assert len(found) == 2
    joined = "\n".join(found)
    assert "outptu (line 10, col 1): unknown key 'outptu' (did you mean 'output'?)" in joined
    assert "merge.method (line 8, col 3)" in joined
    assert "did you mean 'ties'?" in joined
    assert "valid methods:" in joined
    assert "linear" in joined


def test_unknown_per_model_parameter_is_located_at_the_model() -> None:
    found = problems_of(GOOD.replace("density: 0.4", "dentsity: 0.4"))
    assert len(found) == 1
    assert found[0].startswith("models.1.dentsity (line 5")


def test_unknown_global_parameter_and_bad_value_type() -> None:
    text = GOOD.replace("{normalize: true}", "{normalise: true}").replace(
        "weight: 0.5", "weight: x"
    )
    found = "\n".join(problems_of(text))
    assert "merge.parameters.normalise" in found
    assert "models.1.weight" in found


def test_merge_and_route_are_exclusive() -> None:
    both = GOOD + "route:\n  method: centroid\n"
    assert any("exactly one of `merge:`" in p for p in problems_of(both))
    neither = GOOD.split("merge:")[0] + "output:\n  path: x\n"
    assert any("has neither" in p for p in problems_of(neither))


def test_task_method_without_base_is_refused() -> None:
    found = problems_of(GOOD.replace("base: a/model\n", ""))
    assert any(p.startswith("base:") and "builds on a base model" in p for p in found)


MULTISLERP = """\
models:
  - a/model
  - model: b/model
    weight: 0.5
  - model: c/model
    weight: -0.5
merge:
  method: multislerp
"""


def test_an_optional_base_is_taken_apart_from_the_models_only_when_named() -> None:
    # Without `base:` all three models are merged (a's default weight 1 keeps the sum off 0).
    assert parse_recipe_text(MULTISLERP).base is None
    # With it, a is the base: b's and c's weights cancel, reported where they are written.
    found = problems_of(MULTISLERP + "base: a/model\n")
    assert len(found) == 1
    assert found[0].startswith("models")
    assert "sum to 0" in found[0]


def test_bad_shard_size_dtype_and_model_count() -> None:
    text = (
        GOOD.replace("500MB", "lots")
        .replace("dtype: bfloat16", "dtype: int8")
        .replace("  - model: b/model\n    weight: 0.5\n    density: 0.4\n", "", 1)
    )
    found = "\n".join(problems_of(text))
    assert "output.max_shard_size" in found
    assert "output.dtype" in found
    assert "models" in found
    assert "at least 1 other model; got 0" in found  # only the base is listed


def test_route_experts_must_match_models() -> None:
    text = GOOD.split("merge:")[0] + "route:\n  experts: [{data: a.txt}]\n"
    assert any("1 experts for 2 models" in p for p in problems_of(text))


def test_route_needs_experts_a_valid_default_and_no_alignment() -> None:
    head = GOOD.split("merge:")[0].replace("    weight: 0.5\n    density: 0.4\n", "")
    assert any("no `experts:`" in p for p in problems_of(head + "route:\n  method: centroid\n"))
    text = head + (
        "align: {method: weight}\nroute:\n  experts: [{data: a}, {data: b}]\n"
        "  default_expert: 2\n  temperature: 0\n"
    )
    found = "\n".join(problems_of(text))
    assert "default_expert 2 is not a model index" in found
    assert "alignment has no effect on routing" in found
    assert "route.temperature" in found
    ok = head + "route:\n  experts: [{data: a}, {data: b}]\n  default_expert: 1\n"
    recipe = parse_recipe_text(ok)
    assert recipe.route is not None
    assert recipe.route.default_expert == 1


@pytest.mark.parametrize("method", ALIGN_METHODS)
def test_align_accepts_every_alignment_method(method: str) -> None:
    assert parse_recipe_text(GOOD + f"align: {{method: {method}}}\n").align.method == method


def test_align_refuses_a_method_outside_the_alignment_methods() -> None:
    (problem,) = problems_of(GOOD + "align: {method: weights}\n")
    assert problem.startswith("align.method")
    assert "weight" in problem


def test_not_a_mapping_and_bad_yaml() -> None:
    assert "a recipe must be a YAML mapping" in problems_of("- a\n- b\n")[0]
    assert "not valid YAML" in problems_of("models: [a, b\n")[0]


def test_load_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read the file"):
        load_recipe(tmp_path / "nope.yaml")
