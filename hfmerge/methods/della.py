"""DELLA: drop task-vector entries at random with keep probabilities rising with magnitude rank
(MagPrune), rescale, then TIES-elect signs (`della`) or sum (`della_linear`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Self

import torch
from pydantic import Field, model_validator

from hfmerge.methods.base import (
    Flag,
    Fraction,
    MergeMethod,
    MethodParams,
    ModelParams,
    as_params,
    require_base,
)
from hfmerge.methods.gta import PrunedModelParams, PruneParams, merge_task_vectors
from hfmerge.methods.sparsify import ranked_random_prune

PAPER = "https://arxiv.org/abs/2406.11617"


class DellaModelParams(PrunedModelParams):
    """Per-model weight, mean keep probability `density`, and its spread `epsilon` over ranks."""

    epsilon: Fraction = Field(0.15, description="keep probabilities span density ± epsilon")

    blame: ClassVar[str | None] = "density"

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> Self:
        # Only a real prune (0 < density < 1) draws; there mergekit demands (0, 1) strictly.
        low, high = self.density - self.epsilon, self.density + self.epsilon
        if 0 < self.density < 1 and (low <= 0 or high >= 1):
            raise ValueError(
                f"density ± epsilon must stay inside (0, 1), got ({low:g}, {high:g}) from "
                f"density {self.density:g} and epsilon {self.epsilon:g}: choose an epsilon below "
                f"{min(self.density, 1 - self.density):g}"
            )
        return self


class DellaParams(PruneParams):
    """Global parameters of `della`: normalised and rescaled by default, as in mergekit."""

    normalize: Flag = Field(True, description="divide by the weights of the agreeing models")
    rescale: Flag = Field(True, description="rescale each pruned task vector to its L1 norm")


class DellaLinearParams(PruneParams):
    """Global parameters of `della_linear`: rescaled by default, not normalised."""

    rescale: Flag = Field(True, description="rescale each pruned task vector to its L1 norm")


def _della(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    model_params: Sequence[ModelParams],
    params: PruneParams,
    generator: torch.Generator | None,
    consensus: bool,
) -> torch.Tensor:
    per_model = [as_params(one, DellaModelParams) for one in model_params]

    def prune(delta: torch.Tensor, index: int) -> torch.Tensor:
        one = per_model[index]
        return ranked_random_prune(
            delta, one.density, one.epsilon, rescale=params.rescale, generator=generator
        )

    return merge_task_vectors(
        tensors,
        base=base,
        weights=[one.weight for one in per_model],
        prune=prune,
        consensus=consensus,
        normalize=params.normalize,
        lambda_=params.lambda_,
    )


def della_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """MagPrune, rescale, then TIES sign election."""
    return _della(tensors, base=require_base(base, "della"), model_params=model_params,
                  params=as_params(params, DellaParams), generator=generator, consensus=True)


def della_linear_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """MagPrune, rescale, then a weighted sum."""
    return _della(tensors, base=require_base(base, "della_linear"), model_params=model_params,
                  params=as_params(params, DellaLinearParams), generator=generator,
                  consensus=False)


DELLA = MergeMethod(
    name="della",
    summary="Drop task-vector entries at random, keeping large ones likelier; elect signs.",
    paper=PAPER,
    params=DellaParams,
    model_params=DellaModelParams,
    deterministic=False,
    fn=della_merge,
)

DELLA_LINEAR = MergeMethod(
    name="della_linear",
    summary="Drop task-vector entries at random, keeping large ones likelier; then sum.",
    paper=PAPER,
    params=DellaLinearParams,
    model_params=DellaModelParams,
    deterministic=False,
    fn=della_linear_merge,
)
