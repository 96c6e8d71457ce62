"""Fit a router on each expert's calibration texts: windows -> features (or losses) -> router.

Models load one at a time: the backbone for feature routers, each expert in turn for the
perplexity router, so peak memory is one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from hfmerge.errors import RoutingError
from hfmerge.lm.batches import pad_id_of, probe_batches
from hfmerge.lm.load import load_probe_model, load_tokenizer, position_limit
from hfmerge.lm.placement import DeviceMap
from hfmerge.lm.textdata import token_windows
from hfmerge.progress import track
from hfmerge.recipe.schema import ProbeSpec, RouteSpec
from hfmerge.routing.calibration import CalibrationReport, calibration_report
from hfmerge.routing.features import check_layer, default_layer, num_blocks, window_features
from hfmerge.routing.losses import sequence_losses
from hfmerge.routing.manifest import BackboneRef, ExpertEntry, RoutedManifest, RouterSpec
from hfmerge.routing.placement import PooledModel, load_causal_lm, load_dtype
from hfmerge.routing.routers import Router, RouterSettings, router_class
from hfmerge.routing.vocab import (
    check_expert_vocabularies,
    check_tokenizer_fits,
    common_usable_length,
)


@dataclass(frozen=True)
class BuiltRouter:
    """A fitted router and what a manifest needs to serve it the same way."""

    router: Router
    report: CalibrationReport
    layer: int | None  # backbone block whose output is pooled; None for perplexity
    max_length: int  # calibration window length, also the router's input limit


def build_router(
    route: RouteSpec,
    probe: ProbeSpec,
    *,
    experts: Sequence[Path],
    backbone: Path | None,
    calibration_texts: Sequence[Sequence[str]],
    names: Sequence[str] | None = None,
    batch_size: int = 16,
    device_map: DeviceMap | None = None,
    progress: bool = False,
    adapters: Sequence[Path | None] | None = None,
    backbone_adapter: Path | None = None,
) -> BuiltRouter:
    """Tokenize each expert's texts with the router tokenizer, pool features, fit the router.

    Args:
        route: the recipe's `route:` section: router method, layer, temperature,
            min_confidence, default_expert and seed (its `experts` and `bundle` are read by the
            caller, which loads the texts and writes the repo).
        probe: the recipe's `probe:` section: `samples` caps the windows per expert and
            `max_length` their tokens (capped at the models' position limits). Its `data` and
            `device_map` are not used: calibration text is per expert, placement is `device_map`.
        experts: each expert's model folder.
        backbone: the router backbone's folder (an expert's, or another model sharing their
            tokenizer); the perplexity router needs none and tokenizes with the first expert's
            tokenizer.
        calibration_texts: one list of texts per expert, in `experts` order.
        names: the experts' names (default `expert0`, `expert1`, ...), for reports and errors.
        batch_size: windows per forward pass.
        device_map: where the models load (None: transformers' default, the CPU).
        progress: draw progress bars on stderr.
        adapters: each expert's LoRA adapter folder, or None (default: none): an expert with
            one is its folder in `experts` (the base) with the adapter applied.
        backbone_adapter: the backbone's LoRA adapter folder (an adapter expert as backbone).

    Returns:
        The fitted router with its calibration report, layer and window length.

    Raises:
        RoutingError: fewer than two experts, texts not one list per expert, a bad layer.
        IncompatibleModelsError: the experts do not share the router tokenizer's vocabulary.
    """
    cls = router_class(route.method)
    names = list(names or [f"expert{i}" for i in range(len(experts))])
    _check_inputs(experts, calibration_texts, names)
    settings = RouterSettings(
        cls.default_temperature if route.temperature is None else route.temperature,
        route.min_confidence,
        route.default_expert,
    )
    settings.check(len(experts))
    expert_paths = dict(zip(names, experts, strict=True))
    check_expert_vocabularies(expert_paths)
    tokenizer_path = experts[0] if backbone is None or cls.inputs == "losses" else backbone
    tokenizer = load_tokenizer(tokenizer_path, label=str(tokenizer_path))
    check_tokenizer_fits(tokenizer, expert_paths, tokenizer_label=str(tokenizer_path))
    # `max_length` is an upper bound, as for probing: models with fewer positions cap it.
    max_length = common_usable_length(
        [*experts, *([backbone] if backbone else [])], probe.max_length
    )
    windows, labels = _windows(
        tokenizer, calibration_texts, samples=probe.samples, max_length=max_length
    )
    if cls.inputs == "losses":
        inputs = _loss_inputs(
            list(zip(experts, adapters or [None] * len(experts), strict=True)),
            windows,
            tokenizer,
            batch_size=batch_size,
            device_map=device_map,
            progress=progress,
        )
        used_layer = None
    else:
        if backbone is None:
            raise RoutingError(
                f"the {route.method} router needs a backbone model for its features",
                fix="name the router backbone (an expert or a shared base)",
            )
        inputs, used_layer = _feature_inputs(
            (backbone, backbone_adapter),
            windows,
            tokenizer,
            layer=route.layer,
            batch_size=batch_size,
            device_map=device_map,
        )
    seed = route.seed
    report = calibration_report(cls, inputs, labels, experts=names, settings=settings, seed=seed)
    router = cls.fit(inputs, labels, num_experts=len(experts), settings=settings, seed=seed)
    return BuiltRouter(router, report, used_layer, max_length)


def _check_inputs(
    experts: Sequence[Path], texts: Sequence[Sequence[str]], names: Sequence[str]
) -> None:
    if len(experts) < 2:
        raise RoutingError(
            f"routing needs at least 2 experts, got {len(experts)}", fix="list two or more models"
        )
    if len(texts) != len(experts) or len(names) != len(experts):
        raise RoutingError(
            f"{len(experts)} experts but {len(texts)} calibration text lists and "
            f"{len(names)} names",
            fix="give one calibration text list per expert",
        )
    empty = [name for name, ts in zip(names, texts, strict=True) if not any(t.strip() for t in ts)]
    if empty:
        raise RoutingError(
            f"experts {', '.join(empty)} have no calibration text",
            fix="give every expert some text typical of its inputs",
        )


def _windows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[Sequence[str]],
    *,
    samples: int | None,
    max_length: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every expert's calibration windows, concatenated, and each window's expert index [n]."""
    windows: list[torch.Tensor] = []
    labels: list[int] = []
    for expert, expert_texts in enumerate(texts):
        mine = token_windows(tokenizer, expert_texts, max_length=max_length, samples=samples)
        windows += mine
        labels += [expert] * len(mine)
    return windows, torch.tensor(labels, dtype=torch.long)


def _feature_inputs(
    backbone_with_adapter: tuple[Path, Path | None],
    windows: Sequence[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    *,
    layer: int | None,
    batch_size: int,
    device_map: DeviceMap | None,
) -> tuple[torch.Tensor, int]:
    """[n, d] pooled features of the windows at `layer` (default: ~2/3 depth), and the layer."""
    # The dtype the serving side loads it in (`auto`), so features match at serve time.
    backbone, adapter = backbone_with_adapter
    dtype = load_dtype(PooledModel("backbone", backbone))
    model = load_probe_model(
        backbone, label=str(backbone), device_map=device_map, dtype=dtype, adapter=adapter
    )
    used = default_layer(num_blocks(model)) if layer is None else layer
    check_layer(model, used)
    limit = position_limit(model.config)
    if limit is not None and max(len(w) for w in windows) > limit:
        raise RoutingError(
            f"calibration windows are longer than the backbone's {limit} positions",
            fix=f"use max_length {limit} or less",
        )
    features = window_features(
        model, windows, layer=used, pad_id=pad_id_of(tokenizer), batch_size=batch_size
    )
    return features, used


def _loss_inputs(
    experts: Sequence[tuple[Path, Path | None]],
    windows: Sequence[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    device_map: DeviceMap | None,
    progress: bool,
) -> torch.Tensor:
    """[n, E]: each expert's mean token loss on each window, one expert in memory at a time;
    an expert is (model folder, LoRA adapter folder or None)."""
    batches = probe_batches(windows, tokenizer, batch_size=batch_size)
    columns = []
    for path, adapter in track(
        experts, description="scoring calibration windows", enabled=progress
    ):
        model = load_causal_lm(
            path,
            label=str(path),
            dtype=load_dtype(PooledModel(str(path), path)),
            device_map=device_map,
            max_memory=None,
            adapter=adapter,
        )
        columns.append(
            torch.cat(
                [sequence_losses(model, b["input_ids"], b["attention_mask"]) for b in batches]
            )
        )
        del model  # before the next expert loads
    return torch.stack(columns, dim=1)  # E x [n] -> [n, E]


def routed_manifest(
    built: BuiltRouter, experts: Sequence[ExpertEntry], *, backbone: BackboneRef | None
) -> RoutedManifest:
    """The manifest that serves `built` over `experts` (same order as at build time)."""
    names = [expert.name for expert in experts]
    settings = built.router.settings
    default = None if settings.default_expert is None else names[settings.default_expert]
    spec = RouterSpec(
        type=built.router.name,
        backbone=backbone if built.router.inputs == "features" else None,
        layer=built.layer,
        max_length=built.max_length,
        temperature=settings.temperature,
        min_confidence=settings.min_confidence,
        default_expert=default,
    )
    return RoutedManifest(tuple(experts), spec, built.report.to_json())


__all__ = ["BuiltRouter", "build_router", "routed_manifest"]
