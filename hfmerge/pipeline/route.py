"""The `route:` side of a recipe: pin the experts, fit the router, write the routed repo.

Every check that can fail (calibration text, references, names) runs in `plan_route`, before any
weight is downloaded; `build_route` then downloads, fits and writes into a staging folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hfmerge.errors import RoutingError
from hfmerge.lm.textdata import describe_data, load_texts
from hfmerge.recipe.schema import Recipe
from hfmerge.sources.inspection import inspect_model, refuse_unpermutable
from hfmerge.sources.refs import ModelSource, download_pinned, pin_model
from hfmerge.tensors import read_checkpoint_index

if TYPE_CHECKING:  # hfmerge.routing imports transformers; it loads when a route is built
    from hfmerge.routing import BuiltRouter, ExpertEntry, ModelLocation

_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RoutePlan:
    """What a route recipe will build: pinned experts, their names and calibration text."""

    method: str
    experts: list[ModelSource]
    names: list[str]
    calibration: list[list[str]]  # texts per expert, same order
    calibration_names: list[str]  # where they came from, for the card
    backbone: ModelSource | None  # a router backbone that is not one of the experts
    backbone_expert: str | None  # or the expert that serves as the backbone
    bundle: bool

    @property
    def models(self) -> list[ModelSource]:
        """Every model the routed repo serves: the experts, then a separate backbone."""
        return [*self.experts, *([self.backbone] if self.backbone is not None else [])]

    def describe(self) -> str:
        """The plan as a few lines (what `--dry-run` prints)."""
        lines = [
            f"route: {self.method} router over {len(self.experts)} experts "
            f"({'bundled' if self.bundle else 'referenced by pinned Hub revision'})"
        ]
        for name, source, data in zip(
            self.names, self.experts, self.calibration_names, strict=True
        ):
            lines.append(f"  expert {name}: {_shown(source, pins=True)}, calibration {data}")
        if self.backbone is not None:
            lines.append(f"  router backbone: {self.backbone.ref}")
        elif self.backbone_expert is not None:
            lines.append(f"  router backbone: expert {self.backbone_expert}")
        return "\n".join(lines)


def _shown(source: ModelSource, *, pins: bool) -> str:
    """A model as plans and cards show it: its Hub id (with its pinned sha when `pins`) or its
    reference; a model with an adapter as `BASE+ADAPTER`, each shown so."""
    if source.adapter is not None:
        adapter = _shown(source.adapter, pins=pins)
        return f"{_shown(source.without_adapter, pins=pins)}+{adapter}"
    if source.hub_id is None:
        return source.ref
    return f"{source.hub_id}@{source.revision}" if pins else source.hub_id


def expert_names(refs: Sequence[str]) -> list[str]:
    """Short, unique, path-safe names: `zoo:code` -> code, `org/model@rev` -> model."""
    names: list[str] = []
    for ref in refs:
        stem = ref.split("@", 1)[0].rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
        name = _NAME_CHARS.sub("-", stem).strip("-.") or "expert"
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}-{k}", k + 1
        names.append(unique)
    return names


def plan_route(
    recipe: Recipe, *, offline: bool, progress: bool, recipe_dir: Path | None = None
) -> RoutePlan:
    """Read the calibration text and pin every model; nothing is downloaded but configs.

    `recipe_dir` is the recipe file's folder, for hints about relative paths (`pin_model`).

    Raises:
        InputDataError: a calibration file is missing, unreadable or empty.
        ModelSourceError, HubError: a model reference cannot be resolved.
    """
    route = recipe.route
    assert route is not None
    calibration = [load_texts(expert.data) for expert in route.experts]  # bad input first
    experts = [
        pin_model(
            e.model,
            revision=e.revision,
            lora=e.lora,
            offline=offline,
            progress=progress,
            recipe_dir=recipe_dir,
        )
        for e in recipe.models
    ]
    for source in experts:
        if source.adapter is not None:  # checked against its base from headers, as for a merge
            inspect_model(source, offline=offline)
        elif source.hub_id is None:  # local: refuse pickle-only or weightless folders now
            read_checkpoint_index(source.path, label=source.label)
    names = expert_names([e.lora or e.model for e in recipe.models])  # an adapter names its own
    backbone, backbone_expert = None, None
    if route.method != "perplexity":
        base = recipe.base_entry()
        refs = [e.ref for e in recipe.models]
        if base.ref in refs:
            backbone_expert = names[refs.index(base.ref)]
            reader = experts[refs.index(base.ref)]
        else:
            if base.lora is not None:
                raise RoutingError(
                    f"the router backbone {base.ref} has a LoRA adapter but is not an expert",
                    fix="name the adapter model as one of the experts too, or give a plain "
                    "`base:` (such as the adapters' base)",
                )
            backbone = reader = pin_model(
                base.model,
                revision=base.revision,
                offline=offline,
                progress=progress,
                recipe_dir=recipe_dir,
            )
        # a centroid or logistic router reads the backbone's blocks: configs and headers only
        refuse_unpermutable([reader], feature="a `route:` router backbone", offline=offline)
    off_hub = any(s.hub_id is None for s in [*experts, backbone] if s is not None)
    bundle = off_hub if route.bundle is None else route.bundle  # default: bundle what must be
    return RoutePlan(
        route.method,
        experts,
        names,
        calibration,
        [describe_data(e.data) for e in route.experts],
        backbone,
        backbone_expert,
        bundle,
    )


def download_route(plan: RoutePlan, *, offline: bool) -> RoutePlan:
    """Fetch every Hub model's weights, config and tokenizer into the HF cache."""
    backbone = None if plan.backbone is None else download_pinned(plan.backbone, offline=offline)
    return replace(
        plan, experts=[download_pinned(s, offline=offline) for s in plan.experts], backbone=backbone
    )


