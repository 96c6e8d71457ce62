"""Arcee Fusion: take the other model's entries only where they change the base most, judged by
an importance score with an outlier threshold; keep the base's entries everywhere else.

An entry's importance is `|other - base|` times the KL divergence `KL(p || q)` of its row, where
`p` and `q` are the softmax of the other model's and the base's row (the last dim; a 1-D tensor
is one row), each plus KL_EPS. The threshold is `median + 1.5 (q3 - q1)` of every importance in
the tensor, the quartiles read from the sorted scores at `floor(q (n - 1))`; entries at or above
it take the other model's value. Behaviour follows mergekit's `arcee_fusion`, except that the
quartiles always come from every score: mergekit estimates them from a random sample of 1,000,000
scores in larger tensors, so there its threshold is a random draw around this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.params import MethodParams, ModelParams

KL_EPS = 1e-8  # added to both softmax distributions, so the logarithm's ratio is finite
OUTLIER_SPREAD = 1.5  # the threshold is this many interquartile ranges above the median


def arcee_fusion_merge(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The base, with the other model's entries where their importance is an upper outlier."""
    anchor = require_base(base, "arcee_fusion")
    other = tensors[0]
    importance = _importance(other, anchor)
    fused = importance >= _threshold(importance)
    return torch.where(fused, other, anchor)


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[*shape]: `|other - base|` times the KL divergence of the entry's row (last dim)."""
    p = torch.softmax(other, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # [..., n] -> [..., 1]
    return (other - base).abs_() * divergence


def _threshold(scores: torch.Tensor) -> torch.Tensor:
    """`median + 1.5 (q3 - q1)` of `scores`, each quartile the sorted score at floor(q (n-1))."""
    flat = scores.flatten()
    last = flat.numel() - 1
    # kthvalue counts from 1: the score at sorted index i is the (i + 1)-th smallest.
    q1, median, q3 = (flat.kthvalue(index + 1).values for index in _quartile_indices(last))
    return median + OUTLIER_SPREAD * (q3 - q1)


def _quartile_indices(last: int) -> tuple[int, int, int]:
    """Sorted indices of the quartiles of `last + 1` values: floor(q * last), q = 1/4, 1/2, 3/4."""
    return last // 4, last // 2, 3 * last // 4


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    summary="Take the other model's entries where an importance score marks them as outliers.",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    max_models=1,
    params=MethodParams,
    model_params=ModelParams,
    fn=arcee_fusion_merge,
)
