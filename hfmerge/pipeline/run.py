"""The one orchestrator: recipe -> pinned models -> preflight -> plan -> download -> merge -> push.

Every check that can fail runs before any weight is downloaded or output written, and the output
is assembled in a temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hfmerge.arch import require_permutable
from hfmerge.engine.budget import parse_memory_budget
from hfmerge.engine.plan import MergePlan, build_plan, format_plan
from hfmerge.engine.stream import execute_plan
from hfmerge.errors import ModelSourceError
from hfmerge.methods import get_method
from hfmerge.methods.schedule import ParamSchedule, schedule_for
from hfmerge.pipeline.card import (
    load_snippet,
    render_routed_card,
    routed_snippet,
)
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.provenance import pinned_recipe
from hfmerge.pipeline.publish import check_push, push_output
from hfmerge.pipeline.side_files import (
    RECIPE_FILE,
    card_params,
    copy_config,
    hub_endpoint,
    write_side_files,
)
from hfmerge.recipe.schema import ModelEntry, Recipe
from hfmerge.sources.adapters import fetch_adapter
from hfmerge.sources.inspection import InspectedModel, inspect_models
from hfmerge.sources.refs import fetch_files
from hfmerge.tensors import (
    atomic_output_dir,
    check_output_dir,
    has_tokenizer,
    parse_size,
    read_checkpoint_index,
    refuse_overlap,
)

if TYPE_CHECKING:
    from hfmerge.arch.residual import BasisMap
    from hfmerge.engine.slices import PlannedSlice
    from hfmerge.pipeline.repair import RepairReport
    from hfmerge.pipeline.route import RoutePlan

# The steps that probe models (CKA gate, alignment, routing) import transformers, which costs
# seconds; they are imported where they run, so a plain merge starts fast.


@dataclass(frozen=True)
class RunResult:
    """What `run_recipe` did: the plan (a merge plan, or a route plan for `route:` recipes),
    where the output went (None for a dry run), the Python lines that load it, the URL of
    the Hub repo it was pushed to (None when not pushed), and warnings about the output (one
    line each, such as an output without a tokenizer)."""

    plan: MergePlan | RoutePlan
    out_dir: Path | None
    url: str | None = None
    snippet: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def routed(self) -> bool:
        """True for a routed repo (a `route:` recipe), False for a merged model."""
        return not isinstance(self.plan, MergePlan)

    def describe_plan(self) -> str:
        """The plan as `--dry-run` prints it."""
        if isinstance(self.plan, MergePlan):
            return format_plan(self.plan)
        return self.plan.describe()


def run_recipe(
    recipe: Recipe, options: RunOptions | None = None, *, recipe_file: Path | None = None
) -> RunResult:
    """Run a merge recipe end to end.

    Order: validate → pin Hub revisions → remote config and headers → spec and compatibility →
    plan → (a dry run stops here) → download → merge → card → push.

    Args:
        recipe: a validated recipe (`load_recipe`).
        options: how to run it (output directory, force, dry run, push, ...); default
            `RunOptions()`. `RunOptions.output_dir` says where the output goes.
        recipe_file: the file `recipe` was loaded from. Its text is saved beside the output
            (revisions pinned) and shown in the card; its stem names the default output directory.

    Returns:
        The plan, and where the output went (None for a dry run), with the push URL if pushed.

    Raises:
        HfMergeError: any user-facing problem, raised before weights are downloaded or output
            is written. `PushError` when only the push failed: the output is then complete.
    """
    options = options or RunOptions()
    max_memory_bytes = parse_memory_budget(options.max_memory)
    recipe_text = recipe_file.read_text(encoding="utf-8") if recipe_file is not None else None
    target = options.output_dir(recipe, recipe_file=recipe_file)
    recipe_dir = recipe_file.parent if recipe_file is not None else None  # for path hints only
    if recipe.route is not None:
        return _run_route(
            recipe, options, target=target, recipe_text=recipe_text, recipe_dir=recipe_dir
        )
    assert recipe.merge is not None
    force, progress, offline = options.force, options.progress, options.offline
    method = get_method(recipe.merge.method).with_base(recipe.base is not None)
    # A `slices:` recipe reads its base as one more model: the output takes its config.
    needs_base = method.needs_base or recipe.slices is not None
    base_entry, inputs_entries = _split_base(recipe, needs_base=needs_base)
    schedule = schedule_for(
        method, recipe.merge.parameters, [e.method_params for e in inputs_entries]
    )
    push = _check_target(target, recipe, options)
    base, inputs = _inspect(
        base_entry, inputs_entries, offline=offline, progress=progress, recipe_dir=recipe_dir
    )
    _refuse_unpermutable(recipe, [base, *inputs])
    plan, slices = _plan(
        recipe, schedule, (base_entry, base), list(zip(inputs_entries, inputs, strict=True))
    )
    from hfmerge.pipeline.vocab import plan_vocabulary, save_chat_template, save_vocabulary

    plan, vocabulary = plan_vocabulary(
        recipe,
        plan,
        [base_entry, *inputs_entries],
        max_shard_bytes=parse_size(recipe.output.max_shard_size),
        offline=offline,
    )
    if options.dry_run:
        return RunResult(plan=plan, out_dir=None)
    refuse_input_as_output(target, plan)
    plan = _download(plan, offline=offline)
    from hfmerge.pipeline.align import align_inputs
    from hfmerge.pipeline.repair import check_repair_budget

    check_repair_budget(recipe, plan, max_memory_bytes)  # before the matching and the merge
    from hfmerge.pipeline.gate import cka_gate

    cka = cka_gate(recipe, plan, force=force, progress=progress)  # before any output is written
    alignment = align_inputs(recipe, plan, progress=progress, max_memory_bytes=max_memory_bytes)
    text = pinned_recipe(recipe, recipe_text, plan.models)
    tokenizer = has_tokenizer(plan.base.source.path)  # downloaded with the base's config
    warnings = () if tokenizer else (_no_tokenizer_warning(plan.base.label, target),)
    snippet = load_snippet(base.config, push or str(target), tokenizer=tokenizer)
    card = card_params(schedule, slices, plan)
    with atomic_output_dir(target, force=force) as staging:
        execute_plan(
            plan,
            staging,
            seed=recipe.merge.seed,
            input_bases=alignment.bases,
            progress=progress,
            max_memory_bytes=max_memory_bytes,
            tuning=options.tuning,
            allow_non_finite=options.allow_non_finite,
        )
        copy_config(staging, plan, recipe, slices)
        if vocabulary is not None:
            save_vocabulary(staging, vocabulary, plan)
        if recipe.tokenizer is not None and recipe.tokenizer.chat_template is not None:
            save_chat_template(staging, plan, recipe.tokenizer.chat_template)
        repaired = _repair(
            staging,
            plan,
            recipe,
            alignment.bases,
            schedule,
            progress=progress,
            max_memory_bytes=max_memory_bytes,
        )
        write_side_files(
            staging,
            plan,
            recipe,
            title=target.name,
            recipe_text=text,
            params=card,
            repo_id=push,
            sections=[cka.card_section(), alignment.card_section(repaired)],
            tokenizer=tokenizer,
        )
    if not push:
        return RunResult(plan=plan, out_dir=target, snippet=snippet, warnings=warnings)
    keep_private = options.keep_private(recipe)
    url = push_output(target, push, private=keep_private, checked=True, method=method.name)
    return RunResult(plan=plan, out_dir=target, url=url, snippet=snippet, warnings=warnings)


def _no_tokenizer_warning(base: str, target: Path) -> str:
    return (
        f"the base {base} has no tokenizer files, so the output {target} has no tokenizer: "
        "copy the tokenizer files of the model it was trained with into it before loading one"
    )


def _check_target(target: Path, recipe: Recipe, options: RunOptions) -> str | None:
    """Fail now, not after the merge: an output in the way, or a push that cannot work.

    Returns the repo id to push to (None: no push), as the Hub normalizes it.
    """
    push = options.push_to(recipe)
    if options.dry_run:
        return push
    check_output_dir(target, force=options.force)
    return check_push(push, offline=options.offline) if push else None


def _run_route(
    recipe: Recipe,
    options: RunOptions,
    *,
    target: Path,
    recipe_text: str | None,
    recipe_dir: Path | None,
) -> RunResult:
    """The `route:` counterpart of a merge: experts pinned, router fitted, routed repo written."""
    from hfmerge.pipeline.route import build_route, download_route, plan_route

    offline, progress = options.offline, options.progress
    push = _check_target(target, recipe, options)
    plan = plan_route(recipe, offline=offline, progress=progress, recipe_dir=recipe_dir)
    if options.dry_run:
        return RunResult(plan=plan, out_dir=None)
    refuse_input_as_output(target, plan)
    plan = download_route(plan, offline=offline)
    text = pinned_recipe(recipe, recipe_text, plan.experts)
    snippet = routed_snippet(push or str(target))
    with atomic_output_dir(target, force=options.force) as staging:
        built = build_route(plan, recipe, staging, progress=progress)
        (staging / RECIPE_FILE).write_text(text, encoding="utf-8")
        card = render_routed_card(
            title=target.name,
            experts=plan.experts,
            names=plan.names,
            recipe_text=text,
            snippet=snippet,
            sections=[built.card_section],
            endpoint=hub_endpoint(plan.models),
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
    if not push:
        return RunResult(plan=plan, out_dir=target, snippet=snippet)
    keep_private = options.keep_private(recipe)
    url = push_output(target, push, private=keep_private, checked=True, method="routed")
    return RunResult(plan=plan, out_dir=target, url=url, snippet=snippet)


def _split_base(recipe: Recipe, *, needs_base: bool) -> tuple[ModelEntry, list[ModelEntry]]:
    base = recipe.base_entry()
    if not needs_base:
        return base, list(recipe.models)
    return base, [e for e in recipe.models if not e.same_model(base)]


def _inspect(
    base_entry: ModelEntry,
    entries: list[ModelEntry],
    *,
    offline: bool,
    progress: bool,
    recipe_dir: Path | None,
) -> tuple[InspectedModel, list[InspectedModel]]:
    unique = list({e.ref: e for e in [base_entry, *entries]}.values())
    refs = [(e.model, e.revision, e.lora) for e in unique]
    found = inspect_models(refs, offline=offline, progress=progress, recipe_dir=recipe_dir)
    by_ref = {e.ref: model for e, model in zip(unique, found, strict=True)}
    return by_ref[base_entry.ref], [by_ref[e.ref] for e in entries]


def _refuse_unpermutable(recipe: Recipe, models: list[InspectedModel]) -> None:
    """Steps that need permutation groups refuse a generic model before any download, and those
    without mixture-of-experts support (REPAIR) refuse MoE models."""
    from hfmerge.align.canonical import refuse_experts

    for model in models if recipe.align.repair else []:
        refuse_experts(model.spec, label=model.label, feature="`align.repair` (REPAIR)")
    features = [
        ("`align:` (permutation alignment)", recipe.align.method != "none"),
        ("`align.repair` (REPAIR)", recipe.align.repair),
        ("the CKA gate `check:`", recipe.check.cka_min is not None),
    ]
    for feature, asked in features:
        for model in models if asked else []:
            require_permutable(model.spec, label=model.label, feature=feature)


def _download(plan: MergePlan, *, offline: bool) -> MergePlan:
    """Fetch the Hub inputs' weights (the base's config and tokenizer too) and Hub adapters into
    the cache.

    Each downloaded checkpoint's headers must match the ones the plan was made from.
    """
    local: dict[int, InspectedModel] = {}
    for model in [plan.base, *plan.inputs]:
        if id(model) in local:
            continue
        fetched = _download_model(model, side_files=model is plan.base, offline=offline)
        if fetched.adapter is not None:
            fetched = replace(fetched, adapter=fetch_adapter(fetched.adapter, offline=offline))
        if fetched != model:
            local[id(model)] = fetched
    if not local:
        return plan
    return replace(
        plan,
        base=local.get(id(plan.base), plan.base),
        inputs=[local.get(id(m), m) for m in plan.inputs],
    )


def _download_model(model: InspectedModel, *, side_files: bool, offline: bool) -> InspectedModel:
    if model.source.hub_id is None:
        return model
    source = fetch_files(model.source, model.index.shards, side_files=side_files, offline=offline)
    index = read_checkpoint_index(source.path, label=model.label)
    if list(index) != list(model.index):
        raise ModelSourceError(
            model.label,
            "its downloaded weights do not match the headers read before downloading",
            "delete its folder in the HF cache and run again",
        )
    return replace(model, source=source, index=index)


def refuse_input_as_output(target: Path, plan: MergePlan | RoutePlan) -> None:
    """Refuse an output that is, holds or lies inside the folder of any model `plan` reads.

    Raises:
        OutputError: naming the output and the input model, whatever `--force` says.
    """
    adapters = [source.adapter.path for source in plan.models if source.adapter is not None]
    refuse_overlap(target, [*(source.path for source in plan.models), *adapters])


def _plan(
    recipe: Recipe,
    schedule: ParamSchedule,
    base: tuple[ModelEntry, InspectedModel],
    inputs: list[tuple[ModelEntry, InspectedModel]],
) -> tuple[MergePlan, list[PlannedSlice] | None]:
    """The merge plan, and the planned slices of a `slices:` recipe (None for `models:`)."""
    max_shard_bytes = parse_size(recipe.output.max_shard_size)
    if recipe.slices is not None:
        from hfmerge.pipeline.slices import plan_slices

        return plan_slices(
            recipe, schedule.method, base=base, inputs=inputs, max_shard_bytes=max_shard_bytes
        )
    plan = build_plan(
        schedule,
        base=base[1],
        inputs=[model for _, model in inputs],
        out_dtype=recipe.output.dtype,
        max_shard_bytes=max_shard_bytes,
    )
    return plan, None


def _repair(
    staging: Path,
    plan: MergePlan,
    recipe: Recipe,
    bases: list[BasisMap | None],
    schedule: ParamSchedule,
    *,
    progress: bool,
    max_memory_bytes: int | None,
) -> RepairReport | None:
    """`align.repair`: rescale the staged merge (a linear merge, checked with the recipe)."""
    if not recipe.align.repair:
        return None
    from hfmerge.methods.params import WeightedModelParams, as_params
    from hfmerge.pipeline.repair import repair_output

    model_params = schedule.constant_models()  # the recipe checks refuse a varying weight
    weights = [float(as_params(p, WeightedModelParams).weight) for p in model_params]
    return repair_output(
        staging, plan, recipe, bases, weights, progress=progress, max_memory_bytes=max_memory_bytes
    )
