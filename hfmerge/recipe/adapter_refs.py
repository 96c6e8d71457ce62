"""A model reference with a LoRA adapter, `BASE+ADAPTER`, as recipes and mergekit configs spell it
(read by the schema and by the recipe checks alike)."""

from __future__ import annotations

from pathlib import Path


def split_adapter(reference: str) -> tuple[str, str | None]:
    """`BASE+ADAPTER` (mergekit's spelling of a model with a LoRA adapter) -> (BASE, ADAPTER);
    a reference without `+`, or an existing path that holds one, -> (reference, None)."""
    if "+" not in reference or Path(reference).exists():
        return reference, None
    model, _, adapter = reference.partition("+")
    return model, adapter
