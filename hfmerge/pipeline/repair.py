"""The recipe's `align: {repair: true}` step: REPAIR the merged checkpoint before it is published.

Runs on the staging directory, after the engine wrote the merge and before the rename puts it in
place. The base and every aligned input are measured on the probe text (one model loaded, each
input read into it through its map), the merged model is fitted to the merge-weighted blend of
their channel statistics, and only the tensors the factors fold into are overwritten in their
shards (`align/repair_checkpoint.py`).

With `--max-memory`, the plan (`lm.placement.plan_placement`, from the configs and headers) says
whether one model fits whole beside a probe batch's forward pass. If not, each model loads with the
layers that do not fit offloaded to a temporary folder, and an input read through a map is first
written there in the base's basis (`analysis.interpolate.write_point`): accelerate places a
checkpoint, not a model whose weights are written after loading.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hfmerge.align.repair import ProbeBatches, SiteRms, fit_factors, measure
from hfmerge.align.repair_checkpoint import fold_into_checkpoint
from hfmerge.align.repair_sites import RepairSite, repair_sites
from hfmerge.align.weights import F64
from hfmerge.arch.residual import BasisMap
from hfmerge.engine.plan import MergePlan
from hfmerge.lm.placement import Footprint, ProbePlacement, forward_bytes, plan_placement
from hfmerge.lm.probe_time import ProbeText, announce_probe
from hfmerge.recipe.schema import Recipe
from hfmerge.tensors.malloc import return_freed_blocks, trim_heap

REPAIR_BATCH = 8  # probe windows per forward pass (statistics are summed over the batches)
# The most REPAIR sites one block has (Gemma 3: four norms, q and k norms, two projection inputs).
SITES_PER_BLOCK = 8


@dataclass(frozen=True)
class RepairReport:
    """What REPAIR changed, for the model card."""

    sites: int
    factors: int  # channel groups rescaled
    smallest: float
    largest: float
    probe: str
    passes: int  # passes over the probe batches the fit took

    def card_lines(self) -> list[str]:
        """Markdown lines for the card's alignment section."""
        return [
            "",
            f"Then **REPAIR** (https://arxiv.org/abs/2211.08403) rescaled {self.factors} "
            f"channel groups at {self.sites} sites (norm outputs, queries and keys per RoPE "
            "pair, attention and FF output-projection inputs) to the merge-weighted blend of "
            f"the inputs' statistics on `{self.probe}`; factors ranged from "
            f"{self.smallest:.3f} to {self.largest:.3f} ({self.passes} fit passes over the probe).",
        ]


def _blend(stats: Sequence[SiteRms], weights: Sequence[float]) -> SiteRms:
    """Σ wᵢ·rmsᵢ per site with the weights normalised to sum to 1."""
    total = sum(weights)
    blended: SiteRms = {}
    for site in stats[0]:
        parts = [(w / total) * s[site] for s, w in zip(stats, weights, strict=True)]
        blended[site] = torch.stack(parts).sum(0)  # [models, factors] -> [factors]
    return blended


def _input_stats(
    plan: MergePlan,
    bases: Sequence[BasisMap | None],
    sites: list[RepairSite],
    probe: ProbeBatches,
    *,
    progress: bool,
) -> list[SiteRms]:
    """Each input's statistics in the base's basis, measured in one model loaded from the base."""
    from hfmerge.analysis.interpolate import Interpolator, spec_of
    from hfmerge.lm.load import load_lm
    from hfmerge.progress import track

    base = plan.base.source
    model = load_lm(base.path, label=base.label, adapter=base.adapter_path)
    spec = spec_of(base.path, label=plan.base.label)
    stats = []
    for entry, solved in track(
        list(zip(plan.inputs, bases, strict=True)),
        description="repair: measuring inputs",
        enabled=progress,
    ):
        Interpolator(model, base, entry.source).load(1.0, spec=spec, basis=solved)
        stats.append(measure(model, sites, probe))
    return stats


def _input_stats_placed(
    plan: MergePlan,
    bases: Sequence[BasisMap | None],
    sites: list[RepairSite],
    probe: ProbeBatches,
    placement: ProbePlacement,
    scratch: Path,
    *,
    shard_bytes: int,
    progress: bool,
) -> list[SiteRms]:
    """`_input_stats` with each input loaded on its own, placed by accelerate (layers offloaded to
    `scratch`): an input read through a map is first written there in the base's basis, in shards
    of at most `shard_bytes` (the plan counts the largest shard as resident while it loads)."""
    from hfmerge.analysis.interpolate import spec_of, write_point
    from hfmerge.lm.load import load_lm

    base = plan.base.source
    spec = spec_of(base.path, label=plan.base.label)
    stats = []
    for number, (entry, solved) in enumerate(zip(plan.inputs, bases, strict=True)):
        source = entry.source
        folder, adapter = source.path, source.adapter_path
        if solved is not None or adapter is not None:
            folder, adapter = scratch / f"input-{number}", None
            write_point(
                base,
                source,
                1.0,
                folder,
                spec=spec,
                basis=solved,
                max_shard_bytes=shard_bytes,
                progress=progress,
            )
        model = load_lm(
            folder,
            label=source.label,
            adapter=adapter,
            device_map=placement.device_map,
            max_memory=placement.max_memory,
            offload_folder=scratch / "offload",
        )
        stats.append(measure(model, sites, probe))
        del model
        trim_heap()
        if folder != source.path:
            shutil.rmtree(folder)
    return stats


