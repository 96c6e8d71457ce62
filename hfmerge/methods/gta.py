"""Generalized task arithmetic, shared by task_arithmetic, TIES, DARE, breadcrumbs and DELLA:
optionally truncate each task vector to low rank -> sparsify it -> weight -> optional sign
consensus -> sum -> normalise -> lambda.

Each method is a `TaskVectorMethod`: data saying how it sparsifies (a magnitude band, random
drops, or not at all) and whether it elects signs; its whole-tensor function and its chunked form
follow from that. The arithmetic after sparsifying is `TaskVectorSum` (`methods/gta_sum.py`).
A matrix truncated to low rank (`rank` or `energy`, `methods/lowrank.py`) needs its whole task
vector for the SVD, so such a tensor merges whole; without them nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
from pydantic import Field, ValidationInfo, field_validator

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.chunks import FunctionMerge, TensorMerge
from hfmerge.methods.gta_stream import Combine, Prune, TaskVectorMerge
from hfmerge.methods.gta_sum import TaskVectorSum
from hfmerge.methods.lowrank import Truncation, truncate
from hfmerge.methods.params import (
    Flag,
    Fraction,
    MethodParams,
    ModelParams,
    Number,
    Rank,
    Share,
    WeightedModelParams,
    as_params,
)
from hfmerge.methods.random_stream import RandomDropMerge
from hfmerge.methods.sparsify import Band, DropRule, band_prune, drop_prune


class TaskArithmeticParams(MethodParams):
    """Global parameters of every task-vector method."""

    normalize: Flag = Field(False, description="divide the summed task vectors by the weights' sum")
    lambda_: Number = Field(1.0, alias="lambda", description="scale of the combined task vector")


class PruneParams(TaskArithmeticParams):
    """Global parameters of the methods that sparsify task vectors."""

    rescale: Flag = Field(False, description="rescale each pruned task vector to its L1 norm")


class TaskVectorModelParams(WeightedModelParams):
    """Per-model weight, and optionally how far to truncate its matrices' task vectors."""

    rank: Rank | None = Field(
        None, description="truncate each matrix's task vector to this rank (SVD)"
    )
    energy: Share | None = Field(
        None,
        description="truncate each matrix's task vector to the fewest directions keeping "
        "this share of its squared singular values",
    )

    alternatives: ClassVar[tuple[frozenset[str], ...]] = (frozenset({"rank", "energy"}),)

    @field_validator("energy")
    @classmethod
    def _one_truncation(cls, energy: float | None, info: ValidationInfo) -> float | None:
        if energy is not None and info.data.get("rank") is not None:
            raise ValueError("give `rank` or `energy`, not both")
        return energy

    def truncation(self) -> Truncation | None:
        """How this model's matrices' task vectors are truncated; None: they stay full."""
        if self.rank is None and self.energy is None:
            return None
        return Truncation(rank=self.rank, energy=self.energy)


class PrunedModelParams(TaskVectorModelParams):
    """Per-model weight, truncation, and the fraction of its task vector to keep."""

    density: Fraction = Field(1.0, description="fraction of task-vector entries kept")


GlobalT = TypeVar("GlobalT", bound=TaskArithmeticParams)
ModelT = TypeVar("ModelT", bound=TaskVectorModelParams)
# The magnitude band a sparsifier keeps of one model's task vector, from (global params, that
# model's params, number of entries).
BandOf = Callable[[GlobalT, ModelT, int], Band | None]
# How a random sparsifier drops one model's entries, from (global params, that model's params).
DropOf = Callable[[GlobalT, ModelT], DropRule]


