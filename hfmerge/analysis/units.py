"""Unit-level correspondence of two layers (Li et al. 2016, "Convergent Learning"), from CKA's sums.

One-to-one matched-unit correlation (Hungarian), and the share of B's units few A units predict.
"""

# Unlike CKA, these numbers see the basis: a permuted copy scores ~1 after matching but low at equal
# indices, and a rotated copy scores low even after matching. That is what weight averaging needs.

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from hfmerge.analysis.similarity import CkaAccumulator

TOP_K = 5
R2_THRESHOLD = 0.5


@dataclass(frozen=True)
class UnitCorrespondence:
    """How well A's units account for B's units in one pair of layers."""

    matched_correlation: float  # mean Pearson r over the one-to-one matching maximising Σ r
    same_index_correlation: float | None  # mean r of unit i with unit i (no matching); equal widths
    predicted_share: float  # share of B's varying units with R² > r2_threshold from top_k A units
    units_a: int
    units_b: int
    top_k: int
    r2_threshold: float

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def correlations(accumulator: CkaAccumulator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pearson correlations: A with A [d_a, d_a], B with B [d_b, d_b], A with B [d_a, d_b].

    A unit that never varies correlates 0 with everything (1 with itself, so solves stay regular).
    """
    return correlations_of(
        accumulator.x.covariance(), accumulator.y.covariance(), accumulator.cross_covariance()
    )


def correlations_of(
    cov_aa: torch.Tensor, cov_bb: torch.Tensor, cov_ab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`correlations` from the covariances [d_a, d_a], [d_b, d_b] and [d_a, d_b]."""
    std_a = cov_aa.diagonal().clamp_min(0).sqrt()  # [d_a]
    std_b = cov_bb.diagonal().clamp_min(0).sqrt()  # [d_b]
    corr_aa = _normalise(cov_aa, std_a, std_a)
    corr_bb = _normalise(cov_bb, std_b, std_b)
    corr_aa.fill_diagonal_(1.0)
    corr_bb.fill_diagonal_(1.0)
    return corr_aa, corr_bb, _normalise(cov_ab, std_a, std_b)


def _normalise(cov: torch.Tensor, std_rows: torch.Tensor, std_cols: torch.Tensor) -> torch.Tensor:
    scale = torch.outer(std_rows, std_cols)  # [rows, cols]
    # Relative floor: a unit whose std is ~1e-12 of the largest is constant up to rounding.
    floor = 1e-12 * float(scale.max()) if scale.numel() else 0.0
    return torch.where(scale > floor, cov / scale.clamp_min(1e-300), 0.0)


def matching(corr_ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-to-one matching of units that maximises total correlation: A indices, B indices
    (min(d_a, d_b) pairs each)."""
    # Imported here: importing scipy.optimize is slow, and every merge would pay for it via the
    # CKA gate's import of this module.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr_ab.numpy(), maximize=True)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def matched_correlation(corr_ab: torch.Tensor) -> float:
    """Mean correlation over the one-to-one matching of units that maximises total correlation."""
    rows, cols = matching(corr_ab)
    return float(corr_ab[rows, cols].mean())


def sparse_r2(corr_aa: torch.Tensor, corr_ab: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """R² [d_b] of each B unit by least squares on its `top_k` most correlated (|r|) A units."""
    k = min(top_k, corr_aa.shape[0])
    corr_ba = corr_ab.T  # [d_b, d_a]
    picks = corr_ba.abs().topk(k, dim=1).indices  # [d_b, k]
    r = corr_ba.gather(1, picks)  # [d_b, k]: r(A_s, B_j) for the picked s
    gram = corr_aa[picks[:, :, None], picks[:, None, :]]  # [d_b, k, k]: r(A_s, A_t)
    # Least squares on standardised units: β = R_SS⁻¹ r_S and R² = r_Sᵀ β. gelsd copes with
    # duplicate or dead units (singular R_SS) by the minimum-norm solution.
    beta = torch.linalg.lstsq(gram, r.unsqueeze(-1), driver="gelsd").solution  # [d_b, k, 1]
    r2: torch.Tensor = (r.unsqueeze(1) @ beta).reshape(-1)  # [d_b,1,k] @ [d_b,k,1] -> [d_b]
    return r2.clamp(0.0, 1.0)


def unit_correspondence(
    accumulator: CkaAccumulator, *, top_k: int = TOP_K, r2_threshold: float = R2_THRESHOLD
) -> UnitCorrespondence:
    """Li et al.'s one-to-one and few-to-one unit statistics of the pair fed to `accumulator`."""
    if accumulator.count < 2:
        raise ValueError(f"unit correlations need at least 2 samples, got {accumulator.count}")
    corr_aa, _, corr_ab = correlations(accumulator)
    units_a, units_b = corr_ab.shape
    same = float(corr_ab.diagonal().mean()) if units_a == units_b else None
    variance_b = accumulator.y.covariance().diagonal()  # [d_b]
    varying = variance_b > 1e-24 * float(variance_b.max())  # dead units cannot be predicted
    r2 = sparse_r2(corr_aa, corr_ab, top_k=top_k)[varying]
    share = float((r2 > r2_threshold).double().mean()) if r2.numel() else 0.0
    return UnitCorrespondence(
        matched_correlation=matched_correlation(corr_ab),
        same_index_correlation=same,
        predicted_share=share,
        units_a=units_a,
        units_b=units_b,
        top_k=min(top_k, units_a),
        r2_threshold=r2_threshold,
    )


__all__ = [
    "R2_THRESHOLD",
    "TOP_K",
    "UnitCorrespondence",
    "correlations",
    "correlations_of",
    "matched_correlation",
    "matching",
    "sparse_r2",
    "unit_correspondence",
]
