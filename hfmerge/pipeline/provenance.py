"""Provenance: the recipe saved beside an output, with every Hub model pinned to its commit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from hfmerge.recipe.schema import ModelEntry, Recipe
from hfmerge.sources.refs import ModelSource


def pinned_recipe(recipe: Recipe, recipe_text: str | None, sources: Sequence[ModelSource]) -> str:
    """The recipe with every Hub model pinned to the commit sha it resolved to, as YAML.

    Saved as `hfmerge_recipe.yaml` and shown in the card: running it again reproduces the same
    inputs even after the Hub repos move on.
    """
    import yaml

    data = yaml.safe_load(recipe_text) if recipe_text else None
    if not isinstance(data, dict):
        data = recipe.model_dump(mode="json", exclude_defaults=True)
    pins = dict(pin for source in sources for pin in _pins(source))
    data = _pin_models(data, pins) if pins else data
    header = (
        "# Written by hfmerge: this model's recipe, with every Hub model pinned to the commit\n"
        "# that was merged. Run it again with: hfmerge run hfmerge_recipe.yaml --out DIR\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _pins(source: ModelSource) -> list[tuple[str, tuple[str, str]]]:
    """(reference, (repo id, sha)) of a Hub source, and of its adapter's when it has one on the
    Hub; a model with an adapter is pinned by the reference of its model part."""
    pins = _pins(source.adapter) if source.adapter is not None else []
    if source.hub_id and source.revision:
        pins.append((source.without_adapter.ref, (source.hub_id, source.revision)))
    return pins


def _pin_models(data: dict[str, Any], pins: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Hub entries of `models` (and `base`) rewritten to their pinned shas, matching as before.

    A string entry becomes `org/name@sha`; a mapping entry gets `model: org/name, revision: sha`
    beside its parameters. A Hub adapter becomes `org/adapter@sha`, after `+` in a string entry
    or as `lora:`. `base` (mergekit's `base_model`) is rewritten to match the same entry.
    """
    entries = [
        ModelEntry.model_validate({"model": m} if isinstance(m, str) else m)
        for m in data.get("models", [])
    ]
    shared = Counter(e.model for e in entries)
    # mergekit's spelling of the recipe names its base `base_model`
    base_key = "base_model" if "base_model" in data and "base" not in data else "base"
    old_base = data.get(base_key)
    new_base = pins.get(old_base, (None, None)) if isinstance(old_base, str) else (None, None)
    base: Any = f"{new_base[0]}@{new_base[1]}" if new_base[0] else old_base  # not in models
    models: list[Any] = []
    for item, entry in zip(data.get("models", []), entries, strict=True):
        model_ref = entry.ref.removesuffix(f"+{entry.lora}") if entry.lora else entry.ref
        lora = _pinned(pins, entry.lora) if entry.lora else None
        if model_ref not in pins and lora == entry.lora:
            models.append(item)
            continue
        pin = pins.get(model_ref)
        repo_id, sha = pin if pin else (entry.model, entry.revision)
        plus = f"+{lora}" if lora else ""
        if isinstance(item, str):
            models.append(f"{_pinned(pins, model_ref)}{plus}")
        else:
            revision = {"revision": sha} if sha else {}
            models.append(
                {**item, "model": repo_id, **revision, **({"lora": lora} if lora else {})}
            )
        if old_base in entry.spellings:
            # The bare repo id matches by `model` (as recipe checks compare) when it is unique.
            unique = shared[entry.model] == 1 and not isinstance(item, str)
            base = (repo_id if unique or not sha else f"{repo_id}@{sha}") + plus
    result = {**data, "models": models} if "models" in data else dict(data)
    if isinstance(data.get("slices"), list):
        result["slices"] = [_pin_slice(one, pins) for one in data["slices"]]
    return result | ({base_key: base} if base is not None else {})


def _pinned(pins: Mapping[str, tuple[str, str]], ref: str) -> str:
    """`org/name@sha` for a pinned reference, the reference itself otherwise."""
    pin = pins.get(ref)
    return f"{pin[0]}@{pin[1]}" if pin else ref


def _pin_slice(one: Any, pins: Mapping[str, tuple[str, str]]) -> Any:
    """A slice with each Hub source pinned (`model: org/name, revision: sha`)."""
    if not isinstance(one, dict) or not isinstance(one.get("sources"), list):
        return one
    sources = []
    for source in one["sources"]:
        ref = None
        if isinstance(source, dict) and isinstance(source.get("model"), str):
            revision = source.get("revision")
            ref = f"{source['model']}@{revision}" if revision else source["model"]
        if ref is not None and ref in pins:
            repo_id, sha = pins[ref]
            source = {**source, "model": repo_id, "revision": sha}
        sources.append(source)
    return {**one, "sources": sources}
