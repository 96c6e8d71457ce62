"""hfmerge: align, CKA-check, merge or route Hugging Face models, and push the result to the Hub."""

from hfmerge.errors import HfMergeError
from hfmerge.pipeline import RunResult, run_recipe
from hfmerge.recipe import Recipe, load_recipe

__all__ = ["HfMergeError", "Recipe", "RunResult", "__version__", "load_recipe", "run_recipe"]
__version__ = "0.1.0"
