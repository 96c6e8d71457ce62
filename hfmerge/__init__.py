"""hfmerge: align, CKA-check, merge or route Hugging Face models, and push the result to the Hub.

The Python API is `hfmerge.api`, one function per command; most of its functions are also here
(`hfmerge.run`, `hfmerge.cka`, ...). `align`, `methods` and `zoo` are reached as `hfmerge.api.align`
and so on: here those names are the packages `hfmerge.align`, `hfmerge.methods` and `hfmerge.zoo`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfmerge import api
    from hfmerge.api import archs, barrier, cka, evaluate, push, run, validate
    from hfmerge.errors import HfMergeError
    from hfmerge.pipeline.options import RunOptions
    from hfmerge.pipeline.run import RunResult, run_recipe
    from hfmerge.recipe.schema import Recipe, load_recipe, parse_recipe
    from hfmerge.routing import RoutedModel

__all__ = [
    "HfMergeError",
    "Recipe",
    "RoutedModel",
    "RunOptions",
    "RunResult",
    "__version__",
    "api",
    "archs",
    "barrier",
    "cka",
    "evaluate",
    "load_recipe",
    "parse_recipe",
    "push",
    "run",
    "run_recipe",
    "validate",
]
__version__ = "0.1.0"

# Public names and their modules, imported on first use: `import hfmerge` (and the command line's
# entry point, which runs before torch is imported) stays light until something is used.
_LAZY = {
    "HfMergeError": "hfmerge.errors",
    "RunOptions": "hfmerge.pipeline.options",
    "RunResult": "hfmerge.pipeline.run",
    "run_recipe": "hfmerge.pipeline.run",
    "Recipe": "hfmerge.recipe.schema",
    "load_recipe": "hfmerge.recipe.schema",
    "parse_recipe": "hfmerge.recipe.schema",
    "RoutedModel": "hfmerge.routing",
    **dict.fromkeys(
        ("archs", "barrier", "cka", "evaluate", "push", "run", "validate"), "hfmerge.api"
    ),
}
_SUBMODULES = frozenset({"api"})  # `hfmerge.api` without importing it first


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"hfmerge.{name}")  # the import binds it here too
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hfmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBMODULES])
