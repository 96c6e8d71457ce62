"""DARE: drop task-vector entries at random (keep probability `density`) and rescale the rest,
then sum (`dare_linear`) or TIES-elect signs (`dare_ties`)."""

from __future__ import annotations

import torch
from pydantic import Field

from hfmerge.methods.gta import PrunedModelParams, PruneParams, task_vector_method
from hfmerge.methods.params import Flag
from hfmerge.methods.sparsify import DropRule, dare_rule, random_prune

PAPER = "https://arxiv.org/abs/2311.03099"


class DareParams(PruneParams):
    """Global parameters of `dare_ties` and `dare_linear`: rescaled by default, not normalised."""

    rescale: Flag = Field(True, description="rescale each pruned task vector to its L1 norm")


def _drop(
    params: DareParams,
    model: PrunedModelParams,
    delta: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Keep each entry with probability `density`."""
    return random_prune(delta, model.density, rescale=params.rescale, generator=generator)


def _rule(params: DareParams, model: PrunedModelParams) -> DropRule:
    """Each entry kept with probability `density`, independently: DARE streams by chunks."""
    return dare_rule(model.density)


DARE_TIES = task_vector_method(
    name="dare_ties",
    summary="Drop task-vector entries at random, rescale, elect signs as in TIES.",
    paper=PAPER,
    params=DareParams,
    model_params=PrunedModelParams,
    consensus=True,
    sparsify=_drop,
    drop=_rule,
    deterministic=False,
)

DARE_LINEAR = task_vector_method(
    name="dare_linear",
    summary="Drop task-vector entries at random, rescale, add the weighted sum to the base.",
    paper=PAPER,
    params=DareParams,
    model_params=PrunedModelParams,
    consensus=False,
    sparsify=_drop,
    drop=_rule,
    deterministic=False,
)
