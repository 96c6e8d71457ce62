"""How the units of two layers correspond (Li et al. 2016, "Convergent Learning"): one-to-one,
one-to-many and many-to-many, from streamed first and second moments.

- one-to-one: the Hungarian matching on Pearson r (`analysis/units.py`), and the held-out R² of
  each B unit predicted by its matched A unit alone;
- one-to-many: each B unit regressed on all A units with an L1 penalty (standardised lasso on the
  fit windows, refit on the units it keeps); the mean number of A units used and the held-out R²;
- many-to-many: spectral co-clustering of the bipartite A–B graph of lasso ties
  (`analysis/coclusters.py`);
  mean |r| within groups against across groups, and how many A and B units each group holds.
"""

# The many-to-many graph weighs an A–B edge by the pair's standardised lasso coefficients, B unit
# on A's units and A unit on B's, averaged; zero where neither lasso uses the pair. The full |r|
# graph separates nothing: units of one trained network correlate strongly among themselves (|r|
# up to ~0.9 in the zoo models), so a B unit is tied almost as strongly to its copy's neighbours
# as to its copy, and even an exact permutation clusters into two halves. The coefficients keep
# what each unit adds given the others, which is what "corresponds" means: a permuted copy keeps
# exactly its matches, a block-wise mixing exactly its blocks, and a fine-tune (zoo:code) comes out
# one-to-one where |r| weights on the same edges merge it into two or three groups. Within/across
# are still reported as mean |r|.

# Held-out R² uses only moments: with coefficients W [d_a, d_b] and the intercept from the fit
# windows, the residual on held-out windows has mean Δm_b - Δm_aᵀW (Δ: held-out mean minus fit
# mean) and variance diag(C_bb - 2WᵀC_ab + WᵀC_aaW), all held-out covariances.

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from hfmerge.analysis.coclusters import CoClusters, co_cluster
from hfmerge.analysis.lasso import lasso_from_gram, refit_on_support
from hfmerge.analysis.similarity import CkaAccumulator
from hfmerge.analysis.units import correlations_of, matching

L1_PENALTY = 0.05  # in correlation units: an A unit enters only if its partial |r| exceeds it
DEAD_VARIANCE = 1e-24  # relative to the largest variance: a unit this flat is constant


@dataclass(frozen=True)
class Moments:
    """Sample count, means and population covariances of A's and B's units on some windows."""

    count: int
    mean_a: torch.Tensor  # [d_a]
    mean_b: torch.Tensor  # [d_b]
    cov_aa: torch.Tensor  # [d_a, d_a]
    cov_bb: torch.Tensor  # [d_b, d_b]
    cov_ab: torch.Tensor  # [d_a, d_b]

    @classmethod
    def of(cls, accumulator: CkaAccumulator) -> Moments:
        """The moments of the pairs fed to `accumulator`."""
        x, y = accumulator.x, accumulator.y
        if x.shift is None or y.shift is None:
            raise ValueError("no samples were added")
        return cls(
            count=accumulator.count,
            mean_a=x.shift + x.mean(),  # the sums are of rows shifted by the first batch's mean
            mean_b=y.shift + y.mean(),
            cov_aa=x.covariance(),
            cov_bb=y.covariance(),
            cov_ab=accumulator.cross_covariance(),
        )

    def pooled(self, other: Moments) -> Moments:
        """The moments of both sets of samples together."""
        n = self.count + other.count
        w, v = self.count / n, other.count / n
        da, db = self.mean_a - other.mean_a, self.mean_b - other.mean_b  # [d_a], [d_b]
        return Moments(
            count=n,
            mean_a=w * self.mean_a + v * other.mean_a,
            mean_b=w * self.mean_b + v * other.mean_b,
            # Law of total covariance: within-set covariances plus that of the two set means.
            cov_aa=w * self.cov_aa + v * other.cov_aa + w * v * torch.outer(da, da),
            cov_bb=w * self.cov_bb + v * other.cov_bb + w * v * torch.outer(db, db),
            cov_ab=w * self.cov_ab + v * other.cov_ab + w * v * torch.outer(da, db),
        )


@dataclass(frozen=True)
class OneToOne:
    """The matched-unit correlation, as `cka --units` reports it."""

    matched_correlation: float  # mean r over the matching that maximises Σ r
    same_index_correlation: float | None  # mean r of unit i with unit i; equal widths only


