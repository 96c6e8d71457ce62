"""DARE: drop task-vector entries at random (keep probability `density`) and rescale the rest,
then sum (`dare_linear`) or TIES-elect signs (`dare_ties`)."""

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
from hfmerge.methods.gta import PrunedModelParams, PruneParams, merge_task_vectors
from hfmerge.methods.sparsify import random_prune

PAPER = "https://arxiv.org/abs/2311.03099"


class DareParams(PruneParams):
    """Global parameters of `dare_ties` and `dare_linear`: rescaled by default, not normalised."""

    rescale: Flag = Field(True, description="rescale each pruned task vector to its L1 norm")


def _dare(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
    consensus: bool,
) -> torch.Tensor:
    global_params = as_params(params, DareParams)
    per_model = [as_params(one, PrunedModelParams) for one in model_params]

    def prune(delta: torch.Tensor, index: int) -> torch.Tensor:
        density = per_model[index].density
        return random_prune(delta, density, rescale=global_params.rescale, generator=generator)

    return merge_task_vectors(
        tensors,
        base=base,
        weights=[one.weight for one in per_model],
        prune=prune,
        consensus=consensus,
        normalize=global_params.normalize,
        lambda_=global_params.lambda_,
    )


def dare_ties_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Random drop and rescale, then TIES sign election."""
    return _dare(tensors, base=require_base(base, "dare_ties"), model_params=model_params,
                 params=params, generator=generator, consensus=True)


def dare_linear_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Random drop and rescale, then a weighted sum."""
    return _dare(tensors, base=require_base(base, "dare_linear"), model_params=model_params,
                 params=params, generator=generator, consensus=False)


DARE_TIES = MergeMethod(
    name="dare_ties",
    summary="Drop task-vector entries at random, rescale, elect signs as in TIES.",
    paper=PAPER,
    params=DareParams,
    model_params=PrunedModelParams,
    deterministic=False,
    fn=dare_ties_merge,
)

DARE_LINEAR = MergeMethod(
    name="dare_linear",
    summary="Drop task-vector entries at random, rescale, add the weighted sum to the base.",
    paper=PAPER,
    params=DareParams,
    model_params=PrunedModelParams,
    deterministic=False,
    fn=dare_linear_merge,
)
