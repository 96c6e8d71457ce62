"""Linear CKA: agreement with the plain n×n formulas, invariances, the width pitfall, units."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hfmerge.analysis.similarity import (
    ESTIMATORS,
    CkaAccumulator,
    CkaMatrix,
    Estimator,
    cka_matrix,
    linear_cka,
)
from hfmerge.analysis.units import correlations, sparse_r2, unit_correspondence

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _related(
    n: int = 80, dx: int = 12, dy: int = 9, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """X with an offset, and Y a noisy linear map of X: CKA well inside (0, 1)."""
    g = _gen(seed)
    x = torch.randn(n, dx, generator=g, dtype=F64) * 2 + 3
    y = (
        x @ torch.randn(dx, dy, generator=g, dtype=F64)
        + 2 * torch.randn(n, dy, generator=g, dtype=F64)
        - 1
    )
    return x, y


def reference_unbiased_hsic(gram_k: torch.Tensor, gram_l: torch.Tensor) -> float:
    """Song et al. 2012, written out on n×n Grams with zeroed diagonals."""
    n = gram_k.shape[0]
    k, m = gram_k.clone(), gram_l.clone()
    k.fill_diagonal_(0)
    m.fill_diagonal_(0)
    one = torch.ones(n, dtype=F64)
    trace = torch.trace(k @ m)  # [n, n] @ [n, n]
    sums = (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
    cross = 2 / (n - 2) * (one @ k @ m @ one)  # [n] @ [n, n] @ [n, n] @ [n]
    return float((trace + sums - cross) / (n * (n - 3)))


def reference_biased_hsic(gram_k: torch.Tensor, gram_l: torch.Tensor) -> float:
    """Gretton et al. 2005 up to the constant 1/(n-1)², which CKA cancels: tr(KHLH)."""
    n = gram_k.shape[0]
    h = torch.eye(n, dtype=F64) - 1 / n  # centring matrix [n, n]
    return float(torch.trace(gram_k @ h @ gram_l @ h))  # [n, n] products


def reference_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool) -> float:
    """CKA from the Gram matrices K = XXᵀ, L = YYᵀ (no centring of the features)."""
    gram_k, gram_l = x @ x.T, y @ y.T  # [n, d] @ [d, n] -> [n, n]
    hsic = reference_unbiased_hsic if debiased else reference_biased_hsic
    return hsic(gram_k, gram_l) / math.sqrt(hsic(gram_k, gram_k) * hsic(gram_l, gram_l))


@pytest.mark.parametrize("debiased", [True, False])
def test_matches_the_direct_gram_formula(debiased: bool) -> None:
    x, y = _related()
    expected = reference_cka(x, y, debiased=debiased)
    assert 0.2 < expected < 0.95  # a value that would reveal a wrong term
    got = linear_cka(x, y, estimator="debiased" if debiased else "biased")
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("cuts", [[1, 2, 3, 40, 41, 79], [4, 7, 37], [5], [79]])
def test_uneven_minibatches_give_the_full_data_value(cuts: list[int]) -> None:
    x, y = _related(seed=1)
    accumulator = CkaAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x[:0], y[:0])  # an empty batch (all padding) first changes nothing
    edges = [0, *cuts, x.shape[0]]
    for start, end in itertools.pairwise(edges):
        accumulator.update(x[start:end], y[start:end])
    for estimator in ESTIMATORS:
        expected = reference_cka(x, y, debiased=estimator == "debiased")
        assert accumulator.value(estimator) == pytest.approx(expected, abs=1e-6)


def test_self_similarity_is_one() -> None:
    x, _ = _related(seed=2)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, estimator="biased") == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_rotation_scaling_translation_but_not_general_maps() -> None:
    x, y = _related(seed=3)
    base = linear_cka(x, y)
    q, _ = torch.linalg.qr(torch.randn(y.shape[1], y.shape[1], generator=_gen(9), dtype=F64))
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)  # [n, dy] @ [dy, dy]
    assert linear_cka(x * 37.5, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y - 100.0) == pytest.approx(base, abs=1e-10)
    stretch = torch.diag(torch.linspace(0.1, 10.0, y.shape[1], dtype=F64))
    assert abs(linear_cka(x, y @ stretch) - base) > 1e-3  # anisotropic scaling does change it


def test_huge_offset_costs_no_precision() -> None:
    x, y = _related(seed=4)
    shifted = CkaAccumulator(x.shape[1], y.shape[1])
    for start in range(0, 80, 16):  # later batches are centred with the first batch's mean
        shifted.update(x[start : start + 16] + 1e6, y[start : start + 16] - 1e6)
    assert shifted.value() == pytest.approx(reference_cka(x, y, debiased=True), abs=1e-8)


def test_independent_wide_features_debiased_near_zero_biased_near_one() -> None:
    g = _gen(5)
    x = torch.randn(48, 2048, generator=g, dtype=F64)
    y = torch.randn(48, 2048, generator=g, dtype=F64)
    assert abs(linear_cka(x, y)) < 0.05
    assert linear_cka(x, y, estimator="biased") > 0.9  # the pitfall: "similar" random features


def test_float32_batches_are_accumulated_in_float64() -> None:
    x, y = _related(seed=6)
    accumulator = CkaAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x.float(), y.float())
    assert accumulator.pair.xy.dtype == F64
    assert accumulator.value() == pytest.approx(
        reference_cka(x.float().double(), y.float().double(), debiased=True), abs=1e-9
    )


def test_errors_on_too_few_samples_unpaired_rows_and_unknown_estimator() -> None:
    x, y = _related(n=3)
    accumulator = CkaAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x, y)
    with pytest.raises(ValueError, match="at least 4"):
        accumulator.value()
    with pytest.raises(ValueError, match="pair up"):
        accumulator.update(x, y[:2])
    accumulator.update(*_related(n=5))
    with pytest.raises(ValueError, match="estimator"):
        accumulator.value("rbf")  # type: ignore[arg-type]


def test_constant_representation_is_nan_not_clamped() -> None:
    x, _ = _related()
    assert math.isnan(linear_cka(x, torch.ones(x.shape[0], 4, dtype=F64)))


def _layers(seed: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = _gen(seed)
    base = torch.randn(n, 6, generator=g, dtype=F64)
    xs = [
        base @ torch.randn(6, d, generator=g, dtype=F64) + torch.randn(n, d, generator=g, dtype=F64)
        for d in (5, 8, 7)
    ]
    ys = [
        base @ torch.randn(6, d, generator=g, dtype=F64) + torch.randn(n, d, generator=g, dtype=F64)
        for d in (4, 9)
    ]
    return xs, ys


def test_cka_matrix_streams_every_pair_exactly() -> None:
    xs, ys = _layers(seed=7, n=90)
    splits = [(0, 10), (10, 13), (13, 90)]
    matrix = cka_matrix(([x[a:b] for x in xs], [y[a:b] for y in ys]) for a, b in splits)
    assert matrix.shape == (3, 2)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(matrix[i, j]) == pytest.approx(
                reference_cka(x, y, debiased=True), abs=1e-6
            )


def _stored_bytes(matrix: CkaMatrix) -> int:
    streaming = matrix._streaming
    assert streaming is not None
    tensors = [
        t
        for s in (*streaming.stats_a, *streaming.stats_b)
        for t in (s.sum, s.self_sums.xy, s.self_sums.ay, s.self_sums.bx)
    ]
    tensors += [acc.pair.xy for row in streaming.pairs for acc in row]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_cka_matrix_memory_does_not_grow_with_samples() -> None:
    xs, ys = _layers(seed=8, n=400)
    matrix = CkaMatrix([x.shape[1] for x in xs], [y.shape[1] for y in ys])
    matrix.update([x[:20] for x in xs], [y[:20] for y in ys])  # 20 rows > width 9: streaming
    assert matrix.streaming
    before = _stored_bytes(matrix)
    for start in range(20, 400, 20):
        matrix.update([x[start : start + 20] for x in xs], [y[start : start + 20] for y in ys])
    assert matrix.count == 400
    assert _stored_bytes(matrix) == before


@pytest.mark.parametrize("estimator", ["debiased", "biased"])
def test_gram_form_for_few_samples_equals_the_streamed_sums(estimator: Estimator) -> None:
    xs, ys = _layers(seed=9, n=60)
    wide = [torch.cat([x, x[:, :2] * 3.0], dim=1) for x in xs]  # widths up to 9
    few = CkaMatrix([x.shape[1] for x in wide], [y.shape[1] for y in ys], buffer_rows=1000)
    streamed = CkaMatrix([x.shape[1] for x in wide], [y.shape[1] for y in ys], buffer_rows=0)
    for start, stop in ((0, 35), (35, 60)):
        for matrix in (few, streamed):
            matrix.update([x[start:stop] for x in wide], [y[start:stop] for y in ys])
    assert not few.streaming
    assert streamed.streaming
    assert few.count == streamed.count == 60
    gram, sums = few.values(estimator), streamed.values(estimator)
    assert torch.allclose(gram, sums, atol=1e-10)
    if estimator == "debiased":
        assert float(gram[1, 0]) == pytest.approx(
            reference_cka(wide[1], ys[0], debiased=True), abs=1e-9
        )
    assert few.accumulator(2, 1).value(estimator) == pytest.approx(float(sums[2, 1]), abs=1e-10)


def test_gram_form_gives_nan_for_a_constant_layer() -> None:
    x = torch.randn(12, 3, dtype=F64)
    matrix = CkaMatrix([3, 3], [3])
    matrix.update([x, torch.ones(12, 3, dtype=F64)], [x * 2.0])
    values = matrix.values()
    assert float(values[0, 0]) == pytest.approx(1.0)
    assert torch.isnan(values[1, 0])


def test_units_of_a_permuted_copy_match_perfectly_and_same_index_does_not() -> None:
    g = _gen(10)
    x = torch.randn(500, 16, generator=g, dtype=F64) @ torch.randn(16, 24, generator=g, dtype=F64)
    perm = torch.randperm(24, generator=g)
    accumulator = CkaAccumulator(24, 24)
    accumulator.update(x, x[:, perm])
    units = unit_correspondence(accumulator)
    assert units.matched_correlation == pytest.approx(1.0, abs=1e-9)
    assert units.same_index_correlation is not None
    assert units.same_index_correlation < 0.5
    assert units.predicted_share == 1.0


def test_units_see_rotations_and_independence_that_cka_ignores() -> None:
    g = _gen(11)
    x = torch.randn(2000, 32, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=F64))
    rotated = CkaAccumulator(32, 32)
    rotated.update(x, x @ q)  # [n, 32] @ [32, 32]
    assert rotated.value() == pytest.approx(1.0, abs=1e-9)
    assert unit_correspondence(rotated).matched_correlation < 0.6
    independent = CkaAccumulator(32, 32)
    independent.update(x, torch.randn(2000, 32, generator=g, dtype=F64))
    units = unit_correspondence(independent)
    assert units.matched_correlation < 0.1
    assert units.predicted_share == 0.0


def test_sparse_r2_recovers_a_two_unit_combination() -> None:
    g = _gen(12)
    a = torch.randn(1000, 10, generator=g, dtype=F64)
    b = torch.stack(
        [
            a[:, 2] - 2 * a[:, 7],  # exactly two of A's units
            torch.randn(1000, generator=g, dtype=F64),
        ],
        dim=1,
    )  # [n, 2]
    accumulator = CkaAccumulator(10, 2)
    accumulator.update(a, b)
    corr_aa, _, corr_ab = correlations(accumulator)
    r2 = sparse_r2(corr_aa, corr_ab, top_k=5)
    assert float(r2[0]) == pytest.approx(1.0, abs=1e-9)
    assert float(r2[1]) < 0.05
    assert float(sparse_r2(corr_aa, corr_ab, top_k=1)[0]) == pytest.approx(0.8, abs=0.05)
