"""NuSLERP: spherical interpolation between two models, weighted per model, over whole tensors
or over each row (or column) of a tensor.

`t = w1 / (w0 + w1)` (0.5 when the weights sum to about zero). The vectors interpolated are the
whole flattened tensors (`nuslerp_flatten`, the default), else the tensor's slices along its last
dim, or along dim 0 with `nuslerp_row_wise`. Vectors that are parallel or antipodal (cos² within
COLINEAR_EPS² of 1) are interpolated linearly. Behaviour follows mergekit's `nuslerp` without a
base model; its task-vector form (with `base_model`) is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod
from hfmerge.methods.chunks import Chunk, FunctionMerge, TensorMerge
from hfmerge.methods.gram import GramForms, GramMethod, rows_of
from hfmerge.methods.params import (
    Flag,
    MethodParams,
    ModelParams,
    WeightedModelParams,
    as_params,
)

COLINEAR_EPS = 1e-8  # 1 - cos² at most COLINEAR_EPS²: interpolate linearly (mergekit's eps)
NORM_FLOOR = 1e-7  # a vector's norm is counted as at least this (mergekit's normalising eps)
ZERO_TOTAL = 1e-6  # |w0 + w1| below this: t = 0.5 (mergekit's threshold)


class NuSlerpParams(MethodParams):
    """Global parameters of `nuslerp`."""

    nuslerp_flatten: Flag = Field(
        True, description="interpolate each tensor as one vector; false: slice by slice"
    )
    nuslerp_row_wise: Flag = Field(
        False, description="without flatten: slices along dim 0 instead of the last dim"
    )


def interpolation_t(model_params: Sequence[ModelParams]) -> float:
    """`w1 / (w0 + w1)`: 0 gives the first model, 1 the second."""
    w0, w1 = (as_params(one, WeightedModelParams).weight for one in model_params)
    total = w0 + w1
    return 0.5 if abs(total) < ZERO_TOTAL else w1 / total


def _sliced(params: MethodParams, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` is interpolated slice by slice (one angle per slice)."""
    return not as_params(params, NuSlerpParams).nuslerp_flatten and len(shape) >= 2


def _columns(params: MethodParams, shape: tuple[int, ...]) -> bool:
    """Whether the slices run along dim 0: the merge then needs whole tensors."""
    return _sliced(params, shape) and as_params(params, NuSlerpParams).nuslerp_row_wise


def _parts(params: MethodParams, model_params: Sequence[ModelParams]) -> GramMethod:
    flatten = as_params(params, NuSlerpParams).nuslerp_flatten
    t = interpolation_t(model_params)

    def view(tensor: torch.Tensor) -> torch.Tensor:
        if flatten or tensor.dim() < 2:
            return rows_of(tensor)  # products summed over the whole tensor
        return tensor.reshape(-1, tensor.shape[-1])  # [rows, ..., last] -> [slices, last]

    def vectors(chunk: Chunk) -> list[torch.Tensor]:
        return [view(x) for x in chunk.tensors]

    def combine(chunk: Chunk, coefficients: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        first, second = chunk.tensors
        c0, c1 = (c.unsqueeze(1) for c in coefficients)  # [slices] -> [slices, 1]
        merged = view(first) * c0 + view(second) * c1
        return merged.reshape(first.shape)

    return GramMethod(vectors, lambda products: _coefficients(t, products), combine)


def _coefficients(t: float, products: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[slices] float32 weights of the two vectors, from their [2, 2, slices] Gram matrix:
    `sin((1-t)θ)/sin θ` and `sin(tθ)/sin θ`, or `1-t` and `t` where they are colinear."""
    norm0 = products[0, 0].sqrt().clamp(min=NORM_FLOOR)
    norm1 = products[1, 1].sqrt().clamp(min=NORM_FLOOR)
    cos = (products[0, 1] / (norm0 * norm1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.where(colinear, 1, torch.sin(theta))  # 1 where unused: no division by zero
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return c0.float(), c1.float()


_FORMS = GramForms("nuslerp", _parts, _sliced)


def nuslerp_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The merge of whole tensors; slices along dim 0 are moved last first and back after."""
    columns = _columns(params, tuple(tensors[0].shape))
    # [d0, ..., dn] -> [dn, ..., d0]: the slices along dim 0 become slices along the last dim
    moved = [x.transpose(0, -1) for x in tensors] if columns else list(tensors)
    out = _FORMS.merge(moved, base=base, model_params=model_params, params=params, generator=None)
    return out.transpose(0, -1).contiguous() if columns else out  # back to [d0, ..., dn]


def nuslerp_stream(
    shape: tuple[int, ...],
    *,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
    device: torch.device,
) -> TensorMerge:
    """Row chunks, except with slices along dim 0: each spans every row, so the tensor is whole."""
    if _columns(params, shape):
        return FunctionMerge(
            nuslerp_merge,
            model_params=model_params,
            params=params,
            generator=generator,
            whole_only=True,
        )
    return _FORMS.stream(
        shape, model_params=model_params, params=params, generator=generator, device=device
    )


NUSLERP = MergeMethod(
    name="nuslerp",
    summary="Spherical interpolation between two models by their weights, per tensor or slice.",
    paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
    needs_base=False,
    min_models=2,
    max_models=2,
    params=NuSlerpParams,
    model_params=WeightedModelParams,
    fn=nuslerp_merge,
    stream=nuslerp_stream,
)
