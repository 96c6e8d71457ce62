"""`run`, `validate`, `convert` and `push`: recipes in, result objects out (see `hfmerge.api`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hfmerge.pipeline.options import RunOptions

if TYPE_CHECKING:
    from hfmerge.engine.plan import MergePlan
    from hfmerge.pipeline.route import RoutePlan
    from hfmerge.pipeline.run import RunResult
    from hfmerge.recipe.schema import Recipe


def run(recipe: str | Path | Recipe, options: RunOptions | None = None) -> RunResult:
    """Run a recipe: merge (or route) the models it names and write the output directory.

    Args:
        recipe: a recipe file, or a `Recipe` (`hfmerge.load_recipe`, `parse_recipe`).
        options: how to run it (`RunOptions`: output directory, force, dry run, push, ...).
            Without `out`, the output goes to the recipe's `output.path`, else to
            `out/<recipe file stem>` (`out/merged` or `out/routed` for a `Recipe` object).

    Returns:
        The plan, the output directory (None for a dry run), the Python lines that load it, and
        the Hub URL when pushed.

    Raises:
        RecipeError: the recipe is invalid (every problem at once, each with its YAML line).
        HfMergeError: any other problem, found before weights are downloaded or output is
            written; `PushError` when only the push failed (the output is then complete).
    """
    from hfmerge.pipeline.run import run_recipe

    parsed, recipe_file = _recipe(recipe)
    return run_recipe(parsed, options, recipe_file=recipe_file)


@dataclass(frozen=True)
class Validation:
    """A recipe that passed every check, the plan it would run, and notes on running it (one
    line each, such as an output directory that `run` will need `--force` to replace)."""

    recipe: Recipe
    plan: MergePlan | RoutePlan
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """`linear over 2 models, 12 tensors, 1.3 MB of output` or `centroid router over ...`."""
        from hfmerge.engine.plan import MergePlan

        plan = self.plan
        if not isinstance(plan, MergePlan):
            return f"{plan.method} router over {len(plan.experts)} experts"
        return (
            f"{plan.method.name} over {len(plan.inputs)} models, "
            f"{len(plan.jobs)} tensors, {plan.total_bytes / 1e6:.1f} MB of output"
        )


def validate(recipe: str | Path | Recipe, *, offline: bool = False) -> Validation:
    """Check a recipe: every schema problem at once, then model compatibility from headers,
    then the output path, with the checks `run` makes before it starts.

    Nothing is downloaded but configs and safetensors headers, and nothing is written.

    Args:
        recipe: a recipe file, or a `Recipe`.
        offline: use only the local HF cache, with no network request.

    Returns:
        The validated recipe, the plan a run would follow, and notes: an existing non-empty
        output directory is one (`run` replaces it only with `--force`), not an error.

    Raises:
        RecipeError: every schema and semantic problem of the recipe, each with its YAML line.
        OutputError: the output path is a file, lies in an unwritable folder, or is, holds or
            lies inside an input model's folder (`run` refuses these, even with `--force`).
        HfMergeError: a model that cannot be found or read, or models that do not fit together.
    """
    from hfmerge.pipeline.run import refuse_input_as_output, run_recipe

    parsed, recipe_file = _recipe(recipe)
    options = RunOptions(dry_run=True, offline=offline, progress=False)
    target = options.output_dir(parsed, recipe_file=recipe_file)
    notes = _check_output(target)  # first, as in `run`: no Hub request for a refused output
    result = run_recipe(parsed, options, recipe_file=recipe_file)
    refuse_input_as_output(target, result.plan)
    from hfmerge.engine.plan import MergePlan

    plan_notes = result.plan.notes if isinstance(result.plan, MergePlan) else ()
    return Validation(parsed, result.plan, (*notes, *plan_notes))


def _check_output(target: Path) -> tuple[str, ...]:
    """`run`'s output checks: errors for what `--force` cannot help, a note for what it can."""
    from hfmerge.errors import OutputError
    from hfmerge.tensors import check_output_dir, output_path

    check_output_dir(target, force=True)  # a file in the way, an unwritable folder
    try:
        check_output_dir(target, force=False)
    except OutputError:
        return (
            f"the output {output_path(target)} exists and is not empty: `hfmerge run` will "
            "replace it only with --force (or choose another output.path, or pass --out)",
        )
    return ()


def convert(config: str | Path) -> str:
    """The hfmerge recipe that runs a mergekit config, as YAML with a comment header.

    The config is validated first, so the recipe returned parses to the same `Recipe`.

    Args:
        config: a mergekit config file (top-level `merge_method:`, flat `models:`).

    Returns:
        The recipe's YAML text.

    Raises:
        RecipeError: every problem of the config at once, each with its YAML line; or the file
            is not a mergekit config.
    """
    from hfmerge.recipe.mergekit import recipe_yaml
    from hfmerge.recipe.schema import load_recipe

    path = Path(config)
    load_recipe(path)  # every problem at once, with the config's own lines
    return recipe_yaml(path.read_text(encoding="utf-8"), source=str(path))


@dataclass(frozen=True)
class PushResult:
    """A directory pushed to the Hub as one commit."""

    directory: Path
    repo_id: str
    url: str


def push(
    directory: str | Path, repo_id: str, *, private: bool = False, offline: bool = False
) -> PushResult:
    """Push a finished output directory (`run`'s, merged or routed) to the Hub as one commit.

    Args:
        directory: the output directory.
        repo_id: Hub repo id, `org/name` (or `name`, under the token's user).
        private: create the repo private (an existing repo keeps its visibility).
        offline: refuse at once instead of reaching the network.

    Returns:
        The directory, the repo id and the repo's URL.

    Raises:
        OutputError: the directory is not a complete model output or routed repo.
        HubError: no token, no write access, or offline.
        PushError: the upload failed after retries; the directory is untouched.
    """
    from hfmerge.pipeline.publish import push_output

    url = push_output(directory, repo_id, private=private, offline=offline)
    return PushResult(Path(directory), repo_id, url)


def _recipe(recipe: str | Path | Recipe) -> tuple[Recipe, Path | None]:
    """The parsed recipe and the file it came from (None for a `Recipe` object)."""
    if not isinstance(recipe, str | Path):
        return recipe, None
    from hfmerge.recipe.schema import load_recipe

    path = Path(recipe)
    return load_recipe(path), path


__all__ = ["PushResult", "Validation", "convert", "push", "run", "validate"]
