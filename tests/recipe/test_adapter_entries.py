"""A model with a LoRA adapter in a recipe: `BASE+ADAPTER` (mergekit's spelling, in a recipe or
a mergekit config) and `{model: BASE, lora: ADAPTER}` are one entry; the steps that run whole
models apply them, and routing serves them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hfmerge.errors import RecipeError
from hfmerge.pipeline.run import _split_base
from hfmerge.recipe.schema import ModelEntry, parse_recipe, parse_recipe_text


def recipe(models: list[Any], **extra: Any) -> dict[str, Any]:
    return {"models": models, "merge": {"method": "linear"}, **extra}


def test_both_spellings_are_one_entry() -> None:
    plus = parse_recipe(recipe(["org/base@v1+org/adapter@v2", "org/base"]))
    mapping = parse_recipe(
        recipe([{"model": "org/base@v1", "lora": "org/adapter@v2"}, {"model": "org/base"}])
    )
    assert plus.models == mapping.models
    adapted = plus.models[0]
    assert (adapted.model, adapted.lora, adapted.ref) == (
        "org/base@v1",
        "org/adapter@v2",
        "org/base@v1+org/adapter@v2",
    )
    assert adapted.method_params == {}  # `lora` is not a method parameter


def test_a_revision_pins_the_base_and_the_adapter_pins_itself() -> None:
    entry = ModelEntry.model_validate({"model": "org/base", "revision": "abc", "lora": "o/a@v3"})
    assert entry.ref == "org/base@abc+o/a@v3"
    assert entry.spellings == ("org/base+o/a@v3", "org/base@abc+o/a@v3")


def test_an_adapter_named_twice_is_refused() -> None:
    with pytest.raises(RecipeError, match="give it once"):
        parse_recipe(recipe([{"model": "a+b", "lora": "c"}, "a"]))


def test_a_local_path_with_a_plus_is_a_path(tmp_path: Path) -> None:
    folder = tmp_path / "c++model"
    folder.mkdir()
    entry = ModelEntry.model_validate({"model": str(folder)})
    assert (entry.model, entry.lora) == (str(folder), None)


def test_the_base_and_its_adapted_self_are_different_models() -> None:
    parsed = parse_recipe(
        {
            "models": [{"model": "org/base+org/adapter", "weight": 1.0}, "org/base"],
            "base": "org/base",
            "merge": {"method": "task_arithmetic"},
        }
    )
    base, inputs = _split_base(parsed, needs_base=True)
    assert (base.model, base.lora) == ("org/base", None)
    assert [e.ref for e in inputs] == ["org/base+org/adapter"]
    adapted_base = parse_recipe({**parsed.model_dump(), "base": "org/base+org/adapter"})
    assert adapted_base.base_entry().lora == "org/adapter"


def test_a_mergekit_lora_reference_becomes_the_same_entry() -> None:
    text = """\
merge_method: linear
models:
  - model: org/base+org/adapter
    parameters: {weight: 0.5}
  - model: org/other
    parameters: {weight: 0.5}
"""
    parsed = parse_recipe_text(text)
    assert parsed.models[0] == ModelEntry.model_validate(
        {"model": "org/base", "lora": "org/adapter", "weight": 0.5}
    )


@pytest.mark.parametrize(
    "extra",
    [{"align": {"method": "weight"}}, {"check": {"cka_min": 0.5}}, {"align": {"repair": True}}],
)
def test_steps_that_run_whole_models_take_adapters(extra: dict[str, Any]) -> None:
    """They load each model with its adapter applied (tests/lora/test_whole_models.py)."""
    parsed = parse_recipe(recipe([{"model": "a", "lora": "b"}, "c"], **extra))
    assert parsed.models[0].ref == "a+b"


def test_routing_takes_adapters_as_experts() -> None:
    data = {"models": ["a+b", "a+c"], "route": {"experts": [{"data": "x"}, {"data": "y"}]}}
    assert [entry.lora for entry in parse_recipe(data).models] == ["b", "c"]
