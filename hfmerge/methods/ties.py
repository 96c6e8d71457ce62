"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, merge the
agreeing ones."""

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
from hfmerge.methods.sparsify import magnitude_prune


class TiesParams(PruneParams):
    """Global parameters of `ties`: normalised by default, as in the paper and mergekit."""

    normalize: Flag = Field(True, description="divide by the weights of the agreeing models")


def ties_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Trim (keep `density` by magnitude), elect signs, disjoint-merge the agreeing entries."""
    global_params = as_params(params, TiesParams)
    per_model = [as_params(one, PrunedModelParams) for one in model_params]

    def prune(delta: torch.Tensor, index: int) -> torch.Tensor:
        return magnitude_prune(delta, per_model[index].density, rescale=global_params.rescale)

    return merge_task_vectors(
        tensors,
        base=require_base(base, "ties"),
        weights=[one.weight for one in per_model],
        prune=prune,
        consensus=True,
        normalize=global_params.normalize,
        lambda_=global_params.lambda_,
    )


TIES = MergeMethod(
    name="ties",
    summary="Trim task vectors by magnitude, elect a sign per entry, average the agreeing ones.",
    paper="https://arxiv.org/abs/2306.01708",
    params=TiesParams,
    model_params=PrunedModelParams,
    fn=ties_merge,
)
