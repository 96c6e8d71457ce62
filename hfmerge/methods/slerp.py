"""Spherical linear interpolation between the base and one other model, tensor by tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import (
    MergeMethod,
    MethodParams,
    ModelParams,
    Number,
    as_params,
    require_base,
)

DOT_THRESHOLD = 0.9995  # |cos| above this: nearly colinear, lerp instead (mergekit's threshold)
NORM_EPS = 1e-8  # a vector shorter than this is not normalised (mergekit's eps)
_CHUNK = 1 << 20  # elements per chunk when reducing, to bound scratch memory


class SlerpParams(MethodParams):
    """Global parameters of `slerp`."""

    t: Number = Field(description="interpolation factor: 0 gives the base model, 1 the other")


def slerp_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """SLERP from `base` (t=0) to `tensors[0]` (t=1), the whole tensor taken as one vector."""
    return slerp(as_params(params, SlerpParams).t, require_base(base, "slerp"), tensors[0])


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """`sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`, θ the angle between the flattened tensors.

    Falls back to `(1-t) v0 + t v1` when |cos θ| > DOT_THRESHOLD (parallel or antipodal), where
    the spherical formula divides by a vanishing sin θ.
    """
    cos = _cosine(v0.reshape(-1), v1.reshape(-1))  # [n] views: the tensor is one vector
    if abs(cos) > DOT_THRESHOLD:
        coef0, coef1 = 1 - t, t
    else:
        theta = math.acos(cos)
        coef0 = math.sin((1 - t) * theta) / math.sin(theta)
        coef1 = math.sin(t * theta) / math.sin(theta)
    merged = v0 * coef0
    return merged.add_(v1, alpha=coef1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two vectors; an empty vector reads as parallel (lerp)."""
    if a.numel() == 0:
        return 1.0
    norm_a = math.sqrt(_dot(a, a))
    norm_b = math.sqrt(_dot(b, b))
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    return min(1.0, max(-1.0, _dot(a, b) / (norm_a * norm_b)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    # Chunk sums (float32, pairwise) add up in Python floats (float64): accurate for 10^9 entries.
    return sum(
        float((a[i : i + _CHUNK] * b[i : i + _CHUNK]).sum()) for i in range(0, a.numel(), _CHUNK)
    )


SLERP = MergeMethod(
    name="slerp",
    summary="Spherical interpolation from the base (t=0) to one other model (t=1).",
    paper="https://doi.org/10.1145/325165.325242",
    max_models=1,
    params=SlerpParams,
    model_params=ModelParams,
    fn=slerp_merge,
)
