"""Linear CKA between two representations of the same samples, streamed over minibatches in float64.

Exact streaming debiased CKA (unbiased HSIC, Song et al. 2012) from O(d_a·d_b) sums; biased too.
"""

# Why exact streaming and not minibatch averaging (Nguyen et al. 2021): averaging per-batch unbiased
# HSIC only uses pairs of samples inside one batch. With token pooling a batch is a few sequences,
# so those pairs are mostly tokens of one sequence, which are far from independent; the value then
# depends on batching. The exact form below equals the full-data estimator over all n(n-1) pairs for
# any batching, and its memory is fixed (d_a·d_b float64 per pair), which is fine for the widths a
# few hundred wide that hfmerge compares layer by layer. Its cost is one d_a×d_b GEMM per batch.
#
# Derivation. With column-centred X̄, Ȳ (rows x̄_i, ȳ_i), a_i = ‖x̄_i‖², b_i = ‖ȳ_i‖², the unbiased
# HSIC of K = XXᵀ, L = YYᵀ (diagonals zeroed: K̃, L̃) is invariant to centring, and centring gives
# K̃1 = -a, 1ᵀK̃1 = -Σa, tr(K̃L̃) = ‖X̄ᵀȲ‖²_F - Σ a_i b_i, 1ᵀK̃L̃1 = Σ a_i b_i, so
#   n(n-3)·HSIC₁ = ‖X̄ᵀȲ‖²_F - n/(n-2)·Σ a_i b_i + ‖X̄‖²_F·‖Ȳ‖²_F / ((n-1)(n-2)).
# The centring is expanded algebraically so that plain running sums suffice (see `_centred`).

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

Estimator = Literal["debiased", "biased"]
ESTIMATORS: tuple[Estimator, ...] = ("debiased", "biased")
MIN_CKA_SAMPLES = 4  # the unbiased HSIC divides by n - 3


