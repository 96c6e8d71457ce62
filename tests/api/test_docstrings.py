"""Every function of the public API documents its arguments, its result and its errors.

ruff's pydocstyle rules (Google convention) check that a docstring exists and that an `Args:`
section, where there is one, names every argument; they do not require the sections. This does,
for the functions `hfmerge.api` exports.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from hfmerge import api

# No error of their own to document: the listings of what is built in read fixed registries, and
# `clean` passes over what it cannot read or remove.
RAISE_NOTHING = frozenset({"archs", "clean", "methods"})


def sections(doc: str) -> dict[str, list[str]]:
    """A Google-style docstring's sections, by header (`Args`, ...), as their lines."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in doc.splitlines():
        if line.endswith(":") and not line.startswith(" ") and line[:-1].isalpha():
            current = found.setdefault(line[:-1], [])
        elif current is not None and line.strip():
            current.append(line)
    return found


def missing_documentation(function: Callable[..., Any], *, raises: bool = True) -> list[str]:
    """What `function`'s docstring lacks: sections, and arguments that `Args:` leaves out."""
    parts = sections(inspect.getdoc(function) or "")
    wanted = ["Returns"] + (["Raises"] if raises else [])
    missing = [name for name in wanted if name not in parts]
    parameters = list(inspect.signature(function).parameters)
    if parameters and "Args" not in parts:
        return [*missing, "Args"]
    # An argument's entry starts at the section's indent: "    name: what it is".
    entries = [line for line in parts.get("Args", []) if len(line) - len(line.lstrip()) == 4]
    listed = {line.split(":")[0].strip() for line in entries}
    return missing + [f"Args: {name}" for name in parameters if name not in listed]


PUBLIC_FUNCTIONS = [name for name in api.__all__ if inspect.isfunction(getattr(api, name))]


def test_the_api_exports_functions() -> None:
    assert {"run", "validate", "push", "cka", "barrier", "evaluate", "align"} <= set(
        PUBLIC_FUNCTIONS
    )


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_every_api_function_documents_args_returns_and_raises(name: str) -> None:
    function = getattr(api, name)
    assert missing_documentation(function, raises=name not in RAISE_NOTHING) == []


def _undocumented(model: str, *, steps: int = 3) -> int:
    """Count the steps.

    Args:
        model: the model.

    Returns:
        The count.
    """
    return steps


def _bare(model: str) -> str:
    """Only a summary."""
    return model


def test_the_check_finds_missing_sections_and_arguments() -> None:
    assert missing_documentation(_undocumented) == ["Raises", "Args: steps"]
    assert missing_documentation(_undocumented, raises=False) == ["Args: steps"]
    assert missing_documentation(_bare) == ["Returns", "Raises", "Args"]
