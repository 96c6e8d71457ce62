"""NearSwap: take the other model's entries where they are near the base's, keep the base's
where the two are far apart, and blend in between."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.chunks import elementwise
from hfmerge.methods.params import MethodParams, ModelParams, Number, as_params

MIN_DISTANCE = 1e-6  # |other - base| is counted as at least this, so t / distance is defined


class NearSwapParams(MethodParams):
    """Global parameters of `nearswap`."""

    t: Number = Field(description="distance up to which the other model's entry is taken whole")


def nearswap_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`base + w * (other - base)` per entry, with `w = clamp(t / |other - base|, 0, 1)`."""
    t = as_params(params, NearSwapParams).t
    anchor = require_base(base, "nearswap")
    other = tensors[0]
    distance = (other - anchor).abs_().clamp_(min=MIN_DISTANCE)
    weight = torch.div(t, distance).clamp_(0.0, 1.0)
    return torch.lerp(anchor, other, weight)


NEARSWAP = MergeMethod(
    name="nearswap",
    summary="Take the other model's entries near the base's, keep the base's far ones.",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    max_models=1,
    params=NearSwapParams,
    model_params=ModelParams,
    fn=nearswap_merge,
    stream=elementwise(nearswap_merge),
)
