"""Sparsification primitives: exact top-k with ties, outlier bands, DARE and DELLA drops."""

from __future__ import annotations

import itertools

import pytest
import torch

from hfmerge.methods.sparsify import (
    band_mask,
    magnitude_prune,
    outlier_prune,
    random_prune,
    rank_fraction,
    ranked_random_prune,
    topk_mask,
)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k", [0, 1, 7, 29, 30, 45])
def test_topk_mask_selects_exactly_the_k_largest(k: int) -> None:
    scores = randn(5, 6, seed=k).abs()
    mask = topk_mask(scores, k)
    expected = min(k, scores.numel())
    assert mask.shape == scores.shape
    assert int(mask.sum()) == expected
    if 0 < expected < scores.numel():
        assert scores[mask].min() > scores[~mask].max()


def test_topk_mask_breaks_ties_by_position_and_nests() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False, False]
    masks = [topk_mask(scores, k) for k in range(scores.numel() + 1)]
    assert [int(m.sum()) for m in masks] == list(range(7))
    for smaller, larger in itertools.pairwise(masks):
        assert bool((smaller & ~larger).sum() == 0)  # every top-k set lies in the top-(k+1) set


def test_band_mask_skips_the_top_and_keeps_the_next() -> None:
    scores = torch.arange(10.0).flip(0)  # 9, 8, ..., 0
    mask = band_mask(scores, skip_top=2, keep=3)
    assert scores[mask].tolist() == [7.0, 6.0, 5.0]


def test_magnitude_prune_counts_like_mergekit() -> None:
    delta = randn(40, seed=1)
    assert int((magnitude_prune(delta, 0.31, rescale=False) != 0).sum()) == 12  # floor(12.4)
    assert int((magnitude_prune(delta, 0.001, rescale=False) != 0).sum()) == 1  # at least one
    assert torch.equal(magnitude_prune(delta, 0.0, rescale=False), torch.zeros(40))
    assert magnitude_prune(delta, 1.0, rescale=False) is delta


def test_magnitude_prune_keeps_exact_count_under_ties() -> None:
    delta = torch.tensor([1.0, -1.0, 1.0, -1.0, 3.0, 0.5])
    pruned = magnitude_prune(delta, 0.5, rescale=False)
    assert pruned.tolist() == [1.0, -1.0, 0.0, 0.0, 3.0, 0.0]


def test_outlier_prune_drops_top_gamma_and_the_smallest() -> None:
    delta = randn(200, seed=2)
    pruned = outlier_prune(delta, 0.5, 0.1, rescale=False)
    order = delta.abs().argsort(descending=True)
    kept = torch.zeros(200, dtype=torch.bool)
    kept[order[20:120]] = True
    assert torch.equal(pruned != 0, kept)


def test_outlier_prune_keeps_density_when_gamma_does_not_fit() -> None:
    delta = randn(100, seed=3)
    pruned = outlier_prune(delta, 0.95, 0.1, rescale=False)
    order = delta.abs().argsort(descending=True)
    assert int((pruned != 0).sum()) == 95
    assert bool((pruned[order[:5]] == 0).all())  # only 5 outliers can go


def test_random_prune_keeps_about_density_and_rescales_l1() -> None:
    delta = randn(20_000, seed=4)
    pruned = random_prune(delta, 0.3, rescale=True, generator=generator(0))
    assert abs(float((pruned != 0).float().mean()) - 0.3) < 0.02
    torch.testing.assert_close(pruned.abs().sum(), delta.abs().sum())
    plain = random_prune(delta, 0.3, rescale=False, generator=generator(0))
    assert torch.equal(plain != 0, pruned != 0)
    assert torch.equal(plain[plain != 0], delta[plain != 0])


def test_rank_fraction_scales_ranks_per_row() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    assert rank_fraction(scores).tolist() == [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]
    assert rank_fraction(torch.tensor([[7.0], [1.0]])).tolist() == [[0.5], [0.5]]


def test_ranked_random_prune_keeps_large_entries_more_often() -> None:
    delta = randn(4, 5_000, seed=5)
    pruned = ranked_random_prune(delta, 0.5, 0.4, rescale=False, generator=generator(1))
    small = delta.abs() < delta.abs().median(dim=1, keepdim=True).values
    kept = pruned != 0
    # Keep probabilities run from 0.1 to 0.9: means 0.3 below the median, 0.7 above.
    assert abs(float(kept[small].float().mean()) - 0.3) < 0.03
    assert abs(float(kept[~small].float().mean()) - 0.7) < 0.03


def test_ranked_random_prune_ranks_within_output_rows() -> None:
    # Row 0 is tiny, row 1 huge: ranking over the whole tensor would drop most of row 0.
    delta = torch.cat([randn(1, 4_000, seed=6) * 1e-3, randn(1, 4_000, seed=7) * 1e3])
    kept = ranked_random_prune(delta, 0.5, 0.4, rescale=False, generator=generator(2)) != 0
    for row in kept:
        assert abs(float(row.float().mean()) - 0.5) < 0.03


def test_ranked_random_prune_handles_one_column_rows() -> None:
    delta = randn(3_000, 1, seed=8)
    pruned = ranked_random_prune(delta, 0.4, 0.2, rescale=False, generator=generator(3))
    assert torch.isfinite(pruned).all()
    assert abs(float((pruned != 0).float().mean()) - 0.4) < 0.03


@pytest.mark.parametrize("shape", [(0,), (0, 4)])
def test_primitives_accept_empty_tensors(shape: tuple[int, ...]) -> None:
    empty = torch.zeros(shape)
    assert magnitude_prune(empty, 0.5, rescale=True).shape == shape
    assert outlier_prune(empty, 0.5, 0.1, rescale=True).shape == shape
    assert random_prune(empty, 0.5, rescale=True, generator=generator(0)).shape == shape
    assert ranked_random_prune(empty, 0.5, 0.1, rescale=True, generator=generator(0)).shape == shape