@dataclass(frozen=True)
class OneToMany:
    """Sparse prediction of every B unit from A's units, scored on held-out windows."""

    l1_penalty: float
    mean_units_used: float  # A units with a nonzero coefficient, mean over B's varying units
    max_units_used: int
    heldout_r2: float  # mean over B's varying units of the sparse (refit) prediction's R²
    single_unit_heldout_r2: float  # the same for the one-to-one matched A unit alone


@dataclass(frozen=True)
class ManyToMany:
    """Groups of A and B units from spectral co-clustering of the lasso-coefficient graph."""

    groups: int
    within_abs_r: float  # mean |r| over A–B pairs in the same group
    across_abs_r: float  # mean |r| over A–B pairs in different groups
    mean_units_a: float  # per group
    mean_units_b: float
    max_group_units: int  # A + B units of the largest group
    one_to_one_groups: int  # groups of exactly one A and one B unit
    ungrouped_a: int  # A units with no tie (no lasso in either direction uses them)
    ungrouped_b: int
    sizes: list[tuple[int, int]]  # (A units, B units) of every group, largest first


@dataclass(frozen=True)
class LayerCorrespondence:
    """All three views of one pair of layers."""

    layer_a: str
    layer_b: str
    one_to_one: OneToOne
    one_to_many: OneToMany
    many_to_many: ManyToMany

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (`sizes` as lists)."""
        document = asdict(self)
        document["many_to_many"]["sizes"] = [list(s) for s in self.many_to_many.sizes]
        return document


def layer_correspondence(
    fit: Moments,
    heldout: Moments,
    *,
    layer_a: str = "",
    layer_b: str = "",
    l1_penalty: float = L1_PENALTY,
) -> LayerCorrespondence:
    """The three views; correlations on all windows, regressions fit on `fit` and scored on
    `heldout`."""
    if fit.count < 2 or heldout.count < 2:
        raise ValueError(
            f"unit correspondence needs at least 2 fit and 2 held-out samples, "
            f"got {fit.count} and {heldout.count}"
        )
    corr_aa, corr_bb, corr_ab = correlations_of(*_covariances(fit.pooled(heldout)))
    rows, cols = matching(corr_ab)
    units_a, units_b = corr_ab.shape
    one_to_one = OneToOne(
        matched_correlation=float(corr_ab[rows, cols].mean()),
        same_index_correlation=float(corr_ab.diagonal().mean()) if units_a == units_b else None,
    )
    return LayerCorrespondence(
        layer_a,
        layer_b,
        one_to_one,
        one_to_many(fit, heldout, l1_penalty=l1_penalty),
        many_to_many(corr_aa, corr_bb, corr_ab, l1_penalty=l1_penalty),
    )


def _covariances(m: Moments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return m.cov_aa, m.cov_bb, m.cov_ab


def one_to_many(fit: Moments, heldout: Moments, *, l1_penalty: float = L1_PENALTY) -> OneToMany:
    """Lasso of each B unit on A's units (fit windows), against its matched A unit alone."""
    corr_aa, _, corr_ab = correlations_of(*_covariances(fit))
    std_a, std_b = _std(fit.cov_aa), _std(fit.cov_bb)  # [d_a], [d_b]
    lasso = lasso_from_gram(corr_aa, corr_ab, penalty=l1_penalty)  # [d_a, d_b], standardised
    support = lasso != 0
    refit = refit_on_support(corr_aa, corr_ab, support)  # [d_a, d_b], standardised
    # Back to raw units: b = Σ_k β_k·(σ_b/σ_a,k)·a_k; a constant A unit gets 0.
    scale = torch.where(std_a > 0, 1 / std_a.clamp_min(1e-300), 0.0)[:, None] * std_b[None, :]
    rows, cols = matching(corr_ab)  # on the fit windows: nothing is chosen on held-out data
    single = torch.zeros_like(corr_ab)  # [d_a, d_b]: each matched B unit on its A unit alone
    single[rows, cols] = corr_ab[rows, cols]
    varying = _varying(fit.cov_bb) & _varying(heldout.cov_bb)  # [d_b]
    used = support.sum(0)[varying].double()  # [b']
    return OneToMany(
        l1_penalty=l1_penalty,
        mean_units_used=float(used.mean()) if used.numel() else 0.0,
        max_units_used=int(used.max()) if used.numel() else 0,
        heldout_r2=_mean(heldout_r2(refit * scale, fit, heldout)[varying]),
        single_unit_heldout_r2=_mean(heldout_r2(single * scale, fit, heldout)[varying]),
    )