@dataclass(frozen=True)
class BuiltRoute:
    """The routed repo's content, written into a staging folder, and its calibration report."""

    heldout_accuracy: float | None
    card_section: str


def build_route(plan: RoutePlan, recipe: Recipe, staging: Path, *, progress: bool) -> BuiltRoute:
    """Fit the router on the calibration text and write manifest, router tensors and bundles."""
    from hfmerge.routing import (
        BackboneRef,
        ModelLocation,
        build_router,
        routed_manifest,
        write_routed_repo,
    )
    from hfmerge.routing.adapters import read_expert_adapter

    route = recipe.route
    assert route is not None
    for name, source in zip(plan.names, plan.experts, strict=True):
        if source.adapter is not None:  # one it cannot serve is refused now, not when served
            read_expert_adapter(name, source.path, source.adapter.path)
    paths = [s.path for s in plan.experts]
    backbone_path = plan.backbone.path if plan.backbone is not None else None
    backbone_adapter = None
    if plan.backbone_expert is not None:
        backbone_path = paths[plan.names.index(plan.backbone_expert)]
        backbone_adapter = plan.experts[plan.names.index(plan.backbone_expert)].adapter_path
    built = build_router(
        route,
        recipe.probe,
        experts=paths,
        backbone=backbone_path,
        calibration_texts=plan.calibration,
        names=plan.names,
        progress=progress,
        adapters=[s.adapter_path for s in plan.experts],
        backbone_adapter=backbone_adapter,
    )

    def location(source: ModelSource, folder: str) -> ModelLocation:
        if plan.bundle or source.hub_id is None:
            return ModelLocation(path=folder)
        return ModelLocation(repo_id=source.hub_id, revision=source.revision)

    bases = _base_folders(plan.experts)
    experts = [
        _expert_entry(name, source, bases, location)
        for name, source in zip(plan.names, plan.experts, strict=True)
    ]
    backbone_ref = None
    if plan.backbone_expert is not None:
        backbone_ref = BackboneRef(expert=plan.backbone_expert)
    elif plan.backbone is not None:  # the adapters' own base is not loaded twice to serve
        folder = bases.get(plan.backbone.path, "backbone")
        backbone_ref = BackboneRef(location=location(plan.backbone, folder))
    manifest = routed_manifest(built, experts, backbone=backbone_ref)
    write_routed_repo(
        staging,
        manifest,
        built.router,
        bundle_sources={n: s.path for n, s in zip(plan.names, plan.experts, strict=True)},
        backbone_source=plan.backbone.path if plan.backbone is not None else None,
        adapter_sources={
            n: s.adapter.path
            for n, s in zip(plan.names, plan.experts, strict=True)
            if s.adapter is not None
        },
    )
    return BuiltRoute(built.report.heldout_accuracy, _card_section(plan, built))


def _base_folders(experts: Sequence[ModelSource]) -> dict[Path, str]:
    """Where each adapter expert's base is bundled: `bases/<name>`, once per base folder."""
    from hfmerge.routing.manifest import BASES_DIR

    bases: dict[Path, str] = {}
    adapted = [s for s in experts if s.adapter is not None]
    unique = dict.fromkeys(s.path for s in adapted)
    refs = {s.path: s.without_adapter.ref for s in adapted}
    for path, name in zip(unique, expert_names([refs[p] for p in unique]), strict=True):
        bases[path] = f"{BASES_DIR}/{name}"
    return bases


def _expert_entry(
    name: str,
    source: ModelSource,
    bases: dict[Path, str],
    location: Callable[[ModelSource, str], ModelLocation],
) -> ExpertEntry:
    """The manifest entry of one expert: its model, or its base and its adapter."""
    from hfmerge.routing import ExpertEntry
    from hfmerge.routing.manifest import EXPERTS_DIR

    if source.adapter is None:
        return ExpertEntry(name, location(source, f"{EXPERTS_DIR}/{name}"))
    base = location(source.without_adapter, bases[source.path])
    return ExpertEntry(name, base, adapter=location(source.adapter, f"{EXPERTS_DIR}/{name}"))


def _card_section(plan: RoutePlan, built: BuiltRouter) -> str:
    report = built.report
    rows = ["| expert | model | calibration | windows | held-out recall |", "|---|---|---|---|---|"]
    for k, (name, source) in enumerate(zip(plan.names, plan.experts, strict=True)):
        recall = report.expert_accuracy[k]
        shown = "–" if recall is None else f"{recall:.1%}"
        pinned = f" @ `{source.revision[:12]}`" if source.revision and not source.adapter else ""
        rows.append(
            f"| `{name}` | `{_shown(source, pins=False)}`{pinned} | {plan.calibration_names[k]} | "
            f"{report.samples[k]} | {shown} |"
        )
    settings = built.router.settings
    lines = [
        f"- router: `{built.router.name}`, layer {built.layer}, "
        f"temperature {settings.temperature}, windows of {built.max_length} tokens"
    ]
    if report.heldout_accuracy is not None:
        lines.append(
            f"- held-out routing accuracy on calibration text: "
            f"{report.heldout_accuracy:.1%} ({report.heldout_samples} windows)"
        )
    lines += [f"- warning: {w}" for w in report.warnings]
    return (
        "## Routing\n\nEach input sequence goes to one whole expert, chosen from the "
        "router backbone's pooled hidden state.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines)
    )


__all__ = ["BuiltRoute", "RoutePlan", "build_route", "download_route", "expert_names", "plan_route"]
