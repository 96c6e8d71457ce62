"""DARE: drop task-vector entries at random (keep probability `density`) and rescale the rest,
then sum (`dare_linear`) or TIES-elect signs (`dare_ties`)."""

from __future__ import annotations

from pydantic import Field

from hfmerge.methods.gta import DropSparsifier, PrunedModelParams, PruneParams, TaskVectorMethod
from hfmerge.methods.params import Flag
from hfmerge.methods.sparsify import DropRule, dare_rule

PAPER = "https://arxiv.org/abs/2311.03099"


class DareParams(PruneParams):
    """Global parameters of `dare_ties` and `dare_linear`: rescaled by default, not normalised."""

    rescale: Flag = Field(True, description="rescale each pruned task vector to its L1 norm")


def _rule(params: DareParams, model: PrunedModelParams) -> DropRule:
    """Keep each entry with probability `density`, independently: DARE streams by chunks."""
    return dare_rule(model.density)


DARE_TIES = TaskVectorMethod(
    name="dare_ties",
    summary="Drop task-vector entries at random, rescale, elect signs as in TIES.",
    paper=PAPER,
    params=DareParams,
    model_params=PrunedModelParams,
    consensus=True,
    sparsify=DropSparsifier(_rule),
).merge_method()

DARE_LINEAR = TaskVectorMethod(
    name="dare_linear",
    summary="Drop task-vector entries at random, rescale, add the weighted sum to the base.",
    paper=PAPER,
    params=DareParams,
    model_params=PrunedModelParams,
    consensus=False,
    sparsify=DropSparsifier(_rule),
).merge_method()
