"""Spherical linear interpolation between the base and one other model, tensor by tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.chunks import Chunk
from hfmerge.methods.gram import GramForms, GramMethod, rows_of
from hfmerge.methods.params import MethodParams, ModelParams, Number, as_params

DOT_THRESHOLD = 0.9995  # |cos| above this: nearly colinear, lerp instead (mergekit's threshold)
NORM_EPS = 1e-8  # a vector shorter than this is not normalised (mergekit's eps)


class SlerpParams(MethodParams):
    """Global parameters of `slerp`."""

    t: Number = Field(description="interpolation factor: 0 gives the base model, 1 the other")


def _parts(params: MethodParams, model_params: Sequence[ModelParams]) -> GramMethod:
    """SLERP from the base (t=0) to the other model (t=1), each tensor taken as one vector:
    `sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`, θ the angle between the flattened tensors."""
    t = as_params(params, SlerpParams).t

    def vectors(chunk: Chunk) -> list[torch.Tensor]:
        return [rows_of(_base(chunk)), rows_of(chunk.tensors[0])]

    def combine(chunk: Chunk, coefficients: tuple[float, float]) -> torch.Tensor:
        merged = _base(chunk) * coefficients[0]
        return merged.add_(chunk.tensors[0], alpha=coefficients[1])

    return GramMethod(vectors, lambda products: _coefficients(t, products), combine)


def _base(chunk: Chunk) -> torch.Tensor:
    return require_base(chunk.base, "slerp")


def _coefficients(t: float, products: torch.Tensor) -> tuple[float, float]:
    """The weights of v0 and v1, from their [2, 2, 1] Gram matrix.

    Falls back to `(1-t, t)` when |cos θ| > DOT_THRESHOLD (parallel or antipodal), where the
    spherical formula divides by a vanishing sin θ.
    """
    cos = _cosine(products[:, :, 0].tolist())
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _cosine(products: list[list[float]]) -> float:
    """Cosine of the angle between two vectors from their Gram matrix; a vector shorter than
    NORM_EPS is not normalised (as in mergekit)."""
    norm_a = math.sqrt(products[0][0])
    norm_b = math.sqrt(products[1][1])
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    return min(1.0, max(-1.0, products[0][1] / (norm_a * norm_b)))


_FORMS = GramForms("slerp", _parts)
SLERP = MergeMethod(
    name="slerp",
    summary="Spherical interpolation from the base (t=0) to one other model (t=1).",
    paper="https://doi.org/10.1145/325165.325242",
    max_models=1,
    params=SlerpParams,
    model_params=ModelParams,
    fn=_FORMS.merge,
    stream=_FORMS.stream,
)
