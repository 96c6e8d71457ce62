"""The files beside a merged model's weights: its config, the saved recipe and the card.

The config and tokenizer come from the base (a `slices:` merge also sets the new depth); the
recipe is saved with every Hub model pinned; the card lists the method and its parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfmerge.arch.config import CONFIG_FILE, mark_untied
from hfmerge.engine.plan import MergePlan
from hfmerge.methods.schedule import ParamSchedule
from hfmerge.pipeline.align import untied_heads
from hfmerge.pipeline.card import DEFAULT_ENDPOINT, render_card
from hfmerge.recipe.schema import Recipe
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import copy_side_files

if TYPE_CHECKING:
    from hfmerge.engine.slices import PlannedSlice

RECIPE_FILE = "hfmerge_recipe.yaml"


@dataclass(frozen=True)
class CardParams:
    """The resolved method parameters (defaults filled in) that the card lists."""

    method: dict[str, Any]
    inputs: list[dict[str, Any]]


def card_params(
    schedule: ParamSchedule, slices: list[PlannedSlice] | None, plan: MergePlan
) -> CardParams:
    """The card's parameters; for a `slices:` recipe the first slice's method parameters (the
    card's recipe shows every slice's settings)."""
    if slices is None:
        return CardParams(*schedule.card_values())
    method, _ = slices[0].schedule.card_values()
    return CardParams(method, [{} for _ in plan.inputs])


def copy_config(
    staging: Path, plan: MergePlan, recipe: Recipe, slices: list[PlannedSlice] | None
) -> None:
    """The base's config, tokenizer and other side files, with the output dtype set (and the
    depth a `slices:` recipe gives, and the head marked untied when the merge wrote it)."""
    copy_side_files(plan.base.source.path, staging)
    if untied_heads(recipe, plan.base):
        mark_untied(staging / CONFIG_FILE)
    if slices is not None:
        from hfmerge.pipeline.slices import write_slices_config

        write_slices_config(staging / "config.json", plan, slices)
    if recipe.output.dtype:
        _set_config_dtype(staging / "config.json", recipe.output.dtype)


def write_side_files(
    staging: Path,
    plan: MergePlan,
    recipe: Recipe,
    *,
    title: str,
    recipe_text: str,
    params: CardParams,
    repo_id: str | None,
    sections: list[str],
    tokenizer: bool,
) -> None:
    """Save the pinned recipe and render the card into the staged output."""
    (staging / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
    card = render_card(
        title=title,
        method=plan.method,
        base=plan.base,
        inputs=plan.inputs,
        params=params.method,
        input_params=params.inputs,
        recipe_text=recipe_text,
        repo_id=repo_id,
        endpoint=_endpoint(plan),
        extra_sections=[s for s in [*sections, converted_section(recipe_text)] if s],
        tokenizer=tokenizer,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")


def converted_section(recipe_text: str) -> str:
    """For a mergekit config, a card section with the same merge as an hfmerge recipe (what
    `hfmerge convert` prints); empty for an hfmerge recipe."""
    import yaml

    from hfmerge.recipe.mergekit import is_mergekit, recipe_yaml

    if not is_mergekit(yaml.safe_load(recipe_text)):
        return ""
    converted = recipe_yaml(recipe_text, source=RECIPE_FILE)
    return (
        "## As an hfmerge recipe\n\n"
        "The recipe above is a mergekit config. The same merge in hfmerge's own format, which "
        "also takes `align:`, `check:` and `route:`:\n\n"
        f"```yaml\n{converted.rstrip()}\n```\n"
    )


def _endpoint(plan: MergePlan) -> str:
    return hub_endpoint(plan.models)


def hub_endpoint(sources: list[ModelSource]) -> str:
    """The Hub endpoint a card links its inputs to (the default one without a Hub input)."""
    if all(source.hub_id is None for source in sources):
        return DEFAULT_ENDPOINT  # no Hub input: nothing links to it
    from hfmerge import hub

    return hub.settings().shown_endpoint  # a card is public: never the endpoint's credentials


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
