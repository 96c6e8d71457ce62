"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere.

Each model's tensor (or, with a base, its task vector) is one flattened vector. Their directions
are averaged on the unit sphere by one tangent-space step: map every direction into the tangent
plane at their normalised weighted mean, take the weighted sum there, map it back with the
exponential map, and scale the result by the weighted mean of the vectors' lengths. (At that
mean the weighted tangent vectors sum to zero in exact arithmetic, so the step only corrects
rounding: the result is the normalised weighted mean direction at the weighted mean length.)
One model is returned as it is. Directions whose weighted mean vanishes (antipodal vectors with
cancelling weights) have no barycentre: two models then fall back to their weighted sum, more
refuse.
Behaviour follows mergekit's `multislerp`, except where every vector is zero (a tensor that no
fine-tune changed, say): that gives zero (the base) here, where mergekit refuses three or more.
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
    """The weighted spherical barycentre of `tensors` (of their task vectors over `base`)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    typed = as_params(params, MultiSlerpParams)
    vectors = torch.stack([x.flatten() for x in tensors])  # N x [*shape] -> [N, numel]
    if base is not None:
        vectors -= base.flatten()
    weights = torch.tensor([as_params(one, WeightedModelParams).weight for one in model_params])
    if typed.normalize_weights:
        weights = weights / weights.sum()
    merged = _barycentre(vectors, weights, typed.eps).reshape(tensors[0].shape)
    return merged if base is None else merged.add_(base)


def _barycentre(vectors: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """[numel]: the barycentre of the [N, numel] `vectors` with the [N] `weights`."""
    columns = weights.unsqueeze(1)  # [N] -> [N, 1], to scale each row
    lengths = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)  # [N, 1]
    directions = vectors / (lengths + eps)
    mean = (directions * columns).sum(0)
    mean_length = torch.linalg.vector_norm(mean)
    if mean_length < eps:
        return _antipodal_fallback(vectors, weights)
    mean /= mean_length
    # Project each direction onto the tangent plane at `mean`, and take the weighted sum there.
    cosines = directions @ mean  # [N, numel] @ [numel] -> [N]
    tangents = directions - cosines.unsqueeze(1) * mean.unsqueeze(0)
    step = (tangents * columns).sum(0)
    angle = torch.linalg.vector_norm(step) + eps
    # The exponential map at `mean`: walk `angle` along the great circle towards `step`.
    on_sphere: torch.Tensor = mean * torch.cos(angle) + step * (torch.sin(angle) / angle)
    mean_of_lengths = torch.dot(lengths.squeeze(1), weights)
    return on_sphere.mul_(mean_of_lengths)


def _antipodal_fallback(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Zero for zero vectors; the weighted sum of two vectors whose directions cancel; no answer
    for more."""
    if not vectors.any():
        return torch.zeros_like(vectors[0])
    if vectors.shape[0] == 2:
        return vectors[0] * weights[0] + vectors[1] * weights[1]
    raise MethodParameterError(
        "multislerp",
        f"the weighted mean of the {vectors.shape[0]} models' directions is zero in a tensor "
        "(opposite models whose weights cancel), so it has no point on the sphere",
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