@dataclass(frozen=True)
class BandSparsifier(Generic[GlobalT, ModelT]):
    """Keeps a band of each task vector's entries by magnitude (TIES, breadcrumbs): the same
    entries whole or chunk by chunk (radix selection, `methods/gta_stream.py`)."""

    band_of: BandOf[GlobalT, ModelT]
    deterministic: ClassVar[bool] = True

    def prune(
        self,
        params: GlobalT,
        model: ModelT,
        delta: torch.Tensor,
        generator: torch.Generator | None,
        *,
        rescale: bool,
    ) -> torch.Tensor:
        """One model's whole task vector, sparsified."""
        return band_prune(delta, self.band_of(params, model, delta.numel()), rescale=rescale)

    def tensor_merge(
        self,
        shape: tuple[int, ...],
        params: GlobalT,
        per_model: Sequence[ModelT],
        combine: Combine,
        *,
        rescale: bool,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge | None:
        """The chunked merge of one tensor of `shape`."""
        n = math.prod(shape)
        bands = [self.band_of(params, model, n) for model in per_model]
        return TaskVectorMerge(n, bands=bands, rescale=rescale, combine=combine, device=device)


@dataclass(frozen=True)
class DropSparsifier(Generic[GlobalT, ModelT]):
    """Drops task-vector entries at random (DARE, DELLA): each model's masks drawn from the
    generator model after model in flat order, whole or chunk by chunk (`random_stream.py`).

    `ranks_rows`: the drop probabilities rank whole rows, so a 1-D tensor (one row) merges whole.
    """

    rule_of: DropOf[GlobalT, ModelT]
    ranks_rows: bool = False
    deterministic: ClassVar[bool] = False

    def prune(
        self,
        params: GlobalT,
        model: ModelT,
        delta: torch.Tensor,
        generator: torch.Generator | None,
        *,
        rescale: bool,
    ) -> torch.Tensor:
        """One model's whole task vector, sparsified."""
        rule = self.rule_of(params, model)
        return drop_prune(delta, rule, rescale=rescale, generator=generator)

    def tensor_merge(
        self,
        shape: tuple[int, ...],
        params: GlobalT,
        per_model: Sequence[ModelT],
        combine: Combine,
        *,
        rescale: bool,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge | None:
        """The chunked merge of one tensor of `shape`; None where it must merge whole."""
        if self.ranks_rows and len(shape) < 2:
            return None
        rules = [self.rule_of(params, model) for model in per_model]
        return RandomDropMerge(
            math.prod(shape), rules=rules, rescale=rescale, combine=combine, generator=generator
        )


Sparsifier = BandSparsifier[GlobalT, ModelT] | DropSparsifier[GlobalT, ModelT]


@dataclass(frozen=True, kw_only=True)
class TaskVectorMethod(Generic[GlobalT, ModelT]):
    """A generalized-task-arithmetic method as data: its parameters, how it sparsifies each task
    vector (None: not at all) and whether it elects a sign per entry (TIES's consensus).

    `rescale` and `normalize` are parameters (`PruneParams`, `TaskArithmeticParams`), so each
    method states its defaults in its parameter classes.
    """

    name: str
    summary: str
    paper: str
    params: type[GlobalT]
    model_params: type[ModelT]
    consensus: bool
    sparsify: Sparsifier[GlobalT, ModelT] | None = None

    def merge_method(self) -> MergeMethod:
        """The registry's record of this method: its function and its chunked form."""
        return MergeMethod(
            name=self.name,
            summary=self.summary,
            paper=self.paper,
            params=self.params,
            model_params=self.model_params,
            deterministic=self.sparsify is None or self.sparsify.deterministic,
            fn=self.merge,
            stream=self.stream,
        )

    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        /,
        *,
        base: torch.Tensor | None,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The method on whole tensors (`MergeFn`)."""
        global_params, per_model = self._typed(params, model_params)
        prune = self._pruner(global_params, per_model, generator)
        combine = self._sum(global_params, per_model)
        return combine(tensors, require_base(base, self.name), prune)

    def stream(
        self,
        shape: tuple[int, ...],
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge:
        """The method's merge of one tensor of `shape` (`StreamFactory`): chunk by chunk,
        except DELLA's 1-D tensors and matrices truncated to low rank, which merge whole."""
        global_params, per_model = self._typed(params, model_params)
        if not _truncates(shape, per_model):  # a truncated matrix needs its whole task vector
            merge = self._chunked(shape, global_params, per_model, generator, device)
            if merge is not None:
                return merge
        return FunctionMerge(
            self.merge,
            model_params=model_params,
            params=params,
            generator=generator,
            whole_only=True,
        )

    def _chunked(
        self,
        shape: tuple[int, ...],
        params: GlobalT,
        per_model: Sequence[ModelT],
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge | None:
        """The chunked merge of one tensor; None where the sparsifier must merge it whole."""
        combine = self._sum(params, per_model)
        rescale = _rescale(params)
        if self.sparsify is None:
            n = math.prod(shape)
            return TaskVectorMerge(n, bands=None, rescale=rescale, combine=combine, device=device)
        return self.sparsify.tensor_merge(
            shape,
            params,
            per_model,
            combine,
            rescale=rescale,
            generator=generator,
            device=device,
        )

    def _typed(
        self, params: MethodParams, model_params: Sequence[ModelParams]
    ) -> tuple[GlobalT, list[ModelT]]:
        return as_params(params, self.params), [
            as_params(m, self.model_params) for m in model_params
        ]

    def _sum(self, params: GlobalT, per_model: Sequence[ModelT]) -> TaskVectorSum:
        return TaskVectorSum(
            weights=tuple(model.weight for model in per_model),
            consensus=self.consensus,
            normalize=params.normalize,
            lambda_=params.lambda_,
        )

    def _pruner(
        self, params: GlobalT, per_model: Sequence[ModelT], generator: torch.Generator | None
    ) -> Prune | None:
        """Each model's whole-tensor truncation then sparsifier, by model index; None when the
        method keeps every task vector as it is."""
        sparsify = self.sparsify
        truncations = [model.truncation() for model in per_model]
        if sparsify is None and all(t is None for t in truncations):
            return None
        rescale = _rescale(params)

        def prune(delta: torch.Tensor, index: int) -> torch.Tensor:
            truncation = truncations[index]
            if truncation is not None:
                delta = truncate(delta, truncation, generator)
            if sparsify is None:
                return delta
            return sparsify.prune(params, per_model[index], delta, generator, rescale=rescale)

        return prune


def _truncates(shape: tuple[int, ...], per_model: Sequence[TaskVectorModelParams]) -> bool:
    """Whether some model's task vector of this tensor is truncated to low rank (matrices only)."""
    return len(shape) == 2 and any(model.truncation() is not None for model in per_model)


def _rescale(params: TaskArithmeticParams) -> bool:
    """Whether pruned task vectors are rescaled to their L1 norm (methods that sparsify)."""
    return isinstance(params, PruneParams) and params.rescale
