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
    energy weights and m_i the sign-agreement masks."""
    anchor = require_base(base, "sce")
    keep = as_params(params, SceParams).select_topk
    deltas = torch.stack([x - anchor for x in tensors])  # N x [*shape] -> [N, *shape]
    if keep < 1:
        deltas *= _high_variance_mask(deltas, keep)
    # [N] -> [N, 1, ..., 1]: one weight per model, broadcast over its entries
    weights = _energy_weights(deltas).reshape(-1, *[1] * anchor.dim())
    kept = weights * _sign_agreement(deltas)
    merged = (deltas * kept).sum(0) / kept.sum(0).clamp(min=WEIGHT_FLOOR)
    return merged.add_(anchor)


def _high_variance_mask(deltas: torch.Tensor, keep: float) -> torch.Tensor:
    """[*shape] float32: 1 at the `keep` fraction of the entries with non-zero variance across the
    models ([N, *shape] `deltas`) that vary most, else 0."""
    variance = deltas.var(dim=0, correction=0)
    # The count is taken in float32 (an integer tensor times a float), as mergekit takes it.
    count = int(torch.count_nonzero(variance) * keep)
    mask = torch.zeros_like(variance)
    if count > 0:
        mask.view(-1)[torch.topk(variance.flatten(), k=count).indices] = 1
    return mask


def _energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """[N]: each task vector's mean square over their sum; equal when that sum is about 0."""
    energies = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)  # [N, *shape] -> [N]
    total = float(energies.sum())
    if abs(total) < ZERO_ENERGY:
        return torch.full_like(energies, 1.0 / energies.shape[0])
    return energies / total


def _sign_agreement(deltas: torch.Tensor) -> torch.Tensor:
    """[N, *shape] bool: whether each entry has the sign of the entries' sum (+1 where it is 0)."""
    elected = deltas.sum(dim=0).ge(0).float().mul_(2).sub_(1)  # [*shape], +1 or -1
    return deltas.sign() == elected


SCE = MergeMethod(
    name="sce",
    summary="Keep the entries varying most, weight models by energy, drop opposed signs.",
    paper="https://arxiv.org/abs/2408.07990",
    params=SceParams,
    model_params=ModelParams,
    fn=sce_merge,
)
