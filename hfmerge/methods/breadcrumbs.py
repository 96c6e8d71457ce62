"""Model breadcrumbs: drop both the smallest task-vector entries and the largest outliers, then
sum (`breadcrumbs`) or TIES-elect signs (`breadcrumbs_ties`)."""

from __future__ import annotations

from pydantic import Field

from hfmerge.methods.gta import BandSparsifier, PrunedModelParams, PruneParams, TaskVectorMethod
from hfmerge.methods.params import Fraction
from hfmerge.methods.sparsify import Band, outlier_band

PAPER = "https://arxiv.org/abs/2312.06795"


class BreadcrumbsModelParams(PrunedModelParams):
    """Per-model weight, density and the fraction of largest-magnitude outliers to drop."""

    gamma: Fraction = Field(0.01, description="fraction of largest-magnitude entries dropped")


def _crumbs_band(_: PruneParams, model: BreadcrumbsModelParams, n: int) -> Band | None:
    """Keep the band between the smallest entries and the `gamma` largest outliers."""
    return outlier_band(n, model.density, model.gamma)


BREADCRUMBS = TaskVectorMethod(
    name="breadcrumbs",
    summary="Drop the largest outliers and the smallest task-vector entries, then sum.",
    paper=PAPER,
    params=PruneParams,
    model_params=BreadcrumbsModelParams,
    consensus=False,
    sparsify=BandSparsifier(_crumbs_band),
).merge_method()

BREADCRUMBS_TIES = TaskVectorMethod(
    name="breadcrumbs_ties",
    summary="Drop the largest outliers and the smallest entries, then elect signs as in TIES.",
    paper=PAPER,
    params=PruneParams,
    model_params=BreadcrumbsModelParams,
    consensus=True,
    sparsify=BandSparsifier(_crumbs_band),
).merge_method()
