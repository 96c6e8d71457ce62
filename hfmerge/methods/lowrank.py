"""Low-rank task vectors: a matrix truncated to its top singular directions, by rank or by the
share of its energy (squared singular values) kept.

Fine-tuning moves a weight matrix in a low-dimensional subspace, so its task vector is close to
low rank; truncating it drops the noise directions before the task vectors are combined. Only
2-D tensors are truncated: norms and biases (1-D) have no singular values to speak of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Exact SVD costs O(m n min(m, n)) and builds both full bases: cheap for the layers of small
# models, minutes on the CPU for an embedding (e.g. 32000 x 4096). Above this smaller side a
# randomized SVD (Halko, Martinsson & Tropp 2011) finds the top q directions in O(m n q) per pass;
# with OVERSAMPLE extra directions and POWER_ITERATIONS passes it is near-exact for task vectors,
# whose spectra decay fast. torch.svd_lowrank is that algorithm, but it draws its test matrix from
# torch's global generator; this one draws from the tensor's own, so a merge is reproducible in
# any tensor order and on any thread. Figures: benchmarks/NOTES.md.
EXACT_SVD_MAX_DIM = 1024
OVERSAMPLE = 10
POWER_ITERATIONS = 4
ENERGY_TOLERANCE = 1e-5
FIRST_ENERGY_RANK = 64  # energy: the first number of directions tried by a randomized SVD


@dataclass(frozen=True)
class Truncation:
    """How to truncate a matrix: to `rank` directions, or to the fewest keeping `energy` of its
    squared singular values (exactly one of the two is set)."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("a truncation takes exactly one of rank and energy")


@dataclass(frozen=True)
class LowRank:
    """A matrix as `u @ diag(s) @ vh`: u [m, k], s [k], vh [k, n]."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def rank(self) -> int:
        """The number of directions kept."""
        return int(self.s.numel())

    def matrix(self) -> torch.Tensor:
        """The [m, n] matrix these factors make."""
        return (self.u * self.s) @ self.vh  # [m, k] * [k] (scales columns) @ [k, n]

    def top(self, rank: int) -> LowRank:
        """The first `rank` directions (all of them when there are fewer)."""
        return LowRank(self.u[:, :rank], self.s[:rank], self.vh[:rank])


def truncate(
    delta: torch.Tensor, truncation: Truncation, generator: torch.Generator | None
) -> torch.Tensor:
    """`delta` truncated to low rank when it is a matrix; other tensors come back unchanged, and
    so does a matrix the truncation keeps whole."""
    if delta.dim() != 2 or delta.numel() == 0 or _keeps_all(delta, truncation):
        return delta
    return low_rank(delta, truncation, generator).matrix()


def low_rank(
    matrix: torch.Tensor,
    truncation: Truncation,
    generator: torch.Generator | None,
    *,
    exact_max_dim: int = EXACT_SVD_MAX_DIM,
) -> LowRank:
    """The top directions of a [m, n] matrix that `truncation` keeps."""
    full = min(matrix.shape)
    if truncation.rank is not None:
        return top_directions(matrix, truncation.rank, generator, exact_max_dim=exact_max_dim)
    assert truncation.energy is not None
    total = float(matrix.double().square().sum())  # the energy of every direction
    tried = min(FIRST_ENERGY_RANK, full)
    while True:
        factors = top_directions(matrix, tried, generator, exact_max_dim=exact_max_dim)
        kept = energy_rank(factors.s, truncation.energy, total)
        if kept < factors.rank or factors.rank >= full:
            return factors.top(kept)
        tried = min(4 * tried, full)  # the share lies beyond the directions found: look further


def top_directions(
    matrix: torch.Tensor,
    rank: int,
    generator: torch.Generator | None,
    *,
    exact_max_dim: int = EXACT_SVD_MAX_DIM,
) -> LowRank:
    """The `rank` leading singular directions of a [m, n] matrix: exact for small matrices or
    large ranks, randomized otherwise (see EXACT_SVD_MAX_DIM)."""
    full = min(matrix.shape)
    rank = min(rank, full)
    sketch = rank + OVERSAMPLE
    if full <= exact_max_dim or 2 * sketch >= full:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # [m, f], [f], [f, n]
        return LowRank(u, s, vh).top(rank)
    return _randomized(matrix, sketch, generator).top(rank)


def _randomized(matrix: torch.Tensor, sketch: int, generator: torch.Generator | None) -> LowRank:
    """`sketch` approximate leading directions of a [m, n] matrix by a randomized range finder
    with power iterations (re-orthonormalised each pass, so small directions survive)."""
    # The test matrix is drawn on the generator's device (the CPU for the engine's generators),
    # so the same seed gives the same draws wherever the merge computes.
    test = torch.randn(matrix.shape[1], sketch, generator=generator)  # [n, q]
    basis = torch.linalg.qr(matrix @ test.to(matrix)).Q  # [m, q]
    for _ in range(POWER_ITERATIONS):
        co_basis = torch.linalg.qr(matrix.T @ basis).Q  # [n, q]
        basis = torch.linalg.qr(matrix @ co_basis).Q  # [m, q]
    small_u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)  # [q, q], [q], [q, n]
    return LowRank(basis @ small_u, s, vh)  # u: [m, q] @ [q, q] -> [m, q]


def energy_rank(singular_values: torch.Tensor, energy: float, total: float) -> int:
    """The fewest leading directions whose squared singular values reach `energy` of `total`
    (at least 1; all of them when they do not reach it)."""
    kept = singular_values.double().square().cumsum(0)  # [k]
    # Float32 singular values carry ~1e-6 relative error: a share that close counts as reached,
    # so that energy 1.0 does not keep noise directions.
    short = int((kept < energy * total * (1 - ENERGY_TOLERANCE)).sum())
    return max(1, min(short + 1, singular_values.numel()))


def factor_bytes(shape: tuple[int, int], rank: int, *, element_size: int = 4) -> int:
    """Bytes of the factors U·S [m, rank] and V [n, rank] of a [m, n] matrix."""
    rows, cols = shape
    return (rows + cols) * rank * element_size


def _keeps_all(matrix: torch.Tensor, truncation: Truncation) -> bool:
    """Whether `truncation` keeps every direction, so the matrix comes back as it is."""
    if truncation.rank is not None:
        return truncation.rank >= min(matrix.shape)
    return truncation.energy is not None and truncation.energy >= 1.0
