"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, merge the
agreeing ones."""

from __future__ import annotations

from pydantic import Field

from hfmerge.methods.gta import BandSparsifier, PrunedModelParams, PruneParams, TaskVectorMethod
from hfmerge.methods.params import Flag
from hfmerge.methods.sparsify import Band, magnitude_band


class TiesParams(PruneParams):
    """Global parameters of `ties`: normalised by default, as in the paper and mergekit."""

    normalize: Flag = Field(True, description="divide by the weights of the agreeing models")


def _trim_band(_: TiesParams, model: PrunedModelParams, n: int) -> Band | None:
    """Keep the `density` fraction of entries with the largest magnitude."""
    return magnitude_band(n, model.density)


TIES = TaskVectorMethod(
    name="ties",
    summary="Trim task vectors by magnitude, elect a sign per entry, average the agreeing ones.",
    paper="https://arxiv.org/abs/2306.01708",
    params=TiesParams,
    model_params=PrunedModelParams,
    consensus=True,
    sparsify=BandSparsifier(_trim_band),
).merge_method()
