"""The `tokenizer:` section: both spellings, and its problems at their lines."""

from __future__ import annotations

import pytest

from hfmerge.errors import RecipeError
from hfmerge.recipe.schema import TokenSource, parse_recipe_text


def test_mergekit_tokenizer_source_and_section_become_the_recipes_tokenizer() -> None:
    union = "models: [{model: a}, {model: b}]\nmerge_method: linear\ntokenizer_source: union\n"
    recipe = parse_recipe_text(union)
    assert recipe.tokenizer is not None
    assert recipe.tokenizer.source == "union"
    section = (
        "models: [{model: a}, {model: b}]\nmerge_method: linear\n"
        "tokenizer:\n  tokens:\n    '<pad>': {source: {kind: zero}, force: true}\n"
        "  pad_to_multiple_of: 64\n"
    )
    recipe = parse_recipe_text(section)
    assert recipe.tokenizer is not None
    assert recipe.tokenizer.source == "union"  # mergekit's default for the section
    assert recipe.tokenizer.pad_to_multiple_of == 64
    assert recipe.tokenizer.tokens["<pad>"].source == TokenSource(kind="zero")
    assert recipe.tokenizer.tokens["<pad>"].force


def test_tokenizer_problems_are_reported_at_their_lines() -> None:
    text = """\
models: [a, b]
merge: {method: linear}
tokenizer:
  source: c
  tokens:
    x: {source: d}
    y: {source: {kind: model_token, model: a}}
    z: {source: {kind: zero, model: a}}
  pad_to_multiple_of: 0
"""
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    found = {p.location: (p.line, p.message) for p in caught.value.problems}
    assert found["tokenizer.source"][0] == 4
    assert (
        "'c' is not `union`, `base` or one of the recipe's models" in found["tokenizer.source"][1]
    )
    assert found["tokenizer.tokens.x.source"][0] == 6
    assert "exactly one of `token:` or `token_id:`" in found["tokenizer.tokens.y.source"][1]
    assert "takes no model" in found["tokenizer.tokens.z.source"][1]
    assert found["tokenizer.pad_to_multiple_of"][0] == 9
