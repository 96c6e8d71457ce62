"""The one orchestrator: recipe -> pinned models -> preflight -> plan -> download -> merge -> push.

Every check that can fail runs before any weight is downloaded or output written, and the output
is assembled in a temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hfmerge.card import DEFAULT_ENDPOINT, render_card, with_repo_id
from hfmerge.engine import execute_plan
from hfmerge.errors import HfMergeError, ModelSourceError, OutputError, PushError
from hfmerge.methods import get_method, validate_params
from hfmerge.plan import MergePlan, build_plan
from hfmerge.preflight import InspectedModel, inspect_models
from hfmerge.recipe import ModelEntry, Recipe
from hfmerge.sources import fetch_files
from hfmerge.tensors import (
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    parse_size,
    read_checkpoint_index,
)

RECIPE_FILE = "hfmerge_recipe.yaml"


@dataclass(frozen=True)
class RunResult:
    """What `run_recipe` did: the plan, where the output went (None for a dry run), and the URL
    of the Hub repo it was pushed to (None when not pushed)."""

    plan: MergePlan
    out_dir: Path | None
    url: str | None = None


def run_recipe(
    recipe: Recipe,
    *,
    recipe_text: str | None = None,
    out_dir: str | Path | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    push: str | None = None,
    private: bool | None = None,
    offline: bool = False,
) -> RunResult:
    """Run a merge recipe end to end.

    Order: validate → pin Hub revisions → remote config and headers → spec and compatibility →
    plan → (a dry run stops here) → download → merge → card → push.

    Args:
        recipe: a validated recipe (`load_recipe`).
        recipe_text: the recipe as written; saved beside the output (revisions pinned) and
            shown in the card.
        out_dir: overrides `output.path`.
        dry_run: plan from headers only, download no weights, write nothing.
        force: replace an existing output directory.
        progress: draw progress bars on stderr.
        push: Hub repo id to push the output to (overrides `output.push`).
        private: make a newly created repo private (overrides `output.private`).
        offline: use only the local HF cache, with no network request.

    Raises:
        HfMergeError: any user-facing problem, raised before weights are downloaded or output
            is written. `PushError` when only the push failed: the output is then complete.
    """
    _refuse_unsupported(recipe)
    assert recipe.merge is not None
    method = get_method(recipe.merge.method)
    base_entry, inputs_entries = _split_base(recipe, needs_base=method.needs_base)
    params, model_params = validate_params(
        method, recipe.merge.parameters, [e.method_params for e in inputs_entries]
    )
    target = Path(out_dir or recipe.output.path or "out/merged")
    push = push or recipe.output.push
    if not dry_run:
        check_output_dir(target, force=force)  # fail now, not after the merge
        if push:
            push = _check_push(push, offline=offline)  # and a push that cannot work, too
    base, inputs = _inspect(base_entry, inputs_entries, offline=offline, progress=progress)
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
    plan = _download(plan, offline=offline)
    text = pinned_recipe(recipe, recipe_text, [base, *inputs])
    card_params = CardParams(
        method=params.model_dump(by_alias=True),
        inputs=[p.model_dump(by_alias=True) for p in model_params],
    )
    with atomic_output_dir(target, force=force) as staging:
        execute_plan(
            plan,
            staging,
            params=params,
            model_params=model_params,
            seed=recipe.merge.seed,
            progress=progress,
        )
        _write_side_files(
            staging, plan, recipe, title=target.name, recipe_text=text, params=card_params,
            repo_id=push,
        )
    if not push:
        return RunResult(plan=plan, out_dir=target)
    keep_private = recipe.output.private if private is None else private
    url = push_output(target, push, private=keep_private, checked=True, method=method.name)
    return RunResult(plan=plan, out_dir=target, url=url)


def push_output(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    offline: bool = False,
    checked: bool = False,
    method: str | None = None,
) -> str:
    """Push a finished output directory to the Hub as one commit; the repo's URL.

    Refuses, before uploading anything, a directory that is not a model output (no config.json
    or no safetensors weights). `checked` says `check_push` already ran.

    Raises:
        PushError: the upload failed after retries; the local output is untouched.
    """
    folder = Path(folder)
    _check_model_output(folder)
    if not checked:
        repo_id = _check_push(repo_id, offline=offline)
    from hfmerge import hub

    readme = folder / "README.md"
    if readme.is_file():  # a card written before the repo id was known names it now
        text = readme.read_text(encoding="utf-8")
        if with_repo_id(text, repo_id) != text:
            readme.write_text(with_repo_id(text, repo_id), encoding="utf-8")
    message = f"Upload {method} merge made with hfmerge" if method else "Upload with hfmerge"
    try:
        return hub.push_folder(folder, repo_id, private=private, commit_message=message)
    except HfMergeError as exc:
        raise PushError(str(folder), repo_id, exc) from None


def _check_push(repo_id: str, *, offline: bool) -> str:
    from hfmerge import hub

    return hub.check_push(repo_id, offline=offline)


def _check_model_output(folder: Path) -> None:
    if not folder.is_dir():
        raise OutputError(str(folder), "is not a directory", "name a model output directory")
    if not (folder / "config.json").is_file():
        raise OutputError(
            str(folder),
            "has no config.json, so it is not a model output",
            "push the directory that `hfmerge run` wrote",
        )
    try:
        read_checkpoint_index(folder)  # safetensors weights present, headers valid
    except ModelSourceError as exc:
        raise OutputError(
            str(folder), f"is not a complete model output: {exc.what}", exc.fix
        ) from None


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
    base_entry: ModelEntry, entries: list[ModelEntry], *, offline: bool, progress: bool
) -> tuple[InspectedModel, list[InspectedModel]]:
    unique = list({e.ref: e for e in [base_entry, *entries]}.values())
    refs = [(e.model, e.revision) for e in unique]
    found = inspect_models(refs, offline=offline, progress=progress)
    by_ref = {e.ref: model for e, model in zip(unique, found, strict=True)}
    return by_ref[base_entry.ref], [by_ref[e.ref] for e in entries]


def _download(plan: MergePlan, *, offline: bool) -> MergePlan:
    """Fetch the Hub inputs' weights (the base's config and tokenizer too) into the cache.

    Each downloaded checkpoint's headers must match the ones the plan was made from.
    """
    local: dict[int, InspectedModel] = {}
    for model in [plan.base, *plan.inputs]:
        if id(model) in local or model.source.hub_id is None:
            continue
        source = fetch_files(
            model.source, model.index.shards, side_files=model is plan.base, offline=offline
        )
        index = read_checkpoint_index(source.path, label=model.name)
        if list(index) != list(model.index):
            raise ModelSourceError(
                model.name,
                "its downloaded weights do not match the headers read before downloading",
                "delete its folder in the HF cache and run again",
            )
        local[id(model)] = replace(model, source=source, index=index)
    if not local:
        return plan
    return replace(
        plan,
        base=local.get(id(plan.base), plan.base),
        inputs=[local.get(id(m), m) for m in plan.inputs],
    )


def pinned_recipe(recipe: Recipe, recipe_text: str | None, models: list[InspectedModel]) -> str:
    """The recipe with every Hub model pinned to the commit sha it resolved to, as YAML.

    Saved as `hfmerge_recipe.yaml` and shown in the card: running it again reproduces the same
    inputs even after the Hub repos move on.
    """
    import yaml

    data = yaml.safe_load(recipe_text) if recipe_text else None
    if not isinstance(data, dict):
        data = recipe.model_dump(mode="json", exclude_defaults=True)
    pins = {
        m.name: (m.source.hub_id, m.source.revision)
        for m in models
        if m.source.hub_id and m.source.revision
    }
    data = _pin_models(data, pins) if pins else data
    header = (
        "# Written by hfmerge: this model's recipe, with every Hub model pinned to the commit\n"
        "# that was merged. Run it again with: hfmerge run hfmerge_recipe.yaml --out DIR\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _pin_models(data: dict[str, Any], pins: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Hub entries of `models` (and `base`) rewritten to their pinned shas, matching as before.

    A string entry becomes `org/name@sha`; a mapping entry gets `model: org/name, revision: sha`
    beside its parameters. `base` is rewritten to match the same entry.
    """
    entries = [ModelEntry.model_validate({"model": m} if isinstance(m, str) else m)
               for m in data.get("models", [])]
    shared = Counter(e.model for e in entries)
    old_base = data.get("base")
    new_base = pins.get(old_base, (None, None)) if isinstance(old_base, str) else (None, None)
    base: Any = f"{new_base[0]}@{new_base[1]}" if new_base[0] else old_base  # not in models
    models: list[Any] = []
    for item, entry in zip(data.get("models", []), entries, strict=True):
        if entry.ref not in pins:
            models.append(item)
            continue
        repo_id, sha = pins[entry.ref]
        if isinstance(item, str):
            models.append(f"{repo_id}@{sha}")
        else:
            models.append({**item, "model": repo_id, "revision": sha})
        if old_base in (entry.model, entry.ref):
            # The bare repo id matches by `model` (as recipe checks compare) when it is unique.
            unique = shared[entry.model] == 1 and not isinstance(item, str)
            base = repo_id if unique else f"{repo_id}@{sha}"
    return {**data, "models": models} | ({"base": base} if base is not None else {})


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
    repo_id: str | None,
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
        repo_id=repo_id,
        endpoint=_endpoint(plan),
    )
    (staging / "README.md").write_text(card, encoding="utf-8")


def _endpoint(plan: MergePlan) -> str:
    if all(m.source.hub_id is None for m in [plan.base, *plan.inputs]):
        return DEFAULT_ENDPOINT  # no Hub input: nothing links to it
    from hfmerge import hub

    return hub.settings().endpoint


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
