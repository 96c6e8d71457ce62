"""The caller's choices for one run of a recipe, and the rules that combine them with the recipe.

A recipe says what to build; `RunOptions` say how this run goes (where to, whether to replace,
plan only, push, ...). Where both speak (output directory, push target, privacy), the option wins,
and each such rule is a method here, so it is decided in this one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hfmerge.engine.tuning import DEFAULT_TUNING, EngineTuning

if TYPE_CHECKING:  # pydantic is not needed to build options: `hfmerge --help` stays fast
    from hfmerge.recipe.schema import Recipe

OUTPUT_ROOT = Path("out")  # where outputs go when neither the options nor the recipe say


@dataclass(frozen=True)
class RunOptions:
    """How to run a recipe (`run_recipe`, `hfmerge.api.run`, `hfmerge run`).

    Attributes:
        out: output directory. None: the recipe's `output.path`; when the recipe has none either,
            `out/<name>` with the recipe file's stem as name (`hfmerge run r.yaml` -> `out/r`),
            or `merged` / `routed` for a recipe that comes from no file (`output_dir`).
        dry_run: plan from headers only; download no weights, write nothing.
        force: replace an existing output directory (and merge below a failed CKA gate).
        push: Hub repo id to push the output to. None: the recipe's `output.push`.
        private: make a newly created Hub repo private. None: the recipe's `output.private`.
        offline: use only the local HF cache, with no network request.
        max_memory: peak memory of the merge step (engine/budget.py), of weight and activation
            matching (align/matching_memory.py, align/activation_run.py) and of REPAIR
            (pipeline/repair.py), e.g. "1GB" or bytes.
        progress: draw progress bars on stderr.
        allow_non_finite: merge even when an input tensor, or the merged output, holds NaN or
            Inf values, listing them in a warning on stderr; by default they are an error
            (`NonFiniteWeightsError`) and nothing is written.
        tuning: the merge engine's chunk, queue, thread and process sizes (engine/tuning.py);
            benchmarks and tests change them, users have no need to.
    """

    out: str | Path | None = None
    dry_run: bool = False
    force: bool = False
    push: str | None = None
    private: bool | None = None
    offline: bool = False
    max_memory: str | int | None = None
    progress: bool = True
    allow_non_finite: bool = False
    tuning: EngineTuning = DEFAULT_TUNING

    def output_dir(self, recipe: Recipe, *, recipe_file: Path | None = None) -> Path:
        """The output directory: `out`, else `output.path`, else `out/<recipe stem or kind>`."""
        chosen = self.out or recipe.output.path
        if chosen:
            return Path(chosen).expanduser()  # `~/merged` is in the home folder, as in a shell
        if recipe_file is not None:
            return OUTPUT_ROOT / recipe_file.stem
        return OUTPUT_ROOT / ("routed" if recipe.route is not None else "merged")

    def push_to(self, recipe: Recipe) -> str | None:
        """The Hub repo id to push to: `push`, else `output.push`; None for no push."""
        return self.push or recipe.output.push

    def keep_private(self, recipe: Recipe) -> bool:
        """Whether a newly created Hub repo is private: `private`, else `output.private`."""
        return recipe.output.private if self.private is None else self.private


__all__ = ["OUTPUT_ROOT", "RunOptions"]
