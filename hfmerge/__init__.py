"""hfmerge: align, CKA-check, merge or route Hugging Face models, and push the result to the Hub."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfmerge.errors import HfMergeError
    from hfmerge.pipeline.run import RunResult, run_recipe
    from hfmerge.recipe.schema import Recipe, load_recipe
    from hfmerge.routing import RoutedModel

__all__ = [
    "HfMergeError",
    "Recipe",
    "RoutedModel",
    "RunResult",
    "__version__",
    "load_recipe",
    "run_recipe",
]
__version__ = "0.1.0"

# Public names and their modules, imported on first use: `import hfmerge` (and the command line's
# entry point, which runs before torch is imported) stays light until something is used.
_LAZY = {
    "HfMergeError": "hfmerge.errors",
    "RunResult": "hfmerge.pipeline.run",
    "run_recipe": "hfmerge.pipeline.run",
    "Recipe": "hfmerge.recipe.schema",
    "load_recipe": "hfmerge.recipe.schema",
    "RoutedModel": "hfmerge.routing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hfmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
