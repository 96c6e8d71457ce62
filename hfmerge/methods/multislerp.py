"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere.

Each model's tensor (or, with a base, its task vector) is one flattened vector. Their directions
are averaged on the unit sphere by one tangent-space step: map every direction into the tangent
plane at their normalised weighted mean, take the weighted sum there, map it back with the
exponential map, and scale the result by the weighted mean of the vectors' lengths. (At that
mean the weighted tangent vectors sum to zero in exact arithmetic, so the step only corrects
rounding: the result is the normalised weighted mean direction at the weighted mean length.)
One model is returned as it is. Directions whose weighted mean vanishes (antipodal vectors with
cancelling weights) have no barycentre: two models then fall back to their weighted sum, more
refuse. Behaviour follows mergekit's `multislerp`, except where every vector is zero (a tensor
that no fine-tune changed, say): that gives zero (the base) here, where mergekit refuses three
or more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.errors import MethodParameterError
from hfmerge.methods.base import MergeMethod
from hfmerge.methods.linear import zero_weight_sum_problems
from hfmerge.methods.params import (
    Flag,
    MethodParams,
    ModelParams,
    Number,
    Problem,
    WeightedModelParams,
    as_params,
)


class MultiSlerpParams(MethodParams):
    """Global parameters of `multislerp`."""

    normalize_weights: Flag = Field(True, description="divide the weights by their sum")
    eps: Number = Field(
        1e-8, description="added to lengths before dividing; a mean direction shorter is zero"
    )


def multislerp_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The weighted spherical barycentre of `tensors` (of their task vectors over `base`).

    One vector at a time: the inputs' size plus about four tensors of float32 at the peak,
    within the engine's workspace budget for whole-tensor merges.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    typed = as_params(params, MultiSlerpParams)
    # Each [*shape] -> [numel]: a view without a base, the task vector's copy with one.
    vectors = [x.flatten() if base is None else (x - base).flatten() for x in tensors]
    weights = torch.tensor([as_params(one, WeightedModelParams).weight for one in model_params])
    if typed.normalize_weights:
        weights = weights / weights.sum()
    merged = _barycentre(vectors, weights.tolist(), typed.eps).reshape(tensors[0].shape)
    return merged if base is None else merged.add_(base)


def _barycentre(vectors: list[torch.Tensor], weights: list[float], eps: float) -> torch.Tensor:
    """[numel]: the barycentre of the [numel] `vectors` with the `weights`."""
    lengths = [torch.linalg.vector_norm(v) for v in vectors]
    padded = [length + eps for length in lengths]  # vector / padded: its direction
    mean = torch.zeros_like(vectors[0])
    for vector, divisor, weight in zip(vectors, padded, weights, strict=True):
        mean.add_(vector / divisor, alpha=weight)
    mean_length = torch.linalg.vector_norm(mean)
    if mean_length < eps:
        return _antipodal_fallback(vectors, weights)
    mean /= mean_length
    # Project each direction onto the tangent plane at `mean`; take the weighted sum there.
    step = torch.zeros_like(mean)
    for vector, divisor, weight in zip(vectors, padded, weights, strict=True):
        direction = vector / divisor
        tangent = direction.sub_(mean, alpha=float(torch.dot(direction, mean)))
        step.add_(tangent, alpha=weight)
    angle = torch.linalg.vector_norm(step) + eps
    # The exponential map at `mean`: walk `angle` along the great circle towards `step`.
    on_sphere: torch.Tensor = mean.mul_(torch.cos(angle)).add_(step.mul_(torch.sin(angle) / angle))
    pairs = zip(weights, lengths, strict=True)
    return on_sphere.mul_(sum(weight * float(length) for weight, length in pairs))


def _antipodal_fallback(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Zero for zero vectors; the weighted sum of two vectors whose directions cancel; no answer
    for more."""
    if not any(bool(v.any()) for v in vectors):
        return torch.zeros_like(vectors[0])
    if len(vectors) == 2:
        return vectors[0] * weights[0] + vectors[1] * weights[1]
    raise MethodParameterError(
        "multislerp",
        f"the weighted mean of the {len(vectors)} models' directions is zero (opposite models "
        "whose weights cancel), so it has no point on the sphere",
        fix="change a weight so that the opposite models no longer balance out",
    )


def check_weight_sum(params: MethodParams, model_params: Sequence[ModelParams]) -> list[Problem]:
    """Normalising weights that sum to zero would divide by zero."""
    weights = [as_params(one, WeightedModelParams).weight for one in model_params]
    normalize = as_params(params, MultiSlerpParams).normalize_weights
    return zero_weight_sum_problems(weights, normalize=normalize, switch="normalize_weights")


MULTISLERP = MergeMethod(
    name="multislerp",
    summary="Weighted spherical barycentre of any number of models (of task vectors with a base).",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    needs_base=False,
    optional_base=True,
    min_models=1,
    params=MultiSlerpParams,
    model_params=WeightedModelParams,
    fn=multislerp_merge,
    cross_check=check_weight_sum,
)
