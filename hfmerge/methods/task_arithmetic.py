"""Task arithmetic: add the weighted sum of task vectors (model minus base) to the base."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hfmerge.methods.base import (
    MergeMethod,
    MethodParams,
    ModelParams,
    WeightedModelParams,
    as_params,
    require_base,
)
from hfmerge.methods.gta import TaskArithmeticParams, merge_task_vectors


def task_arithmetic_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`base + lambda * sum_i w_i (x_i - base)`, divided by `sum_i w_i` when `normalize`."""
    global_params = as_params(params, TaskArithmeticParams)
    return merge_task_vectors(
        tensors,
        base=require_base(base, "task_arithmetic"),
        weights=[as_params(one, WeightedModelParams).weight for one in model_params],
        prune=None,
        consensus=False,
        normalize=global_params.normalize,
        lambda_=global_params.lambda_,
    )


TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    summary="Add the weighted sum of the models' task vectors (model - base) to the base.",
    paper="https://arxiv.org/abs/2212.04089",
    params=TaskArithmeticParams,
    model_params=WeightedModelParams,
    fn=task_arithmetic_merge,
)
