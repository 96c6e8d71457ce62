"""pipeline/provenance.py: the saved recipe pins every Hub model, in either recipe spelling."""

from __future__ import annotations

from pathlib import Path

import yaml

from hfmerge.pipeline.provenance import pinned_recipe
from hfmerge.recipe.schema import parse_recipe_text
from hfmerge.sources.refs import ModelSource

SHA_A, SHA_B, SHA_BASE = "a" * 40, "b" * 40, "c" * 40


def sources() -> list[ModelSource]:
    return [
        ModelSource(ref=ref, path=Path("/cache") / ref, hub_id=ref, revision=sha)
        for ref, sha in [("org/a", SHA_A), ("org/b", SHA_B), ("org/base", SHA_BASE)]
    ]


def test_a_mergekit_base_model_outside_models_is_pinned() -> None:
    text = (
        "models:\n  - model: org/a\n    parameters: {weight: 1.0}\n"
        "  - model: org/b\n    parameters: {weight: 1.0}\n"
        "merge_method: task_arithmetic\nbase_model: org/base\n"
    )
    saved = yaml.safe_load(pinned_recipe(parse_recipe_text(text), text, sources()))
    assert saved["base_model"] == f"org/base@{SHA_BASE}"
    assert "base" not in saved
    assert saved["models"][0]["revision"] == SHA_A


def test_an_hfmerge_base_outside_models_is_pinned() -> None:
    text = "models: [org/a, org/b]\nbase: org/base\nmerge: {method: task_arithmetic}\n"
    saved = yaml.safe_load(pinned_recipe(parse_recipe_text(text), text, sources()))
    assert saved["base"] == f"org/base@{SHA_BASE}"
    assert saved["models"] == [f"org/a@{SHA_A}", f"org/b@{SHA_B}"]


def test_the_sources_of_slices_are_pinned_and_the_saved_recipe_parses() -> None:
    text = (
        "slices:\n"
        "  - sources: [{model: org/a, layer_range: [0, 2]}]\n"
        "  - sources: [{model: org/b, layer_range: [1, 3], scale: 0.5}]\n"
        "merge: {method: passthrough}\n"
    )
    saved_text = pinned_recipe(parse_recipe_text(text), text, sources())
    saved = yaml.safe_load(saved_text)
    assert "models" not in saved
    assert saved["slices"][0]["sources"][0] == {
        "model": "org/a",
        "revision": SHA_A,
        "layer_range": [0, 2],
    }
    assert saved["slices"][1]["sources"][0]["revision"] == SHA_B
    assert saved["slices"][1]["sources"][0]["scale"] == 0.5
    recipe = parse_recipe_text(saved_text)
    assert [m.ref for m in recipe.models] == [f"org/a@{SHA_A}", f"org/b@{SHA_B}"]
