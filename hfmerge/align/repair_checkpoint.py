"""REPAIR's factors folded into a checkpoint on disk, tensor by tensor.

The fit may run on a model whose layers are mostly offloaded to disk (`--max-memory`), so the
factors are not folded into the loaded model: each tensor a site's factor folds into is read from
the checkpoint by name, scaled in float32 (the dtype the fit's model ran in), and written back over
its own bytes in its own dtype (`tensors.overwrite_tensors`); no other tensor is touched. Module
names map to checkpoint names through transformers' save-time conversion, read off a skeleton on
the meta device (`lm.checkpoint_views.loaded_names`), so no weight is loaded for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from hfmerge.align.repair import Factors, fold_axes, folded
from hfmerge.align.repair_sites import RepairSite
from hfmerge.lm.checkpoint_views import loaded_names
from hfmerge.tensors import LazyCheckpoint, overwrite_tensors


def folded_tensors(
    skeleton: PreTrainedModel,
    sites: Sequence[RepairSite],
    factors: Factors,
    read: Callable[[str], torch.Tensor],
    *,
    label: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, new float32 value) of every tensor a site's factor folds into, each
    yielded once the last site that folds into it has: only tensors still awaiting a later site
    are held, not the whole set (most of a model's matrices).

    `skeleton`: the model's modules (any device, meta included); `read`: one checkpoint tensor by
    name. Sites that share a tensor fold into it in turn, as folding into a loaded model would.
    """
    file_name = {state: file for file, state in loaded_names(skeleton, label=label).items()}
    modules = dict(skeleton.named_modules())
    folds = [
        (file_name[f"{site.module}.{part}"], part, dim, site)
        for site in sites
        if site.module in factors
        for part, dim in _fold_parts(modules[site.module], site)
    ]
    last = {name: number for number, (name, *_fold) in enumerate(folds)}
    pending: dict[str, torch.Tensor] = {}
    for number, (name, part, dim, site) in enumerate(folds):
        current = pending.pop(name) if name in pending else read(name).float()
        gain = part == "weight" and current.dim() == 1
        value = folded(current, dim, site, factors[site.module], gain=gain)
        if last[name] == number:
            yield name, value
        else:
            pending[name] = value


def _fold_parts(module: nn.Module, site: RepairSite) -> list[tuple[str, int]]:
    """(parameter, axis) pairs a site's factor folds into: the weight, and the bias with it."""
    axis, with_bias = fold_axes(module, site)
    parts = [("weight", axis)]
    if with_bias and isinstance(getattr(module, "bias", None), torch.Tensor):
        parts.append(("bias", 0))
    return parts


def fold_into_checkpoint(
    folder: Path,
    skeleton: PreTrainedModel,
    sites: Sequence[RepairSite],
    factors: Factors,
    *,
    label: str,
) -> None:
    """Fold `factors` into the checkpoint in `folder` in place (a staging folder: a crash mid-way
    would leave some tensors folded and others not)."""
    with LazyCheckpoint(folder, label=label) as reader:
        values = folded_tensors(skeleton, sites, factors, reader.get, label=label)
        overwrite_tensors(folder, values, label=label)


__all__ = ["fold_into_checkpoint", "folded_tensors"]
