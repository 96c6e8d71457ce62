"""The one orchestrator: recipe -> resolved models -> preflight -> plan -> merge -> output dir.

Every check that can fail runs before the first byte of output is written, and the output is
assembled in a temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmerge.card import render_card
from hfmerge.engine import execute_plan
from hfmerge.errors import HfMergeError
from hfmerge.methods import get_method, validate_params
from hfmerge.plan import MergePlan, build_plan
from hfmerge.preflight import InspectedModel, check_compatible, inspect_model
from hfmerge.recipe import ModelEntry, Recipe
from hfmerge.sources import resolve_model
from hfmerge.tensors import atomic_output_dir, check_output_dir, copy_side_files, parse_size

RECIPE_FILE = "hfmerge_recipe.yaml"


@dataclass(frozen=True)
class RunResult:
    """What `run_recipe` did: the plan, and where the output went (None for a dry run)."""

    plan: MergePlan
    out_dir: Path | None


def run_recipe(
    recipe: Recipe,
    *,
    recipe_text: str | None = None,
    out_dir: str | Path | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run a merge recipe end to end.

    Args:
        recipe: a validated recipe (`load_recipe`).
        recipe_text: the recipe as written, saved beside the output and shown in the card.
        out_dir: overrides `output.path`.
        dry_run: plan from headers only, read no weights, write nothing.
        force: replace an existing output directory.
        progress: draw progress bars on stderr.

    Raises:
        HfMergeError: any user-facing problem, raised before output is written.
    """
    _refuse_unsupported(recipe)
    assert recipe.merge is not None
    method = get_method(recipe.merge.method)
    base_entry, inputs_entries = _split_base(recipe, needs_base=method.needs_base)
    params, model_params = validate_params(
        method, recipe.merge.parameters, [e.method_params for e in inputs_entries]
    )
    target = Path(out_dir or recipe.output.path or "out/merged")
    if not dry_run:
        check_output_dir(target, force=force)  # fail now, not after the merge
    base, inputs = _inspect(recipe, base_entry, inputs_entries, progress=progress)
    plan = build_plan(
        method,
        base=base,
        inputs=inputs,
        out_dtype=recipe.output.dtype,
        max_shard_bytes=parse_size(recipe.output.max_shard_size),
    )
    if dry_run:
        return RunResult(plan=plan, out_dir=None)
    _refuse_input_as_output(target, [base, *inputs])
    text = recipe_text or _dump_recipe(recipe)
    with atomic_output_dir(target, force=force) as staging:
        execute_plan(
            plan,
            staging,
            params=params,
            model_params=model_params,
            seed=recipe.merge.seed,
            progress=progress,
        )
        card_params = CardParams(
            method=params.model_dump(by_alias=True),
            inputs=[p.model_dump(by_alias=True) for p in model_params],
        )
        _write_side_files(
            staging, plan, recipe, title=target.name, recipe_text=text, params=card_params
        )
    return RunResult(plan=plan, out_dir=target)


def _refuse_unsupported(recipe: Recipe) -> None:
    unsupported = []
    if recipe.route is not None:
        unsupported.append("`route:` (per-input routing)")
    if recipe.align.method != "none":
        unsupported.append(f"`align: {{method: {recipe.align.method}}}`")
    if recipe.check.cka_min is not None:
        unsupported.append("`check: {cka_min: ...}`")
    if unsupported:
        raise HfMergeError(
            f"This build of hfmerge cannot run {', '.join(unsupported)} yet",
            why="the recipe is valid, but this step is not implemented in this version",
            fix="remove those sections to run a plain merge",
        )


def _split_base(recipe: Recipe, *, needs_base: bool) -> tuple[ModelEntry, list[ModelEntry]]:
    base = recipe.base_entry()
    if not needs_base:
        return base, list(recipe.models)
    return base, [e for e in recipe.models if e.model != base.model]


def _inspect(
    recipe: Recipe, base_entry: ModelEntry, entries: list[ModelEntry], *, progress: bool
) -> tuple[InspectedModel, list[InspectedModel]]:
    by_ref: dict[str, InspectedModel] = {}
    for entry in [base_entry, *entries]:
        if entry.ref not in by_ref:
            source = resolve_model(entry.model, revision=entry.revision, progress=progress)
            by_ref[entry.ref] = inspect_model(source)
    check_compatible(list(by_ref.values()))
    return by_ref[base_entry.ref], [by_ref[e.ref] for e in entries]


def _refuse_input_as_output(target: Path, models: list[InspectedModel]) -> None:
    for model in models:
        if target.resolve() == model.source.path.resolve():
            raise HfMergeError(
                f"The output directory {target} is the input model {model.name}",
                fix="choose another output path (`--out DIR`)",
            )


@dataclass(frozen=True)
class CardParams:
    """The resolved method parameters (defaults filled in) that the card lists."""

    method: dict[str, Any]
    inputs: list[dict[str, Any]]


def _write_side_files(
    staging: Path,
    plan: MergePlan,
    recipe: Recipe,
    *,
    title: str,
    recipe_text: str,
    params: CardParams,
) -> None:
    copy_side_files(plan.base.source.path, staging)
    if recipe.output.dtype:
        _set_config_dtype(staging / "config.json", recipe.output.dtype)
    (staging / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
    card = render_card(
        title=title,
        method=plan.method,
        base=plan.base,
        inputs=plan.inputs,
        params=params.method,
        input_params=params.inputs,
        recipe_text=recipe_text,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