class _CrossSums:
    """Running sums over samples of x_i y_iᵀ, a_i b_i, a_i y_i and b_i x_i (a, b: squared norms)."""

    def __init__(self, dim_x: int, dim_y: int) -> None:
        self.xy = torch.zeros(dim_x, dim_y, dtype=torch.float64)
        self.ab = 0.0
        self.ay = torch.zeros(dim_y, dtype=torch.float64)
        self.bx = torch.zeros(dim_x, dtype=torch.float64)

    def add(self, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> None:
        """Add shifted rows `x` [n, dx], `y` [n, dy] with their squared norms `a`, `b` [n]."""
        self.xy += x.T @ y  # [dx, n] @ [n, dy] -> [dx, dy]
        self.ab += float(a @ b)  # [n] · [n] -> scalar
        self.ay += a @ y  # [n] @ [n, dy] -> [dy]
        self.bx += b @ x  # [n] @ [n, dx] -> [dx]


class FeatureStats:
    """Running sums of one representation: count, Σx, Σ‖x‖², and its cross sums with itself.

    Rows are shifted by the first batch's mean before summing: CKA ignores translations, and the
    shift keeps the algebraic centring from cancelling large means (massive activations) in float64.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.shift: torch.Tensor | None = None  # [dim], set by the first non-empty batch
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sq = 0.0  # Σ‖x‖²
        self.self_sums = _CrossSums(dim, dim)

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` [n, dim] as shifted float64 rows on the CPU, and their squared norms [n]."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [n, {self.dim}], got {tuple(x.shape)}")
        rows = x.detach().to(device="cpu", dtype=torch.float64)
        if self.shift is None:
            if rows.shape[0] == 0:  # no mean to shift by yet
                return rows, rows.new_zeros(0)
            self.shift = rows.mean(0)
        rows = rows - self.shift  # [n, dim]
        return rows, (rows * rows).sum(1)  # [n, dim] -> [n]

    def add(self, rows: torch.Tensor, sq: torch.Tensor) -> None:
        """Add rows returned by `prepare` (with their squared norms)."""
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sq += float(sq.sum())
        self.self_sums.add(rows, sq, rows, sq)

    def mean(self) -> torch.Tensor:
        """Mean of the shifted rows [dim]."""
        return self.sum / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Population covariance [dim, dim] (divided by n)."""
        return _covariance(self, self, self.self_sums)


@dataclass(frozen=True)
class _Centred:
    """Centred quantities of one pair: ‖X̄ᵀȲ‖²_F, Σ‖x̄_i‖²‖ȳ_i‖², ‖X̄‖²_F and ‖Ȳ‖²_F."""

    cross: float
    row_products: float
    norm_x: float
    norm_y: float


def _centred(fx: FeatureStats, fy: FeatureStats, sums: _CrossSums) -> _Centred:
    """Expand x̄ = x - m_x (m: mean of the shifted rows) in each sum; c = ‖m‖².

    Σ‖x̄‖²‖ȳ‖² = Σ(a - 2x·m_x + c_x)(b - 2y·m_y + c_y), expanded term by term below.
    """
    n = fx.count
    mx, my = fx.mean(), fy.mean()
    cx, cy = float(mx @ mx), float(my @ my)
    centred_xy = sums.xy - n * torch.outer(mx, my)  # [dx, dy]: X̄ᵀȲ
    xy_mm = float(mx @ sums.xy @ my)  # [dx] @ [dx, dy] @ [dy] -> scalar
    row_products = (
        sums.ab
        - 2 * float(my @ sums.ay)
        + cy * fx.sq
        - 2 * float(mx @ sums.bx)
        + 4 * xy_mm
        - 2 * cy * float(mx @ fx.sum)
        + cx * fy.sq
        - 2 * cx * float(my @ fy.sum)
        + n * cx * cy
    )
    return _Centred(
        cross=float((centred_xy * centred_xy).sum()),
        row_products=row_products,
        norm_x=fx.sq - n * cx,
        norm_y=fy.sq - n * cy,
    )


def _covariance(fx: FeatureStats, fy: FeatureStats, sums: _CrossSums) -> torch.Tensor:
    n = max(fx.count, 1)
    return sums.xy / n - torch.outer(fx.mean(), fy.mean())  # [dx, dy]


def _debiased_dot(c: _Centred, n: int) -> float:
    """n(n-3)·HSIC₁ (Song et al. 2012) from the centred quantities."""
    return c.cross - n / (n - 2) * c.row_products + c.norm_x * c.norm_y / ((n - 1) * (n - 2))


class CkaAccumulator:
    """Linear CKA of X [n, d_x] and Y [n, d_y], fed in minibatches whose rows pair up."""

    def __init__(
        self,
        dim_x: int,
        dim_y: int,
        *,
        x_stats: FeatureStats | None = None,
        y_stats: FeatureStats | None = None,
    ) -> None:
        """Pass `x_stats`/`y_stats` to share one layer's own sums between several accumulators
        (`CkaMatrix` does); their owner then feeds them, and `update` must not be used."""
        self._owns = x_stats is None and y_stats is None
        self.x = x_stats or FeatureStats(dim_x)
        self.y = y_stats or FeatureStats(dim_y)
        self.pair = _CrossSums(dim_x, dim_y)

    @property
    def count(self) -> int:
        """Samples seen so far."""
        return self.x.count

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a minibatch: `x` [n, d_x] and `y` [n, d_y], row i of both from the same sample."""
        if not self._owns:
            raise RuntimeError("this accumulator shares its feature sums; update its owner")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows and y {y.shape[0]}: rows must pair up")
        if x.shape[0] == 0:
            return
        xs, a = self.x.prepare(x)
        ys, b = self.y.prepare(y)
        self.x.add(xs, a)
        self.y.add(ys, b)
        self.add_pair(xs, a, ys, b)

    def add_pair(
        self, xs: torch.Tensor, a: torch.Tensor, ys: torch.Tensor, b: torch.Tensor
    ) -> None:
        """Add the cross sums of rows already `prepare`d and added by the feature stats' owner."""
        self.pair.add(xs, a, ys, b)

    def value(self, estimator: Estimator = "debiased") -> float:
        """CKA so far. Debiased: may be slightly negative, NaN when a side has no variance.

        Raises:
            ValueError: fewer than 4 samples (the unbiased HSIC is undefined).
        """
        n = self.count
        if n < MIN_CKA_SAMPLES:
            raise ValueError(f"CKA needs at least {MIN_CKA_SAMPLES} samples, got {n}")
        xy = _centred(self.x, self.y, self.pair)
        xx = _centred(self.x, self.x, self.x.self_sums)
        yy = _centred(self.y, self.y, self.y.self_sums)
        if estimator == "biased":
            num, den_x, den_y = xy.cross, xx.cross, yy.cross
        elif estimator == "debiased":
            num, den_x, den_y = (_debiased_dot(c, n) for c in (xy, xx, yy))
        else:
            raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
        if den_x <= 0 or den_y <= 0:
            return float("nan")
        return num / math.sqrt(den_x * den_y)

    def cross_covariance(self) -> torch.Tensor:
        """Population cross-covariance of X's and Y's features [d_x, d_y]."""
        return _covariance(self.x, self.y, self.pair)


class _StreamingMatrix:
    """One `CkaAccumulator` per pair (layer i of A, layer j of B), sharing each layer's own sums."""

    def __init__(self, dims_a: Sequence[int], dims_b: Sequence[int]) -> None:
        self.stats_a = [FeatureStats(d) for d in dims_a]
        self.stats_b = [FeatureStats(d) for d in dims_b]
        self.pairs = [
            [CkaAccumulator(fa.dim, fb.dim, x_stats=fa, y_stats=fb) for fb in self.stats_b]
            for fa in self.stats_a
        ]

    @property
    def count(self) -> int:
        return self.stats_a[0].count if self.stats_a else 0

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        prepared_a = [self._add(stats, x) for stats, x in zip(self.stats_a, xs, strict=True)]
        prepared_b = [self._add(stats, y) for stats, y in zip(self.stats_b, ys, strict=True)]
        for row, (xa, a) in zip(self.pairs, prepared_a, strict=True):
            for accumulator, (yb, b) in zip(row, prepared_b, strict=True):
                accumulator.add_pair(xa, a, yb, b)

    @staticmethod
    def _add(stats: FeatureStats, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, sq = stats.prepare(x)
        stats.add(rows, sq)
        return rows, sq

    def values(self, estimator: Estimator) -> torch.Tensor:
        return torch.tensor(
            [[acc.value(estimator) for acc in row] for row in self.pairs], dtype=torch.float64
        )


class CkaMatrix:
    """CKA of every layer of A with every layer of B, fed one minibatch of all layers at a time.

    While the samples seen number at most `buffer_rows` (default: the widest layer), the rows are
    kept and CKA comes from n×n Gram matrices; past that they move into d×d running sums and are
    streamed. Both give the same exact estimator. Memory is min(n·d, d²)-sized per layer, so
    window-pooled features (n of a few hundred) never pay for the d_a·d_b sums of every pair.
    """

    def __init__(
        self, dims_a: Sequence[int], dims_b: Sequence[int], *, buffer_rows: int | None = None
    ) -> None:
        self.dims_a, self.dims_b = list(dims_a), list(dims_b)
        self.buffer_rows = max([*dims_a, *dims_b, 0]) if buffer_rows is None else buffer_rows
        self._rows_a: list[list[torch.Tensor]] = [[] for _ in dims_a]
        self._rows_b: list[list[torch.Tensor]] = [[] for _ in dims_b]
        self._buffered = 0
        self._streaming: _StreamingMatrix | None = None

    @property
    def count(self) -> int:
        """Samples seen so far."""
        return self._buffered if self._streaming is None else self._streaming.count

    @property
    def streaming(self) -> bool:
        """Whether the rows have moved into d×d running sums (memory fixed from then on)."""
        return self._streaming is not None

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: a [n, d] tensor per layer of A (`xs`) and of B (`ys`), same n rows."""
        if len(xs) != len(self.dims_a) or len(ys) != len(self.dims_b):
            raise ValueError(
                f"expected {len(self.dims_a)} and {len(self.dims_b)} layers, got "
                f"{len(xs)} and {len(ys)}"
            )
        if len({t.shape[0] for t in (*xs, *ys)}) != 1:
            raise ValueError("every layer's features must have the same rows (samples)")
        if xs[0].shape[0] == 0:
            return
        if self._streaming is not None:
            self._streaming.update(xs, ys)
            return
        for rows, x in zip([*self._rows_a, *self._rows_b], [*xs, *ys], strict=True):
            rows.append(x.detach().to(device="cpu", dtype=torch.float64))
        self._buffered += xs[0].shape[0]
        if self._buffered > self.buffer_rows:
            self._start_streaming()

    def _start_streaming(self) -> None:
        self._streaming = _StreamingMatrix(self.dims_a, self.dims_b)
        self._streaming.update(
            [torch.cat(r) for r in self._rows_a], [torch.cat(r) for r in self._rows_b]
        )
        self._rows_a, self._rows_b = [[] for _ in self.dims_a], [[] for _ in self.dims_b]

    def accumulator(self, i: int, j: int) -> CkaAccumulator:
        """The accumulator of layer i of A with layer j of B (for unit correspondence)."""
        if self._streaming is not None:
            return self._streaming.pairs[i][j]
        accumulator = CkaAccumulator(self.dims_a[i], self.dims_b[j])
        accumulator.update(torch.cat(self._rows_a[i]), torch.cat(self._rows_b[j]))
        return accumulator

    def values(self, estimator: Estimator = "debiased") -> torch.Tensor:
        """[layers_a, layers_b] float64 matrix of CKA values.

        Raises:
            ValueError: fewer than 4 samples (the unbiased HSIC is undefined).
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
        if self._streaming is not None:
            return self._streaming.values(estimator)
        if self._buffered < MIN_CKA_SAMPLES:
            raise ValueError(f"CKA needs at least {MIN_CKA_SAMPLES} samples, got {self._buffered}")
        grams_a = _gram_side([torch.cat(r) for r in self._rows_a])
        grams_b = _gram_side([torch.cat(r) for r in self._rows_b])
        return _gram_cka(grams_a, grams_b, estimator, n=self._buffered)


class _GramSide(NamedTuple):
    """Per layer of one model: Gram matrices of the column-centred rows, flattened, and their
    diagonals (the rows' squared norms)."""

    grams: torch.Tensor  # [layers, n·n]
    norms: torch.Tensor  # [layers, n]


def _gram_side(layers: Sequence[torch.Tensor]) -> _GramSide:
    centred = [x - x.mean(0) for x in layers]  # [n, d] each; HSIC ignores centring
    return _GramSide(
        grams=torch.stack([(x @ x.T).flatten() for x in centred]),  # [n, n] -> [n·n] per layer
        norms=torch.stack([(x * x).sum(1) for x in centred]),  # [n] per layer
    )


def _gram_cka(a: _GramSide, b: _GramSide, estimator: Estimator, *, n: int) -> torch.Tensor:
    """Every pair's CKA from Grams: ⟨K, L⟩ = ‖X̄ᵀȲ‖²_F, so the streaming formula applies as is."""
    cross = a.grams @ b.grams.T  # [La, n²] @ [n², Lb] -> [La, Lb]
    self_a = (a.grams * a.grams).sum(1)  # [La]: ‖X̄ᵀX̄‖²_F
    self_b = (b.grams * b.grams).sum(1)  # [Lb]
    if estimator == "biased":
        return cross / torch.sqrt(torch.outer(self_a, self_b))
    rows_ab = a.norms @ b.norms.T  # [La, n] @ [n, Lb] -> [La, Lb]: Σ a_i b_i
    sq_a, sq_b = a.norms.sum(1), b.norms.sum(1)  # [La], [Lb]: ‖X̄‖²_F

    def debiased(dot: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return dot - n / (n - 2) * rows + norms / ((n - 1) * (n - 2))

    num = debiased(cross, rows_ab, torch.outer(sq_a, sq_b))
    den_a = debiased(self_a, (a.norms * a.norms).sum(1), sq_a * sq_a)  # [La]
    den_b = debiased(self_b, (b.norms * b.norms).sum(1), sq_b * sq_b)  # [Lb]
    values = num / torch.sqrt(torch.outer(den_a, den_b).clamp(min=0))
    undefined = (den_a <= 0)[:, None] | (den_b <= 0)[None, :]  # a side without variance
    return values.masked_fill(undefined, float("nan"))


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, estimator: Estimator = "debiased") -> float:
    """Linear CKA of `x` [n, d_x] and `y` [n, d_y] (rows are the same n samples)."""
    accumulator = CkaAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x, y)
    return accumulator.value(estimator)


def cka_matrix(
    batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
    *,
    estimator: Estimator = "debiased",
) -> torch.Tensor:
    """CKA of every layer of A with every layer of B, streamed over (A layers, B layers) batches.

    Each batch holds one [n, d] tensor per layer; memory stays fixed however many batches come.
    """
    matrix: CkaMatrix | None = None
    for xs, ys in batches:
        if matrix is None:
            matrix = CkaMatrix([x.shape[1] for x in xs], [y.shape[1] for y in ys])
        matrix.update(xs, ys)
    if matrix is None:
        raise ValueError("no batches to compute CKA from")
    return matrix.values(estimator)


__all__ = [
    "ESTIMATORS",
    "MIN_CKA_SAMPLES",
    "CkaAccumulator",
    "CkaMatrix",
    "Estimator",
    "FeatureStats",
    "cka_matrix",
    "linear_cka",
]