def heldout_r2(weights: torch.Tensor, fit: Moments, heldout: Moments) -> torch.Tensor:
    """R² [d_b] on `heldout` of b ≈ m_b + (a - m_a)ᵀW, means m from `fit`, W [d_a, d_b] raw."""
    shift = (heldout.mean_b - fit.mean_b) - (heldout.mean_a - fit.mean_a) @ weights  # [d_b]
    variance_b = heldout.cov_bb.diagonal()  # [d_b]
    residual_variance = (
        variance_b
        - 2 * (weights * heldout.cov_ab).sum(0)  # diag(WᵀC_ab) [d_b]
        + (weights * (heldout.cov_aa @ weights)).sum(0)  # diag(WᵀC_aaW) [d_b]
    )
    error = residual_variance.clamp_min(0) + shift**2  # mean squared error [d_b]
    return 1 - error / variance_b.clamp_min(1e-300)


def unit_groups(
    corr_aa: torch.Tensor,
    corr_bb: torch.Tensor,
    corr_ab: torch.Tensor,
    *,
    l1_penalty: float = L1_PENALTY,
    seed: int = 0,
) -> CoClusters:
    """Co-cluster A's and B's units on the graph of their standardised lasso coefficients, each
    side regressed on the other (mean of the two |β|)."""
    b_on_a = lasso_from_gram(corr_aa, corr_ab, penalty=l1_penalty)  # [d_a, d_b]
    a_on_b = lasso_from_gram(corr_bb, corr_ab.T, penalty=l1_penalty)  # [d_b, d_a]
    return co_cluster((b_on_a.abs() + a_on_b.abs().T) / 2, seed=seed)  # [d_a, d_b]


def many_to_many(
    corr_aa: torch.Tensor,
    corr_bb: torch.Tensor,
    corr_ab: torch.Tensor,
    *,
    l1_penalty: float = L1_PENALTY,
    seed: int = 0,
) -> ManyToMany:
    """The groups of `unit_groups`, summarised: |r| within and across, and their sizes."""
    clusters = unit_groups(corr_aa, corr_bb, corr_ab, l1_penalty=l1_penalty, seed=seed)
    same = clusters.labels_a[:, None] == clusters.labels_b[None, :]  # [d_a, d_b]
    same &= (clusters.labels_a >= 0)[:, None]
    strength = corr_ab.abs()
    labels = sorted(set(torch.cat([clusters.labels_a, clusters.labels_b]).tolist()))
    sizes = sorted(
        (
            (int((clusters.labels_a == g).sum()), int((clusters.labels_b == g).sum()))
            for g in labels
            if g >= 0
        ),
        key=lambda s: (-sum(s), -s[0]),
    )
    return ManyToMany(
        groups=len(sizes),
        within_abs_r=_mean(strength[same]),
        across_abs_r=_mean(strength[~same]),
        mean_units_a=sum(a for a, _ in sizes) / max(len(sizes), 1),
        mean_units_b=sum(b for _, b in sizes) / max(len(sizes), 1),
        max_group_units=max((a + b for a, b in sizes), default=0),
        one_to_one_groups=sum(1 for s in sizes if s == (1, 1)),
        ungrouped_a=int((clusters.labels_a < 0).sum()),
        ungrouped_b=int((clusters.labels_b < 0).sum()),
        sizes=sizes,
    )


def _std(cov: torch.Tensor) -> torch.Tensor:
    std = cov.diagonal().clamp_min(0).sqrt()  # [d]
    return torch.where(_varying(cov), std, 0.0)


def _varying(cov: torch.Tensor) -> torch.Tensor:
    variance = cov.diagonal()  # [d]
    return variance > DEAD_VARIANCE * float(variance.max().clamp_min(1e-300))


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")


__all__ = [
    "L1_PENALTY",
    "LayerCorrespondence",
    "ManyToMany",
    "Moments",
    "OneToMany",
    "OneToOne",
    "heldout_r2",
    "layer_correspondence",
    "many_to_many",
    "one_to_many",
    "unit_groups",
]
