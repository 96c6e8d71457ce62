"""TSV-Merge (Task Singular Vectors): per matrix, each task vector truncated to its leading
singular directions, the directions of all tasks decorrelated, the low-rank sum added to the base.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
For a layer matrix and T tasks: task i's task vector is truncated to k directions (k = full / T
by default), Delta_i ~ U_i S_i V_i^T. The bases are stacked, U = [U_1 .. U_T], V = [V_1 .. V_T],
S = diag(S_1 .. S_T). Directions of different tasks overlap (that overlap is the interference),
so each stacked basis is replaced by its nearest orthonormal one, the polar factor
U_perp = P Q^T from the SVD U = P Sigma Q^T (likewise V). The merged task vector is
U_perp S V_perp^T, scaled by `lambda`. Tensors that are not matrices get the tasks' mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from hfmerge.methods.base import MergeMethod, require_base
from hfmerge.methods.gta_sum import sum_of
from hfmerge.methods.lowrank import LowRank, top_directions
from hfmerge.methods.params import MethodParams, ModelParams, Number, Rank, as_params

PAPER = "https://arxiv.org/abs/2412.00081"


class TsvParams(MethodParams):
    """Global parameters of `tsv`."""

    rank: Rank | None = Field(
        None, description="directions kept per task and matrix (default: full rank / tasks)"
    )
    lambda_: Number = Field(1.0, alias="lambda", description="scale of the merged task vector")


def tsv_merge(
    tensors: Sequence[torch.Tensor],
    /,
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """TSV-Merge of whole tensors (`MergeFn`)."""
    tsv = as_params(params, TsvParams)
    origin = require_base(base, "tsv")
    deltas = [tensor - origin for tensor in tensors]
    if origin.dim() == 2 and origin.numel() > 0:
        rank = tsv.rank or max(1, min(origin.shape) // len(deltas))
        merged = decorrelated_sum([top_directions(d, rank, generator) for d in deltas])
    else:
        merged = sum_of(deltas) / len(deltas)  # task arithmetic's mean of the task vectors
    return origin + tsv.lambda_ * merged


def decorrelated_sum(tasks: Sequence[LowRank]) -> torch.Tensor:
    """The tasks' low-rank task vectors summed over orthonormalised stacked bases."""
    u = orthonormal(torch.cat([task.u for task in tasks], dim=1))  # [m, T k]
    v = orthonormal(torch.cat([task.vh.T for task in tasks], dim=1))  # [k, n] -> [n, T k]
    s = torch.cat([task.s for task in tasks])  # [T k]
    return (u * s) @ v.T  # [m, T k] * [T k] (scales columns) @ [T k, n]


def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest `basis` [d, r] (its polar factor P Q^T): the columns'
    overlaps removed with as little change to each as possible.

    A stack whose columns are linearly dependent (tasks sharing a direction exactly) has no
    unique polar factor: its null directions would pair arbitrary new directions with the
    columns. They are left out (singular values at float32 noise, as `matrix_rank` counts them),
    so shared directions are averaged rather than joined by directions no task has.
    """
    p, sigma, qh = torch.linalg.svd(basis, full_matrices=False)  # [d, f], [f], [f, r]
    noise = sigma.max() * max(basis.shape) * torch.finfo(basis.dtype).eps
    kept = int((sigma > noise).sum())
    polar: torch.Tensor = p[:, :kept] @ qh[:kept]  # [d, kept] @ [kept, r] -> [d, r]
    return polar


TSV = MergeMethod(
    name="tsv",
    summary="Truncate each task vector's matrices by SVD, decorrelate the tasks' singular "
    "vectors, add the sum to the base.",
    paper=PAPER,
    params=TsvParams,
    model_params=ModelParams,
    fn=tsv_merge,
    stream=None,  # the SVDs need whole matrices
)
