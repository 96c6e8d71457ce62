"""Linear merge (model soups): the weighted average of the models' tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import ZERO_WEIGHT_SUM, MergeMethod
from hfmerge.methods.chunks import elementwise
from hfmerge.methods.params import (
    Flag,
    MethodParams,
    ModelParams,
    Problem,
    WeightedModelParams,
    as_params,
)


class LinearParams(MethodParams):
    """Global parameters of `linear`."""

    normalize: Flag = Field(True, description="divide by the sum of the weights")


def linear_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`sum_i w_i x_i`, divided by `sum_i w_i` when `normalize`; `base` is not used."""
    weights = [as_params(one, WeightedModelParams).weight for one in model_params]
    merged = tensors[0].mul(weights[0])  # = 0 + w_0 x_0 exactly, without a zeroed buffer
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        merged.add_(tensor, alpha=weight)
    total = sum(weights)
    if as_params(params, LinearParams).normalize and total != 1.0:  # x / 1 is x: skip the pass
        merged.div_(total)
    return merged


def check_weight_sum(params: MethodParams, model_params: Sequence[ModelParams]) -> list[Problem]:
    """Normalising by weights that sum to zero would divide by zero (mergekit writes inf/NaN)."""
    weights = [as_params(one, WeightedModelParams).weight for one in model_params]
    normalize = as_params(params, LinearParams).normalize
    return zero_weight_sum_problems(weights, normalize=normalize, switch="normalize")


def zero_weight_sum_problems(
    weights: list[float], *, normalize: bool, switch: str
) -> list[Problem]:
    """The problem of dividing by `weights` that sum to about zero, when `switch` is on."""
    if normalize and abs(sum(weights)) < ZERO_WEIGHT_SUM:
        return [
            (
                ("models",),
                f"the weights {weights} sum to 0, so `{switch}` would divide by "
                f"zero: change a weight, or set `{switch}: false` to take the plain weighted sum",
            )
        ]
    return []


LINEAR = MergeMethod(
    name="linear",
    summary="Weighted average of the models (model soups).",
    paper="https://arxiv.org/abs/2203.05482",
    needs_base=False,
    min_models=2,
    params=LinearParams,
    model_params=WeightedModelParams,
    fn=linear_merge,
    cross_check=check_weight_sum,
    stream=elementwise(linear_merge),
)
