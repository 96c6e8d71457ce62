"""Low-rank factors of one weight delta: `delta ≈ B·A` from its singular value decomposition.

Exact SVD for matrices whose smaller side is at most `RankChoice.exact_limit`; above it,
randomized SVD (`torch.svd_lowrank`, with oversampling and power iterations, from a fixed seed so
the same inputs give the same adapter). The rank is fixed (`rank`) or the smallest that keeps a
share (`energy`) of the delta's squared singular values, i.e. of its squared Frobenius norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfmerge.errors import OptionError

_START_RANK = 32  # randomized SVD's first try when the rank comes from `energy`


@dataclass(frozen=True)
class RankChoice:
    """How each delta's rank is chosen: a fixed `rank`, or the share `energy` of its energy."""

    rank: int | None = 16
    energy: float | None = None  # in (0, 1]; set: the rank comes from it, `rank` is ignored
    exact_limit: int = 1024  # exact SVD up to this smaller side; randomized above
    oversample: int = 10  # extra columns of the randomized SVD's sketch
    power_iterations: int = 4  # sharpen the sketch's spectrum (decaying singular values)
    seed: int = 0


def rank_choice(rank: int | None, energy: float | None) -> RankChoice:
    """The choice `--rank` / `--energy` ask for (rank 16 when neither is given).

    Raises:
        OptionError: both given, a rank below 1, or an energy outside (0, 1].
    """
    if rank is not None and energy is not None:
        raise OptionError(
            "--energy", str(energy), "is given with --rank", fix="give --rank or --energy, not both"
        )
    if rank is not None and rank < 1:
        raise OptionError("--rank", str(rank), "is not a positive rank", fix="give 1 or more")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise OptionError(
            "--energy",
            str(energy),
            "is not a share of the energy",
            fix="give a number above 0 and at most 1, such as 0.9",
        )
    if energy is not None:
        return RankChoice(rank=None, energy=energy)
    return RankChoice() if rank is None else RankChoice(rank=rank)


@dataclass(frozen=True)
class Factors:
    """`delta ≈ b @ a`, with the share of the delta's squared Frobenius norm they keep."""

    b: torch.Tensor  # [out, k]
    a: torch.Tensor  # [k, in]
    energy: float

    @property
    def rank(self) -> int:
        """k, the number of kept singular values."""
        return int(self.a.shape[0])


def factorize(delta: torch.Tensor, choice: RankChoice) -> Factors:
    """The factors of float32 `delta` [out, in] at the rank `choice` gives (at least 1).

    The singular values are split evenly, `b = U·√S`, `a = √S·Vᵀ`, so neither factor dwarfs the
    other in a lower precision.
    """
    total = float(delta.square().sum())
    full = min(delta.shape)
    if total == 0.0:  # nothing to keep: one zero pair keeps the module's place in the adapter
        zero_b, zero_a = delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1, delta.shape[1])
        return Factors(zero_b, zero_a, 1.0)
    if full <= choice.exact_limit:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = _rank(s, total, choice, full)
    else:
        u, s, vh, k = _randomized(delta, total, choice, full)
    root = s[:k].sqrt()
    b = u[:, :k] * root  # [out, k]: columns scaled by √s
    a = root[:, None] * vh[:k]  # [k, in]: rows scaled by √s
    kept = float(s[:k].square().sum()) / total
    return Factors(b.contiguous(), a.contiguous(), min(kept, 1.0))


def _rank(s: torch.Tensor, total: float, choice: RankChoice, full: int) -> int:
    """The rank to keep of singular values `s` (descending) of a delta of energy `total`."""
    if choice.energy is None:
        assert choice.rank is not None
        return max(1, min(choice.rank, full))
    kept = torch.cumsum(s.double().square(), 0)  # [len(s)]
    # The first index keeping the share; a rounding shortfall at 1.0 keeps every value.
    k = int(torch.searchsorted(kept, torch.tensor(choice.energy * total, dtype=torch.float64)))
    return max(1, min(k + 1, full, len(s)))


def _randomized(
    delta: torch.Tensor, total: float, choice: RankChoice, full: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(U, S, Vᵀ, k) of a randomized SVD; with `energy`, the sketch grows until it keeps the
    share (or the exact SVD runs, once the sketch would cover half the matrix)."""
    want = choice.rank if choice.energy is None else _START_RANK
    assert want is not None
    while True:
        q = min(want + choice.oversample, full)
        if choice.energy is not None and 2 * q > full:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            return u, s, vh, _rank(s, total, choice, full)
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(choice.seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=choice.power_iterations)
        kept = float(s.double().square().sum())
        if choice.energy is None or kept >= choice.energy * total:
            return u, s, v.T, _rank(s, total, choice, full)
        want *= 2
