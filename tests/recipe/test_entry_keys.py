"""The checks' lists of an entry's own keys stay the schema's fields (a key missing from one
list was once checked as a method parameter)."""

from __future__ import annotations

from hfmerge.recipe.entry_keys import MODEL_KEYS, SOURCE_KEYS
from hfmerge.recipe.schema import ModelEntry, SliceSource


def test_the_own_keys_are_the_schemas_fields() -> None:
    assert set(ModelEntry.model_fields) == MODEL_KEYS
    assert set(SliceSource.model_fields) == SOURCE_KEYS
