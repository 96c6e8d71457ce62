"""The recipe's `align: {repair: true}` step: REPAIR the merged checkpoint before it is published.

Runs on the staging directory, after the engine wrote the merge and before the rename puts it in
place. The base and every aligned input are measured on the probe text (one model loaded, each
input permuted into it on read), the merged model is fitted to the merge-weighted blend of their
channel statistics, and only the tensors the factors fold into are overwritten in their shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hfmerge.align.repair import ProbeBatches, SiteRms, fit_factors, fold_factors, measure
from hfmerge.align.repair_sites import RepairSite, repair_sites
from hfmerge.arch.residual import BasisMap
from hfmerge.engine.plan import MergePlan
from hfmerge.recipe.schema import Recipe

REPAIR_BATCH = 8  # probe windows per forward pass (statistics are summed over the batches)


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
    model: PreTrainedModel,
    *,
    progress: bool,
) -> list[SiteRms]:
    """Each input's statistics in the base's basis, measured in `model` (loaded from the base)."""
    from hfmerge.analysis.interpolate import Interpolator, spec_of
    from hfmerge.progress import track

    spec = spec_of(plan.base.source.path, label=plan.base.label)
    stats = []
    for entry, solved in track(
        list(zip(plan.inputs, bases, strict=True)),
        description="repair: measuring inputs",
        enabled=progress,
    ):
        Interpolator(model, plan.base.source, entry.source).load(1.0, spec=spec, basis=solved)
        stats.append(measure(model, sites, probe))
    return stats


def _folded_tensors(
    model: PreTrainedModel, sites: list[RepairSite], staging: Path, *, label: str
) -> dict[str, torch.Tensor]:
    """Checkpoint name -> new value of every tensor a site's factor was folded into."""
    from hfmerge.lm.checkpoint_views import checkpoint_targets
    from hfmerge.tensors import read_checkpoint_index

    modules = dict(model.named_modules())
    touched = {
        p.untyped_storage().data_ptr()
        for site in sites
        for p in modules[site.module].parameters(recurse=False)
    }
    index = read_checkpoint_index(staging, label=label)
    return {
        name: tensor
        for name, tensor in checkpoint_targets(model, index, label=label).items()
        if tensor.untyped_storage().data_ptr() in touched
    }


def repair_output(
    staging: Path,
    plan: MergePlan,
    recipe: Recipe,
    bases: Sequence[BasisMap | None],
    weights: Sequence[float],
    *,
    progress: bool,
) -> RepairReport:
    """Fit REPAIR factors on the merged model in `staging` and overwrite the folded tensors."""
    from hfmerge.lm.batches import text_batches
    from hfmerge.lm.load import load_lm
    from hfmerge.tensors import overwrite_tensors

    probe = recipe.probe
    windows = text_batches(
        plan.base.source.path,
        label=plan.base.label,
        data=probe.data,
        max_length=probe.max_length,
        samples=probe.samples,
        batch_size=REPAIR_BATCH,
    )
    base = plan.base.source
    model = load_lm(base.path, label=base.label, adapter=base.adapter_path)
    sites = repair_sites(model)
    target = _blend(_input_stats(plan, bases, sites, windows, model, progress=progress), weights)
    del model
    merged = load_lm(staging, label=str(staging))
    factors, passes = fit_factors(merged, sites, windows, target)
    fold_factors(merged, sites, factors)
    overwrite_tensors(
        staging, _folded_tensors(merged, sites, staging, label=str(staging)), label=str(staging)
    )
    values = torch.cat(list(factors.values()))
    return RepairReport(
        len(sites), len(values), float(values.min()), float(values.max()), probe.data, passes
    )


__all__ = ["RepairReport", "repair_output"]
