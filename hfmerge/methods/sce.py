"""SCE (Select, Calculate, Erase): merge task vectors entry by entry, keeping the entries where
the models disagree most, weighting each model by its task vector's energy, and dropping the
entries whose sign opposes the elected one.

- Select: with `select_topk` < 1, only that fraction of the entries whose variance across the
  models is non-zero, those of highest variance, are kept (in every task vector); the rest are 0.
- Calculate: model i's weight is the mean square of its selected task vector, over their sum
  (equal weights when the sum is below ZERO_ENERGY).
- Erase: each entry's sign is that of the summed task vectors (+ at 0); a model's entry with
  another sign (or 0) is left out.
The result is the base plus, per entry, the weighted mean of the task vectors' kept entries.
Behaviour follows mergekit's `sce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.gta_sum import sum_of
from hfmerge.methods.params import Fraction, MethodParams, ModelParams, as_params

ZERO_ENERGY = 1e-6  # summed energies below this: the models weigh the same (mergekit's threshold)
WEIGHT_FLOOR = 1e-6  # an entry's kept weight total is counted as at least this (mergekit's)


class SceParams(MethodParams):
    """Global parameters of `sce`."""

    select_topk: Fraction = Field(
        1.0, description="fraction of the varying entries kept, those varying most across models"
    )


def sce_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`base + sum_i w_i m_i d_i / sum_i w_i m_i`, d_i the selected task vectors, w_i their
    energy weights and m_i the sign-agreement masks.

    One task vector at a time past the selection: the inputs' size plus about five tensors of
    float32 at the peak, within the engine's workspace budget for whole-tensor merges.
    """
    anchor = require_base(base, "sce")
    keep = as_params(params, SceParams).select_topk
    deltas = [x - anchor for x in tensors]
    if keep < 1:
        mask = _high_variance_mask(deltas, keep)
        for delta in deltas:
            delta.mul_(mask)
        del mask
    elected = sum_of(deltas).ge_(0).float().mul_(2).sub_(1)  # +1 where the sum is >= 0, else -1
    total = torch.zeros_like(anchor)
    kept_weight = torch.zeros_like(anchor)
    for delta, weight in zip(deltas, _energy_weights(deltas).tolist(), strict=True):
        # The model's weight where its entry has the elected sign, else 0 (erased).
        kept = torch.eq(delta.sign(), elected).float().mul_(weight)
        total.addcmul_(delta, kept)
        kept_weight.add_(kept)
    return total.div_(kept_weight.clamp_(min=WEIGHT_FLOOR)).add_(anchor)


def _high_variance_mask(deltas: Sequence[torch.Tensor], keep: float) -> torch.Tensor:
    """[*shape] float32: 1 at the `keep` fraction of the entries with non-zero variance across the
    models that vary most, else 0."""
    variance = torch.stack(list(deltas)).var(dim=0, correction=0)  # N x [*shape] -> [*shape]
    # The count is taken in float32 (an integer tensor times a float), as mergekit takes it.
    count = int(torch.count_nonzero(variance) * keep)
    mask = torch.zeros_like(variance)
    if count > 0:
        mask.view(-1)[torch.topk(variance.flatten(), k=count).indices] = 1
    return mask


def _energy_weights(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N]: each task vector's mean square over their sum; equal when that sum is about 0."""
    energies = torch.stack([delta.square().mean() for delta in deltas])
    total = float(energies.sum())
    if abs(total) < ZERO_ENERGY:
        return torch.full_like(energies, 1.0 / energies.shape[0])
    return energies / total


SCE = MergeMethod(
    name="sce",
    summary="Keep the entries varying most, weight models by energy, drop opposed signs.",
    paper="https://arxiv.org/abs/2408.07990",
    params=SceParams,
    model_params=ModelParams,
    fn=sce_merge,
)
