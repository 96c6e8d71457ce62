"""The keys a model entry (and a slice's source) holds for itself; its other keys are settings.

Kept apart from `recipe/schema.py` so the checks that `schema.py` runs can read them without
importing it back; `tests/recipe/test_entry_keys.py` keeps them equal to the schema's fields.
"""

from __future__ import annotations

MODEL_KEYS = frozenset({"model", "revision", "lora"})  # `ModelEntry`'s fields
SOURCE_KEYS = MODEL_KEYS | {"layer_range"}  # `SliceSource`'s fields
