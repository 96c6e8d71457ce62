"""Passthrough: one model's tensor, unchanged or scaled; the method of frankenmerges and depth
up-scaling, where `slices:` stack layer ranges of models into a new model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod
from hfmerge.methods.chunks import elementwise
from hfmerge.methods.params import MethodParams, ModelParams, Number, as_params


class PassthroughModelParams(ModelParams):
    """Per-model parameters of `passthrough`."""

    scale: Number | None = Field(
        None, description="factor the tensor is multiplied by (none: a copy)"
    )


def passthrough_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`scale * x` for the one model's tensor `x`; `base` is not used."""
    scale = as_params(model_params[0], PassthroughModelParams).scale
    return tensors[0].clone() if scale is None else tensors[0].mul(scale)


PASSTHROUGH = MergeMethod(
    name="passthrough",
    summary="One model's tensors as they are (or scaled): for stacking layer ranges in `slices`.",
    paper="https://github.com/arcee-ai/mergekit#passthrough",
    needs_base=False,
    max_models=1,
    params=MethodParams,
    model_params=PassthroughModelParams,
    fn=passthrough_merge,
    stream=elementwise(passthrough_merge),
)