def repair_working_bytes(path: Path, *, label: str, inputs: int, length: int) -> int:
    """Host bytes REPAIR holds beside a model shaped like the one in `path`: one probe batch's
    forward pass (windows of `length` tokens) and the statistics of `inputs` inputs."""
    from hfmerge.lm.load import load_config

    config = load_config(path, label=label)
    widest = max(int(config.hidden_size), int(getattr(config, "intermediate_size", 0) or 0))
    sites = SITES_PER_BLOCK * int(config.num_hidden_layers) + 1
    # Per site: each input's float64 RMS per channel, and the fit's sums and factors (a few more).
    stats = F64 * sites * widest * (inputs + 4)
    return forward_bytes([config], batch_size=REPAIR_BATCH, length=length) + stats


def repair_placement(
    path: Path, *, label: str, inputs: int, budget: int, length: int
) -> ProbePlacement:
    """Where REPAIR's one model at a time goes within `budget` bytes of host memory, for models
    shaped like the one in `path`: whole, or with the layers that do not fit beside one probe
    batch's forward pass (windows of `length` tokens) offloaded to disk.

    Raises:
        HfMergeError: the budget cannot hold one model even with its layers on disk.
    """
    footprint = Footprint.of(path, label=label)
    return plan_placement(
        (footprint, footprint),
        budget=budget,
        device_map="auto",
        working=repair_working_bytes(path, label=label, inputs=inputs, length=length),
        kept=0,
        shrink="fewer `probe.samples` or a shorter `probe.max_length`",
    )


def check_repair_budget(recipe: Recipe, plan: MergePlan, max_memory_bytes: int | None) -> None:
    """Refuse a `--max-memory` that REPAIR could not work within (`repair_placement` on the
    downloaded base, whose shapes the merge has), before anything long runs."""
    if not recipe.align.repair or max_memory_bytes is None:
        return
    base = plan.base
    repair_placement(
        base.source.path,
        label=base.label,
        inputs=len(plan.inputs),
        budget=max_memory_bytes,
        length=recipe.probe.max_length,
    )


def repair_output(
    staging: Path,
    plan: MergePlan,
    recipe: Recipe,
    bases: Sequence[BasisMap | None],
    weights: Sequence[float],
    *,
    progress: bool,
    max_memory_bytes: int | None = None,
) -> RepairReport:
    """Fit REPAIR factors on the merged model in `staging` and overwrite the folded tensors.

    One model is held at a time (the base holding each input in turn, then the merge); within
    `max_memory_bytes` of host memory when given, each loads with the layers that do not fit
    offloaded to a temporary folder on disk.
    """
    from hfmerge.lm.batches import text_batches
    from hfmerge.lm.load import empty_model, lm_class, load_lm

    probe = recipe.probe
    windows = text_batches(
        plan.base.source.path,
        label=plan.base.label,
        data=probe.data,
        max_length=probe.max_length,
        samples=probe.samples,
        batch_size=REPAIR_BATCH,
    )
    label = str(staging)
    skeleton = empty_model(lm_class(staging, label=label), staging, label=label)
    sites = repair_sites(skeleton)
    placement = ProbePlacement("auto", None)
    if max_memory_bytes is not None:
        placement = repair_placement(
            staging,
            label=label,
            inputs=len(plan.inputs),
            budget=max_memory_bytes,
            length=probe.max_length,
        )
        if progress:
            announce_probe(
                placement,
                "repair",
                budget=max_memory_bytes,
                path=staging,
                label=label,
                text=ProbeText.of(windows),
                passes=len(plan.inputs) + 1,  # each input measured, then one fit pass at least
            )
    with tempfile.TemporaryDirectory(prefix="hfmerge-repair-") as scratch:
        if placement.offload:
            # Offloaded layers come and go as float32 blocks; the merge before this step told
            # glibc to keep such blocks (tensors/malloc.py), which would hold every layer.
            return_freed_blocks()
            measured = _input_stats_placed(
                plan,
                bases,
                sites,
                windows,
                placement,
                Path(scratch),
                shard_bytes=Footprint.of(staging, label=label).largest_shard,
                progress=progress,
            )
        else:
            measured = _input_stats(plan, bases, sites, windows, progress=progress)
        trim_heap()
        target = _blend(measured, weights)
        merged = load_lm(
            staging,
            label=label,
            device_map=placement.device_map if placement.offload else None,
            max_memory=placement.max_memory,
            offload_folder=Path(scratch) / "offload",
        )
        factors, passes = fit_factors(merged, sites, windows, target)
        del merged
    fold_into_checkpoint(staging, skeleton, sites, factors, label=label)
    values = torch.cat(list(factors.values()))
    return RepairReport(
        len(sites), len(values), float(values.min()), float(values.max()), probe.data, passes
    )


__all__ = [
    "RepairReport",
    "check_repair_budget",
    "repair_output",
    "repair_placement",
    "repair_working_bytes",
]
