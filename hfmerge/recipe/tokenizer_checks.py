"""Checks on a recipe's `tokenizer:` section: the models it names, and each token's source.

Like `recipe/checks.py`, they read the raw mapping, so every problem is reported at once. What
happens to each token is found later, from the models' tokenizers (`hfmerge validate` lists it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hfmerge.recipe.yaml_locations import Location

KEYWORD_SOURCES = ("union", "base")


def tokenizer_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    """Every problem of `tokenizer:` (none without one)."""
    section = data.get("tokenizer")
    if not isinstance(section, Mapping):
        return []
    names = _model_names(data)
    problems: list[tuple[Location, str]] = []
    if data.get("route") is not None:
        problems.append(
            (("tokenizer",), "`tokenizer:` applies to merges; a routed model keeps each expert's")
        )
    source = section.get("source")
    if isinstance(source, str) and source not in KEYWORD_SOURCES and source not in names:
        problems.append((("tokenizer", "source"), _not_a_model(source, names, keywords=True)))
    template = section.get("chat_template")
    if isinstance(template, str) and template:
        problems += _template_problems(template)
    tokens = section.get("tokens")
    if isinstance(tokens, Mapping):
        for token, spec in tokens.items():
            if isinstance(spec, Mapping):
                problems += _token_problems(("tokenizer", "tokens", token), spec, names)
    return problems


def _model_names(data: Mapping[str, Any]) -> set[str]:
    """Every way the recipe names a model: `model` and `model@revision`, slices' sources too."""
    entries: list[Any] = list(data.get("models") or [])
    for one in data.get("slices") or []:
        if isinstance(one, Mapping):
            entries += list(one.get("sources") or [])
    names = set()
    for entry in entries:
        if isinstance(entry, str):
            names.add(entry)
        elif isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
            names.add(entry["model"])
            if entry.get("revision"):
                names.add(f"{entry['model']}@{entry['revision']}")
    if isinstance(data.get("base"), str):
        names.add(data["base"])
    return names


def _token_problems(
    where: Location, spec: Mapping[str, Any], names: set[str]
) -> list[tuple[Location, str]]:
    source = spec.get("source")
    if isinstance(source, str) and source not in names:
        return [((*where, "source"), _not_a_model(source, names, keywords=False))]
    if not isinstance(source, Mapping):
        return []
    kind = source.get("kind")
    at: Location = (*where, "source")
    if kind == "zero":
        extra = sorted(k for k in ("model", "token", "token_id") if source.get(k) is not None)
        return [(at, f"a `zero` source takes no {', '.join(extra)}")] if extra else []
    if kind != "model_token":
        return []  # the schema reports it
    problems: list[tuple[Location, str]] = []
    model = source.get("model")
    if not isinstance(model, str):
        problems.append((at, "a `model_token` source needs `model:` (the donor model)"))
    elif model not in names:
        problems.append(((*at, "model"), _not_a_model(model, names, keywords=False)))
    if (source.get("token") is None) == (source.get("token_id") is None):
        problems.append((at, "a `model_token` source needs exactly one of `token:` or `token_id:`"))
    return problems


def _not_a_model(name: str, names: set[str], *, keywords: bool) -> str:
    listed = ", ".join(sorted(names)) or "none"
    choices = "`union`, `base` or one of the recipe's models" if keywords else "one of the models"
    return f"{name!r} is not {choices} (models: {listed})"


def _template_problems(value: str) -> list[tuple[Location, str]]:
    from pathlib import Path

    from hfmerge.recipe.chat_templates import AUTO, NAMED, is_template_text

    if value in NAMED or value == AUTO or is_template_text(value) or Path(value).is_file():
        return []
    names = ", ".join(NAMED)
    return [
        (
            ("tokenizer", "chat_template"),
            f"{value!r} is not a named template ({names}), `auto`, Jinja text or a file (looked "
            f"for {Path(value).absolute()})",
        )
    ]
