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
    pins = {
        source.label: (source.hub_id, source.revision)
        for source in sources
        if source.hub_id and source.revision
    }
    data = _pin_models(data, pins) if pins else data
    header = (
        "# Written by hfmerge: this model's recipe, with every Hub model pinned to the commit\n"
        "# that was merged. Run it again with: hfmerge run hfmerge_recipe.yaml --out DIR\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _pin_models(data: dict[str, Any], pins: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Hub entries of `models` (and `base`) rewritten to their pinned shas, matching as before.

    A string entry becomes `org/name@sha`; a mapping entry gets `model: org/name, revision: sha`
    beside its parameters. `base` (mergekit's `base_model`) is rewritten to match the same entry.
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
        if entry.ref not in pins:
            models.append(item)
            continue
        repo_id, sha = pins[entry.ref]
        if isinstance(item, str):
            models.append(f"{repo_id}@{sha}")
        else:
            models.append({**item, "model": repo_id, "revision": sha})
        if old_base in (entry.model, entry.ref):
            # The bare repo id matches by `model` (as recipe checks compare) when it is unique.
            unique = shared[entry.model] == 1 and not isinstance(item, str)
            base = repo_id if unique else f"{repo_id}@{sha}"
    pinned = {**data, "models": models} if "models" in data else dict(data)
    if isinstance(data.get("slices"), list):
        pinned["slices"] = [_pin_slice(one, pins) for one in data["slices"]]
    return pinned | ({base_key: base} if base is not None else {})


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
