"""Model Stock: move from the base towards the fine-tunes' average by a ratio set by the angle
between their task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import (
    Flag,
    MergeMethod,
    MethodParams,
    ModelParams,
    as_params,
    require_base,
)
from hfmerge.methods.gta import sum_of

NORM_FLOOR = 1e-6  # norm products are clamped here, so a zero task vector has cosine 0
SINGULAR = 1e-6  # |1 + (N-1) cos| below this has no finite ratio: keep the base there


class ModelStockParams(MethodParams):
    """Global parameters of `model_stock`."""

    filter_wise: Flag = Field(False, description="one ratio per output row instead of per tensor")


def model_stock_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`t * mean_i(w_i) + (1 - t) * w_0` with `t = N cos / (1 + (N - 1) cos)`, cos the mean
    pairwise cosine between the N task vectors."""
    w0 = require_base(base, "model_stock")
    filter_wise = as_params(params, ModelStockParams).filter_wise
    base_rows = _rows(w0, filter_wise=filter_wise)
    offsets = [_rows(w, filter_wise=filter_wise) - base_rows for w in tensors]
    ratio = _ratio(_mean_pairwise_cosine(offsets), len(tensors))  # [rows, 1]
    average = sum_of(tensors) / len(tensors)
    return (ratio * _rows(average, filter_wise=filter_wise) + (1 - ratio) * base_rows).reshape(
        w0.shape
    )


def _rows(tensor: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """[rows, cols]: one row per output unit when `filter_wise`, else the whole tensor as one."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def _mean_pairwise_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """[rows, 1]: cosine between task vectors, row by row, averaged over all pairs."""
    cosines = []
    for index, a in enumerate(offsets):
        for b in offsets[index + 1 :]:
            norms = (a.norm(dim=1) * b.norm(dim=1)).clamp(min=NORM_FLOOR)
            cosines.append(((a * b).sum(dim=1) / norms).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(1)


def _ratio(cos: torch.Tensor, count: int) -> torch.Tensor:
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    summary="Move from the base towards the models' average by a ratio set by their angle.",
    paper="https://arxiv.org/abs/2403.19522",
    min_models=2,
    params=ModelStockParams,
    model_params=ModelParams,
    fn=model_stock_merge,
)
