"""Linear assignment: the permutation that maximises a float64 similarity (scipy's LAPJV solver)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from hfmerge.errors import AlignmentError


def solve_lap(similarity: torch.Tensor) -> torch.Tensor:
    """The gather index `perm` maximising `sum_i similarity[i, perm[i]]` over permutations.

    Rows index units of the reference model (A), columns units of the model being moved (B), so
    `new[i] = old[perm[i]]` brings B's units into A's order.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            f"a similarity for assignment must be square, got {tuple(similarity.shape)}"
        )
    matrix = similarity.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise AlignmentError(
            "a similarity matrix holds NaN or infinite values",
            why="the weights or activations of one model are not finite",
            fix="check that both models load and run correctly (no NaN weights, no overflow in "
            "half precision)",
        )
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    # scipy returns rows sorted, so `cols` is already indexed by row.
    assert np.array_equal(rows, np.arange(len(rows)))
    return torch.from_numpy(cols.astype(np.int64))


def assignment_value(similarity: torch.Tensor, perm: torch.Tensor) -> float:
    """`sum_i similarity[i, perm[i]]`: the objective of one assignment."""
    rows = torch.arange(similarity.shape[0])
    return float(similarity[rows, perm.long()].sum())


def lap_value(similarity: torch.Tensor) -> float:
    """The best assignment's objective."""
    return assignment_value(similarity, solve_lap(similarity))


def improves(new: float, old: float) -> bool:
    """Whether `new` beats `old` by more than float64 rounding (ties keep the old assignment).

    Keeping ties is what makes coordinate descent stop: two assignments with one objective
    would otherwise alternate forever.
    """
    return new > old + 1e-10 * max(abs(new), abs(old), 1e-300)
