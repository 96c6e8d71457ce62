"""Model Stock: move from the base towards the fine-tunes' average by a ratio set by the angle
between their task vectors."""

from __future__ import annotations

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.chunks import Chunk
from hfmerge.methods.gram import GramForms, GramMethod, rows_of
from hfmerge.methods.gta_sum import sum_of
from hfmerge.methods.params import Flag, MethodParams, ModelParams, as_params

NORM_FLOOR = 1e-6  # norm products are clamped here, so a zero task vector has cosine 0
SINGULAR = 1e-6  # |1 + (N-1) cos| below this has no finite ratio: keep the base there


class ModelStockParams(MethodParams):
    """Global parameters of `model_stock`."""

    filter_wise: Flag = Field(False, description="one ratio per output row instead of per tensor")


def _row_local(params: MethodParams, shape: tuple[int, ...]) -> bool:
    """Rows of an N-D tensor merge alone with `filter_wise`; a 1-D tensor is one row."""
    return as_params(params, ModelStockParams).filter_wise and len(shape) >= 2


def _vectors(chunk: Chunk) -> list[torch.Tensor]:
    """The task vectors, as rows."""
    base_rows = rows_of(_base(chunk))
    return [rows_of(w) - base_rows for w in chunk.tensors]


def _combine(chunk: Chunk, ratio: torch.Tensor) -> torch.Tensor:
    """`t * mean_i(w_i) + (1 - t) * w_0`, with `t` per row ([rows, 1]) or per tensor ([1, 1])."""
    base = _base(chunk)
    base_rows = rows_of(base)
    average = (sum_of(chunk.tensors) / len(chunk.tensors)).reshape(base_rows.shape)
    return (ratio * average + (1 - ratio) * base_rows).reshape(base.shape)


def _base(chunk: Chunk) -> torch.Tensor:
    return require_base(chunk.base, "model_stock")


def _ratio(products: torch.Tensor) -> torch.Tensor:
    """[rows, 1] float32: the interpolation ratio of each row (one row per tensor), from the task
    vectors' [N, N, rows] Gram matrix."""
    count = products.shape[0]
    cos = _mean_pairwise_cosine(products)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe).float()


def _mean_pairwise_cosine(products: torch.Tensor) -> torch.Tensor:
    """[rows, 1] float64: cosine between task vectors, row by row, averaged over all pairs."""
    count = products.shape[0]
    norms = products.diagonal().T.sqrt()  # [N, N, rows] -> [N, rows]
    cosines = [
        (products[i, j] / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    return torch.stack(cosines).mean(dim=0).unsqueeze(1)


# `t * mean_i(w_i) + (1 - t) * w_0` with `t = N cos / (1 + (N - 1) cos)`, cos the mean pairwise
# cosine between the N task vectors: one per tensor, or per row with `filter_wise`.
_PARTS = GramMethod(_vectors, _ratio, _combine)
_FORMS = GramForms("model_stock", lambda params, model_params: _PARTS, _row_local)
MODEL_STOCK = MergeMethod(
    name="model_stock",
    summary="Move from the base towards the models' average by a ratio set by their angle.",
    paper="https://arxiv.org/abs/2403.19522",
    min_models=2,
    params=ModelStockParams,
    model_params=ModelParams,
    fn=_FORMS.merge,
    stream=_FORMS.stream,
)
