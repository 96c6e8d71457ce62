"""DELLA: drop task-vector entries at random with keep probabilities rising with magnitude rank
(MagPrune), rescale, then TIES-elect signs (`della`) or sum (`della_linear`)."""

from __future__ import annotations

from typing import ClassVar, Self

import torch
from pydantic import Field, model_validator

from hfmerge.methods.gta import PrunedModelParams, PruneParams, task_vector_method
from hfmerge.methods.params import Flag, Fraction
from hfmerge.methods.sparsify import DropRule, della_rule, ranked_random_prune

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


def _magprune(
    params: PruneParams,
    model: DellaModelParams,
    delta: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Keep entries at random, with keep probabilities in density ± epsilon by magnitude rank."""
    return ranked_random_prune(
        delta, model.density, model.epsilon, rescale=params.rescale, generator=generator
    )


def _rule(params: PruneParams, model: DellaModelParams) -> DropRule:
    """MagPrune's keep probabilities, ranked within each row: DELLA streams by whole rows."""
    return della_rule(model.density, model.epsilon)


DELLA = task_vector_method(
    name="della",
    summary="Drop task-vector entries at random, keeping large ones likelier; elect signs.",
    paper=PAPER,
    params=DellaParams,
    model_params=DellaModelParams,
    consensus=True,
    sparsify=_magprune,
    drop=_rule,
    ranks_rows=True,
    deterministic=False,
)

DELLA_LINEAR = task_vector_method(
    name="della_linear",
    summary="Drop task-vector entries at random, keeping large ones likelier; then sum.",
    paper=PAPER,
    params=DellaLinearParams,
    model_params=DellaModelParams,
    consensus=False,
    sparsify=_magprune,
    drop=_rule,
    ranks_rows=True,
    deterministic=False,
)
