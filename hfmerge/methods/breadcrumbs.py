"""Model breadcrumbs: drop both the smallest task-vector entries and the largest outliers, then
sum (`breadcrumbs`) or TIES-elect signs (`breadcrumbs_ties`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import (
    Fraction,
    MergeMethod,
    MethodParams,
    ModelParams,
    as_params,
    require_base,
)
from hfmerge.methods.gta import PrunedModelParams, PruneParams, merge_task_vectors
from hfmerge.methods.sparsify import outlier_prune

PAPER = "https://arxiv.org/abs/2312.06795"


class BreadcrumbsModelParams(PrunedModelParams):
    """Per-model weight, density and the fraction of largest-magnitude outliers to drop."""

    gamma: Fraction = Field(0.01, description="fraction of largest-magnitude entries dropped")


def _breadcrumbs(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    consensus: bool,
) -> torch.Tensor:
    global_params = as_params(params, PruneParams)
    per_model = [as_params(one, BreadcrumbsModelParams) for one in model_params]

    def prune(delta: torch.Tensor, index: int) -> torch.Tensor:
        one = per_model[index]
        return outlier_prune(delta, one.density, one.gamma, rescale=global_params.rescale)

    return merge_task_vectors(
        tensors,
        base=base,
        weights=[one.weight for one in per_model],
        prune=prune,
        consensus=consensus,
        normalize=global_params.normalize,
        lambda_=global_params.lambda_,
    )


def breadcrumbs_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Drop outliers and small entries, then a weighted sum."""
    return _breadcrumbs(tensors, base=require_base(base, "breadcrumbs"),
                        model_params=model_params, params=params, consensus=False)


def breadcrumbs_ties_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Drop outliers and small entries, then TIES sign election."""
    return _breadcrumbs(tensors, base=require_base(base, "breadcrumbs_ties"),
                        model_params=model_params, params=params, consensus=True)


BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    summary="Drop the largest outliers and the smallest task-vector entries, then sum.",
    paper=PAPER,
    params=PruneParams,
    model_params=BreadcrumbsModelParams,
    fn=breadcrumbs_merge,
)

BREADCRUMBS_TIES = MergeMethod(
    name="breadcrumbs_ties",
    summary="Drop the largest outliers and the smallest entries, then elect signs as in TIES.",
    paper=PAPER,
    params=PruneParams,
    model_params=BreadcrumbsModelParams,
    fn=breadcrumbs_ties_merge,
)
