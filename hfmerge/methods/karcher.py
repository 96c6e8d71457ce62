"""Karcher mean: the point on the unit sphere nearest, in summed squared geodesic distance, to
every model's direction, found by Riemannian gradient steps; scaled by the mean length.

Each tensor is one flattened vector with equal weight. Directions of vectors no longer than
`tol` are left out of the mean (their lengths still count in the scale); all of them that short
give zeros. The iteration starts from the normalised mean direction (the first direction when
that mean is shorter than `tol`, as for two antipodal models) and stops after `max_iter` steps
or once a step is shorter than `tol`. Behaviour follows mergekit's `karcher`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod
from hfmerge.methods.params import Count, MethodParams, ModelParams, Number, as_params


class KarcherParams(MethodParams):
    """Global parameters of `karcher`."""

    max_iter: Count = Field(10, description="most gradient steps on the sphere")
    tol: Number = Field(
        1e-5, description="a step, angle or length at most this counts as zero (stop, skip)"
    )


def karcher_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`mean_i |x_i|` times the Karcher mean of the directions `x_i / |x_i|`; `base` unused.

    Directions are divided out when needed, not stored: the inputs plus about four tensors of
    float32 at the peak, within the engine's workspace budget for whole-tensor merges.
    """
    typed = as_params(params, KarcherParams)
    if len(tensors) == 1:
        return tensors[0].clone()
    vectors = [x.flatten() for x in tensors]  # each [*shape] -> [numel]
    lengths = [torch.linalg.vector_norm(v) for v in vectors]
    kept = [
        _Direction(vector, length)
        for vector, length in zip(vectors, lengths, strict=True)
        if float(length) > typed.tol
    ]
    if not kept:
        return torch.zeros_like(tensors[0])
    mean = _karcher_mean(kept, max_iter=typed.max_iter, tol=typed.tol)
    share = 1.0 / len(tensors)
    scale = torch.stack([share * length for length in lengths]).sum()  # every length counts
    return mean.mul_(scale).reshape(tensors[0].shape)


@dataclass(frozen=True)
class _Direction:
    """A vector longer than `tol` and its length: `unit()` is its direction."""

    vector: torch.Tensor
    length: torch.Tensor

    def unit(self) -> torch.Tensor:
        return self.vector / self.length


def _karcher_mean(directions: list[_Direction], *, max_iter: int, tol: float) -> torch.Tensor:
    """[numel]: the equal-weight Karcher mean of the `directions`."""
    share = 1.0 / len(directions)
    mean = torch.zeros_like(directions[0].vector)
    for direction in directions:
        mean += share * direction.unit()
    length = torch.linalg.vector_norm(mean)
    mean = directions[0].unit() if float(length) < tol else mean / length
    for _ in range(max_iter):
        step = _log_map_mean(mean, directions, share, tol)
        step_length = torch.linalg.vector_norm(step)
        if float(step_length) < tol:
            break
        # The exponential map at `mean`: walk `step_length` along the great circle to `step`.
        mean = torch.cos(step_length) * mean + torch.sin(step_length) * (step / step_length)
        length = torch.linalg.vector_norm(mean)
        if float(length) > tol:
            mean = mean / length
    return mean


def _log_map_mean(
    mean: torch.Tensor, directions: list[_Direction], share: float, tol: float
) -> torch.Tensor:
    """The mean of the directions mapped to the tangent plane at `mean` (the descent step):
    each is `θ / sin θ` times its part orthogonal to `mean`, θ its angle to `mean`; directions
    within `tol` of `mean` add nothing."""
    step = torch.zeros_like(mean)
    for direction in directions:
        unit = direction.unit()
        cosine = torch.dot(mean, unit).clamp(-1.0, 1.0)
        angle = torch.arccos(cosine)
        if float(angle) < tol:
            continue
        step += share * (angle / torch.sin(angle)) * unit.sub_(mean * cosine)
    return step


KARCHER = MergeMethod(
    name="karcher",
    summary="Karcher (Riemannian) mean of the models' directions on the sphere, mean length.",
    paper="https://arxiv.org/abs/2603.04972",
    needs_base=False,
    min_models=1,
    params=KarcherParams,
    model_params=ModelParams,
    fn=karcher_merge,
)
