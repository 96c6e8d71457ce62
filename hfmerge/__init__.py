"""hfmerge: align, CKA-check, merge or route Hugging Face models, and push the result to the Hub."""

from typing import Any

from hfmerge.errors import HfMergeError
from hfmerge.pipeline import RunResult, run_recipe
from hfmerge.recipe import Recipe, load_recipe

__all__ = ["HfMergeError", "Recipe", "RoutedModel", "RunResult", "__version__", "load_recipe",
           "run_recipe"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # RoutedModel imports transformers; `import hfmerge` stays light until it is used.
    if name == "RoutedModel":
        from hfmerge.routing import RoutedModel

        return RoutedModel
    raise AttributeError(f"module 'hfmerge' has no attribute {name!r}")
