"""DELLA: drop task-vector entries at random with keep probabilities rising with magnitude rank
(MagPrune), rescale, then TIES-elect signs (`della`) or sum (`della_linear`)."""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import Field, model_validator

from hfmerge.methods.gta import DropSparsifier, PrunedModelParams, PruneParams, TaskVectorMethod
from hfmerge.methods.params import Flag, Fraction
from hfmerge.methods.sparsify import DropRule, della_rule

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


def _rule(params: PruneParams, model: DellaModelParams) -> DropRule:
    """MagPrune: keep entries at random, with keep probabilities in density ± epsilon by
    magnitude rank within each row (so DELLA streams by whole rows)."""
    return della_rule(model.density, model.epsilon)


DELLA = TaskVectorMethod(
    name="della",
    summary="Drop task-vector entries at random, keeping large ones likelier; elect signs.",
    paper=PAPER,
    params=DellaParams,
    model_params=DellaModelParams,
    consensus=True,
    sparsify=DropSparsifier(_rule, ranks_rows=True),  # ranks rows: 1-D merges whole
).merge_method()

DELLA_LINEAR = TaskVectorMethod(
    name="della_linear",
    summary="Drop task-vector entries at random, keeping large ones likelier; then sum.",
    paper=PAPER,
    params=DellaLinearParams,
    model_params=DellaModelParams,
    consensus=False,
    sparsify=DropSparsifier(_rule, ranks_rows=True),  # ranks rows: 1-D merges whole
).merge_method()
