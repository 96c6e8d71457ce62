"""Model breadcrumbs: drop both the smallest task-vector entries and the largest outliers, then
sum (`breadcrumbs`) or TIES-elect signs (`breadcrumbs_ties`)."""

from __future__ import annotations

import torch
from pydantic import Field

from hfmerge.methods.gta import PrunedModelParams, PruneParams, task_vector_method
from hfmerge.methods.params import Fraction
from hfmerge.methods.sparsify import Band, outlier_band, outlier_prune

PAPER = "https://arxiv.org/abs/2312.06795"


class BreadcrumbsModelParams(PrunedModelParams):
    """Per-model weight, density and the fraction of largest-magnitude outliers to drop."""

    gamma: Fraction = Field(0.01, description="fraction of largest-magnitude entries dropped")


def _crumbs(
    params: PruneParams,
    model: BreadcrumbsModelParams,
    delta: torch.Tensor,
    _: torch.Generator | None,
) -> torch.Tensor:
    """Keep the band between the smallest entries and the `gamma` largest outliers."""
    return outlier_prune(delta, model.density, model.gamma, rescale=params.rescale)


def _crumbs_band(_: PruneParams, model: BreadcrumbsModelParams, n: int) -> Band | None:
    """The entries `_crumbs` keeps, for the chunked form."""
    return outlier_band(n, model.density, model.gamma)


BREADCRUMBS = task_vector_method(
    name="breadcrumbs",
    summary="Drop the largest outliers and the smallest task-vector entries, then sum.",
    paper=PAPER,
    params=PruneParams,
    model_params=BreadcrumbsModelParams,
    consensus=False,
    sparsify=_crumbs,
    band=_crumbs_band,
)

BREADCRUMBS_TIES = task_vector_method(
    name="breadcrumbs_ties",
    summary="Drop the largest outliers and the smallest entries, then elect signs as in TIES.",
    paper=PAPER,
    params=PruneParams,
    model_params=BreadcrumbsModelParams,
    consensus=True,
    sparsify=_crumbs,
    band=_crumbs_band,
)
