"""Generalized task arithmetic, shared by task_arithmetic, TIES, DARE, breadcrumbs and DELLA:
sparsify each task vector -> weight -> optional sign consensus -> sum -> normalise -> lambda.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from pydantic import Field

from hfmerge.methods.base import ZERO_WEIGHT_SUM, MergeMethod, require_base
from hfmerge.methods.chunks import FunctionMerge, TensorMerge
from hfmerge.methods.gta_stream import TaskVectorMerge
from hfmerge.methods.params import (
    Flag,
    Fraction,
    MethodParams,
    ModelParams,
    Number,
    WeightedModelParams,
    as_params,
)
from hfmerge.methods.random_stream import RandomDropMerge
from hfmerge.methods.sparsify import Band, DropRule

Prune = Callable[[torch.Tensor, int], torch.Tensor]  # (task vector, model index) -> sparsified


class TaskArithmeticParams(MethodParams):
    """Global parameters of every task-vector method."""

    normalize: Flag = Field(False, description="divide the summed task vectors by the weights' sum")
    lambda_: Number = Field(1.0, alias="lambda", description="scale of the combined task vector")


class PruneParams(TaskArithmeticParams):
    """Global parameters of the methods that sparsify task vectors."""

    rescale: Flag = Field(False, description="rescale each pruned task vector to its L1 norm")


class PrunedModelParams(WeightedModelParams):
    """Per-model weight and the fraction of its task vector to keep."""

    density: Fraction = Field(1.0, description="fraction of task-vector entries kept")


GlobalT = TypeVar("GlobalT", bound="TaskArithmeticParams")
ModelT = TypeVar("ModelT", bound=WeightedModelParams)
# How one method sparsifies one model's task vector: (global params, that model's params, task
# vector, generator) -> sparsified task vector.
Sparsifier = Callable[[GlobalT, ModelT, torch.Tensor, torch.Generator | None], torch.Tensor]
# The magnitude band a sparsifier keeps, from (global params, model params, numel): given for the
# deterministic magnitude sparsifiers, it gives the method its chunked form (gta_stream.py).
BandOf = Callable[[GlobalT, ModelT, int], Band | None]
# How a random sparsifier drops one model's entries (DARE, DELLA), from (global params, model
# params): given, it gives the method its chunked form (random_stream.py).
DropOf = Callable[[GlobalT, ModelT], DropRule]


def task_vector_method(
    *,
    name: str,
    summary: str,
    paper: str,
    params: type[GlobalT],
    model_params: type[ModelT],
    consensus: bool,
    sparsify: Sparsifier[GlobalT, ModelT] | None = None,
    band: BandOf[GlobalT, ModelT] | None = None,
    drop: DropOf[GlobalT, ModelT] | None = None,
    ranks_rows: bool = False,
    deterministic: bool = True,
) -> MergeMethod:
    """A generalized-task-arithmetic method: its sparsifier, and whether it elects signs (TIES).

    Without a sparsifier, or with `band` (the sparsifier's magnitude band), the method also gets
    its exact chunked form; so does `drop` (DARE, DELLA: each model's masks drawn in one pass).
    `ranks_rows`: the drop probabilities rank whole rows, so a 1-D tensor (one row) merges whole.
    """

    def merge(
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        global_params = as_params(params, params_cls)
        per_model = [as_params(one, model_params_cls) for one in model_params]
        prune: Prune | None = None
        if sparsify is not None:
            chosen = sparsify

            def prune(delta: torch.Tensor, index: int) -> torch.Tensor:
                return chosen(global_params, per_model[index], delta, generator)

        return merge_task_vectors(
            tensors,
            base=require_base(base, name),
            weights=[one.weight for one in per_model],
            prune=prune,
            consensus=consensus,
            normalize=global_params.normalize,
            lambda_=global_params.lambda_,
        )

    def stream(
        shape: tuple[int, ...],
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge:
        global_params = as_params(params, params_cls)
        per_model = [as_params(one, model_params_cls) for one in model_params]
        n = math.prod(shape)
        bands = [band(global_params, m, n) for m in per_model] if band is not None else None

        def combine(
            tensors: Sequence[torch.Tensor], base: torch.Tensor, prune: Prune | None
        ) -> torch.Tensor:
            return merge_task_vectors(
                tensors,
                base=base,
                weights=[one.weight for one in per_model],
                prune=prune,
                consensus=consensus,
                normalize=global_params.normalize,
                lambda_=global_params.lambda_,
            )

        rescale = isinstance(global_params, PruneParams) and global_params.rescale
        if drop is not None:
            if ranks_rows and len(shape) < 2:
                return FunctionMerge(
                    merge,
                    model_params=model_params,
                    params=params,
                    generator=generator,
                    whole_only=True,
                )
            return RandomDropMerge(
                n,
                rules=[drop(global_params, m) for m in per_model],
                rescale=rescale,
                combine=combine,
                generator=generator,
            )
        return TaskVectorMerge(n, bands=bands, rescale=rescale, combine=combine, device=device)

    params_cls, model_params_cls = params, model_params
    merge.__doc__ = summary
    return MergeMethod(
        name=name,
        summary=summary,
        paper=paper,
        params=params,
        model_params=model_params,
        deterministic=deterministic,
        fn=merge,
        stream=stream if sparsify is None or band is not None or drop is not None else None,
    )


def merge_task_vectors(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weights: Sequence[float],
    prune: Prune | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """`base + lambda * combine(weight_i * prune(tensor_i - base))`.

    With `consensus` (TIES), each entry takes the sign of the summed weighted task vectors and
    only the task vectors agreeing with it are summed, and normalised by their own weights.
    """
    deltas = []
    for index, (tensor, weight) in enumerate(zip(tensors, weights, strict=True)):
        delta = tensor - base
        if prune is not None:
            delta = prune(delta, index)
        deltas.append(delta * weight)
    divisor: torch.Tensor | float
    if consensus:
        mixed, divisor = _elect(deltas, weights)
    else:
        mixed = sum_of(deltas)
        divisor = _weight_sum(weights)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def _weight_sum(weights: Sequence[float]) -> float:
    # float32 like mergekit; a vanishing sum leaves the task vectors unnormalised, as there.
    total = float(torch.tensor(list(weights), dtype=torch.float32).sum())
    return 1.0 if abs(total) < ZERO_WEIGHT_SUM else total


def _elect(
    deltas: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: sum and weight total of the task-vector entries agreeing with the sign
    of their sum (zero sum counts as positive; zero entries never agree).

    Works one task vector at a time, so no [models, *shape] sign or mask stack is built, and in
    float arithmetic only: bool masks and mixed-dtype products are several times slower on CPU.
    """
    sign = sum_of(deltas).ge_(0).mul_(2).sub_(1)  # +1 where the sum is >= 0, else -1
    magnitude: torch.Tensor | None = None  # sum of |delta| over the agreeing entries
    divisor: torch.Tensor | None = None
    for delta, weight in zip(deltas, weights, strict=True):
        # |delta| where delta agrees with the sign (delta * sign > 0), else 0.
        agreeing = (delta * sign).clamp_(min=0)
        magnitude = agreeing.clone() if magnitude is None else magnitude.add_(agreeing)
        agrees = agreeing.sign_()  # 1 where it agrees, else 0
        divisor = agrees.mul_(weight) if divisor is None else divisor.add_(agrees, alpha=weight)
    assert magnitude is not None and divisor is not None
    # The agreeing entries share the sign, so sign * sum|delta| is their sum, bit for bit.
    mixed = magnitude.mul_(sign)
    no_agreement = torch.eq(divisor, 0, out=torch.empty_like(divisor))
    return mixed, divisor.add_(no_agreement)  # 0 -> 1 (the entry's sum is 0 anyway)


def sum_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise sum, accumulated in place."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total
