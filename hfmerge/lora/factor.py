"""Low-rank factors of one weight delta: `delta ≈ B·A` from its singular value decomposition.

The SVD is the merge methods' (`methods/lowrank.py`): exact for matrices whose smaller side is at
most `RankChoice.exact_limit`, randomized above it, from a fixed seed so the same inputs give the
same adapter. The rank is fixed (`rank`) or the smallest that keeps a share (`energy`) of the
delta's squared singular values, i.e. of its squared Frobenius norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfmerge.errors import OptionError
from hfmerge.methods.lowrank import Truncation, low_rank


@dataclass(frozen=True)
class RankChoice:
    """How each delta's rank is chosen: a fixed `rank`, or the share `energy` of its energy."""

    rank: int | None = 16
    energy: float | None = None  # in (0, 1]; set: the rank comes from it, `rank` is ignored
    exact_limit: int = 1024  # exact SVD up to this smaller side; randomized above
    seed: int = 0  # of the randomized SVD's test matrix


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
    if total == 0.0:  # nothing to keep: one zero pair keeps the module's place in the adapter
        zero_b, zero_a = delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1, delta.shape[1])
        return Factors(zero_b, zero_a, 1.0)
    by_energy = choice.energy is not None
    truncation = Truncation(energy=choice.energy) if by_energy else Truncation(rank=choice.rank)
    generator = torch.Generator().manual_seed(choice.seed)
    found = low_rank(delta, truncation, generator, exact_max_dim=choice.exact_limit)
    root = found.s.sqrt()
    b = found.u * root  # [out, k]: columns scaled by √s
    a = root[:, None] * found.vh  # [k, in]: rows scaled by √s
    kept = float(found.s.double().square().sum()) / total
    return Factors(b.contiguous(), a.contiguous(), min(kept, 1.0))
