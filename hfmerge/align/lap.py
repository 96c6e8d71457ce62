"""Linear assignment: the permutation that maximises a float64 similarity.

Small groups go to scipy's dense solver; from SPARSE_MIN_UNITS units on, the sparse solver with a
dual certificate (align/sparse_lap.py) answers first and the dense solver is its fallback. Both
are exact: `benchmarks/bench_lap.py` measures them against each other on the same costs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from scipy.optimize import linear_sum_assignment

from hfmerge.align.sparse_lap import solve_sparse_lap
from hfmerge.errors import AlignmentError

# From this many units on the sparse solver goes first: at 5632 units it is some 4x faster than
# the dense one on independent models' similarities and some 0.3 s slower on a permuted copy's,
# at 11008-14336 faster on both (benchmarks/bench_lap.py); below, a dense solve takes about 1 s.
SPARSE_MIN_UNITS = 4096


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
    if matrix.shape[0] >= SPARSE_MIN_UNITS:
        certified = solve_sparse_lap(matrix)
        if certified is not None:
            return torch.from_numpy(certified)
    return torch.from_numpy(solve_dense_lap(matrix))


def solve_dense_lap(matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """The dense solver (scipy's LAPJV): the reference, and the fallback of the sparse one."""
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    # scipy returns rows sorted, so `cols` is already indexed by row.
    assert np.array_equal(rows, np.arange(len(rows)))
    order: npt.NDArray[np.int64] = cols.astype(np.int64)
    return order


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
