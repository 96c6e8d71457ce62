"""Unit correspondence math on planted activations with known answers: permutations, invertible
mixing inside known blocks, unrelated units; the lasso, held-out R², pooled moments, eigengap."""

from __future__ import annotations

import pytest
import torch

from hfmerge.analysis.coclusters import co_cluster, eigengap_groups
from hfmerge.analysis.correspondence import (
    LayerCorrespondence,
    Moments,
    heldout_r2,
    layer_correspondence,
    unit_groups,
)
from hfmerge.analysis.lasso import lasso_from_gram, refit_on_support, soft_threshold
from hfmerge.analysis.similarity import CkaAccumulator
from hfmerge.analysis.units import correlations_of

SAMPLES, FIT = 4000, 3000
BLOCKS = [2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3]  # 50 units


def moments(a: torch.Tensor, b: torch.Tensor, *, batch: int = 700) -> Moments:
    accumulator = CkaAccumulator(a.shape[1], b.shape[1])
    for start in range(0, a.shape[0], batch):  # streamed, as the probes feed it
        accumulator.update(a[start : start + batch], b[start : start + batch])
    return Moments.of(accumulator)


def covariances(m: Moments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return m.cov_aa, m.cov_bb, m.cov_ab


def correspond(a: torch.Tensor, b: torch.Tensor) -> LayerCorrespondence:
    return layer_correspondence(moments(a[:FIT], b[:FIT]), moments(a[FIT:], b[FIT:]))


def correlated_units(width: int, *, seed: int) -> torch.Tensor:
    """[SAMPLES, width] activations with unequal scales, offsets and correlated units."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(width) + 0.3 * torch.randn(width, width, generator=generator) / width**0.5
    scales = 0.5 + torch.rand(width, generator=generator)  # [width]
    units: torch.Tensor = (torch.randn(SAMPLES, width, generator=generator) * scales) @ mixing
    return units + 3.0  # [SAMPLES, width]


def block_mixing(sizes: list[int], *, seed: int) -> torch.Tensor:
    """Block-diagonal invertible map: every entry of a block is 0.5 to 1.5 in size, any sign."""
    generator = torch.Generator().manual_seed(seed)
    width = sum(sizes)
    mixing = torch.zeros(width, width)
    start = 0
    for size in sizes:
        while True:
            signs = torch.randn(size, size, generator=generator).sign()
            block = signs * (0.5 + torch.rand(size, size, generator=generator))
            if torch.linalg.cond(block) < 10:  # well inside the invertible maps
                break
        mixing[start : start + size, start : start + size] = block
        start += size
    return mixing


def partition(labels_a: torch.Tensor, labels_b: torch.Tensor) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for side, labels in (("a", labels_a), ("b", labels_b)):
        for unit, label in enumerate(labels.tolist()):
            groups.setdefault(label, set()).add(f"{side}{unit}")
    return {frozenset(g) for g in groups.values()}


def test_a_permutation_is_one_to_one_on_every_view() -> None:
    a = correlated_units(50, seed=0)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    result = correspond(a, a[:, perm])
    assert result.one_to_one.matched_correlation == pytest.approx(1.0, abs=1e-9)
    assert result.one_to_one.same_index_correlation is not None
    assert result.one_to_one.same_index_correlation < 0.2
    assert result.one_to_many.mean_units_used == 1.0
    assert result.one_to_many.heldout_r2 == pytest.approx(1.0, abs=1e-9)
    assert result.one_to_many.single_unit_heldout_r2 == pytest.approx(1.0, abs=1e-9)
    groups = result.many_to_many
    assert groups.sizes == [(1, 1)] * 50
    assert groups.within_abs_r == pytest.approx(1.0, abs=1e-9)
    assert groups.across_abs_r < 0.1


def test_mixing_inside_blocks_is_recovered_exactly() -> None:
    a = correlated_units(50, seed=2)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    b = (a @ block_mixing(BLOCKS, seed=4))[:, perm]  # B's unit j = a mix of one block of A
    result = correspond(a, b)
    # Planted partition: block k's A units with the B units that mix them.
    starts = torch.tensor([0, *BLOCKS]).cumsum(0)[:-1].tolist()
    position = perm.argsort()  # where A's column i landed in B
    planted = {
        frozenset(
            [f"a{i}" for i in range(s, s + n)] + [f"b{int(position[i])}" for i in range(s, s + n)]
        )
        for s, n in zip(starts, BLOCKS, strict=True)
    }
    everything = moments(a, b)
    clusters = unit_groups(*correlations_of(*covariances(everything)))
    assert partition(clusters.labels_a, clusters.labels_b) == planted
    assert sorted(result.many_to_many.sizes) == sorted((n, n) for n in BLOCKS)
    # One-to-many: each B unit uses exactly its block's units, and they predict it exactly.
    mean_block = sum(n * n for n in BLOCKS) / sum(BLOCKS)  # mean over B units of their block size
    assert result.one_to_many.mean_units_used == pytest.approx(mean_block)
    assert result.one_to_many.heldout_r2 > 0.999999
    assert result.one_to_many.single_unit_heldout_r2 < 0.7
    assert result.one_to_one.matched_correlation < 0.8
    assert result.many_to_many.within_abs_r > 5 * result.many_to_many.across_abs_r


def test_unrelated_units_are_low_on_every_measure() -> None:
    a = correlated_units(50, seed=5)
    b = correlated_units(50, seed=6)
    result = correspond(a, b)
    assert result.one_to_one.matched_correlation < 0.1
    assert result.one_to_many.mean_units_used < 1.0
    assert result.one_to_many.heldout_r2 < 0.01
    assert result.one_to_many.single_unit_heldout_r2 < 0.01
    assert result.many_to_many.within_abs_r < 0.1
    assert result.many_to_many.ungrouped_a + result.many_to_many.ungrouped_b > 50


def test_lasso_on_orthonormal_predictors_is_the_soft_threshold() -> None:
    target = torch.randn(6, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    beta = lasso_from_gram(torch.eye(6, dtype=torch.float64), target, penalty=0.3)
    torch.testing.assert_close(beta, soft_threshold(target, 0.3), atol=1e-8, rtol=0)
    assert bool((beta == 0).any())  # exact zeros where |t| <= 0.3


def test_lasso_meets_its_optimality_conditions() -> None:
    a = correlated_units(20, seed=8)[:500].double()
    a = (a - a.mean(0)) / a.std(0, unbiased=False)  # standardised: G is a correlation matrix
    b = a[:, :5] @ torch.randn(5, 7, generator=torch.Generator().manual_seed(9), dtype=a.dtype)
    gram, target = a.T @ a / 500, a.T @ b / 500  # [20, 20], [20, 7]
    beta = lasso_from_gram(gram, target, penalty=0.05)
    gradient = target - gram @ beta  # [20, 7]
    used = beta != 0
    # KKT: on the support the gradient equals λ·sign(β); off it, |gradient| ≤ λ.
    torch.testing.assert_close(gradient[used], 0.05 * beta[used].sign(), atol=1e-6, rtol=0)
    assert float(gradient[~used].abs().max()) <= 0.05 + 1e-6
    # The refit on the support solves the least squares there exactly.
    refit = refit_on_support(gram, target, used)
    residual = target - gram @ refit
    torch.testing.assert_close(residual[used], torch.zeros_like(residual[used]), atol=1e-9, rtol=0)
    assert bool((refit[~used] == 0).all())


def test_heldout_r2_from_moments_equals_the_direct_computation() -> None:
    generator = torch.Generator().manual_seed(10)
    a = torch.randn(900, 4, generator=generator, dtype=torch.float64) + 2.0
    b = a @ torch.randn(4, 3, generator=generator, dtype=a.dtype)
    b = b + torch.randn(900, 3, generator=generator, dtype=a.dtype) + 1.0
    fit, held = moments(a[:600], b[:600]), moments(a[600:], b[600:])
    weights = torch.randn(4, 3, generator=generator, dtype=a.dtype)
    prediction = fit.mean_b + (a[600:] - fit.mean_a) @ weights  # [300, 3]
    error = ((b[600:] - prediction) ** 2).mean(0)
    direct = 1 - error / b[600:].var(0, unbiased=False)
    torch.testing.assert_close(heldout_r2(weights, fit, held), direct, atol=1e-9, rtol=0)


def test_pooled_moments_equal_those_of_all_samples() -> None:
    a, b = correlated_units(6, seed=11).double(), correlated_units(5, seed=12).double()
    b = b + 10.0 * (torch.arange(SAMPLES) >= FIT).double()[:, None]  # the two sets' means differ
    pooled = moments(a[:FIT], b[:FIT]).pooled(moments(a[FIT:], b[FIT:]))
    whole = moments(a, b)
    assert pooled.count == whole.count == SAMPLES
    for name in ("mean_a", "mean_b", "cov_aa", "cov_bb", "cov_ab"):
        torch.testing.assert_close(getattr(pooled, name), getattr(whole, name), atol=1e-9, rtol=0)


def test_the_eigengap_counts_disconnected_blocks() -> None:
    sigma = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.2, 0.1], dtype=torch.float64)
    assert eigengap_groups(sigma) == 3
    assert eigengap_groups(torch.ones(5, dtype=torch.float64)) == 5  # a permutation: all ones
    assert eigengap_groups(sigma, max_groups=2) == 2
    # Two disconnected 2×2 blocks: two groups, each with its own A and B units.
    weights = torch.tensor([[1, 0.5, 0, 0], [0.5, 1, 0, 0], [0, 0, 1, 0.9], [0, 0, 0.9, 1]])
    clusters = co_cluster(weights.double())
    assert clusters.groups == 2
    assert partition(clusters.labels_a, clusters.labels_b) == {
        frozenset({"a0", "a1", "b0", "b1"}),
        frozenset({"a2", "a3", "b2", "b3"}),
    }
