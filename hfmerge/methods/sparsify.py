"""Sparsification primitives for task vectors: magnitude top-k (TIES), outlier bands (breadcrumbs),
Bernoulli drops (DARE) and rank-weighted drops (DELLA), each with optional L1 rescaling.

Magnitude selection finds its threshold by an exact radix selection (`methods/select.py`), never a
sort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from hfmerge.methods.select import CutMask, magnitude_keys, select_cuts

# Keep probability of every entry of a task vector (or of whole rows of it), same shape out.
Probabilities = Callable[[torch.Tensor], torch.Tensor]
# How a random sparsifier treats one model: entries kept at random with these probabilities, or
# (drawing nothing) all kept or all dropped.
DropRule = Probabilities | Literal["keep all", "drop all"]

RESCALE_EPS = 1e-7  # below this L1 norm a task vector counts as empty and is not rescaled


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` largest entries of `scores`: exactly `k` of them (clamped to [0, n]).

    Entries tied at the threshold are taken in flat-index order, so the ranking is a total order
    and the masks for different `k` nest (`band_mask` relies on that). `scores` must be finite.
    Non-negative float32 scores (magnitudes, the usual case) use the radix selection of
    `methods/select.py`; other scores `torch.kthvalue`; both give the same mask.
    """
    flat = scores.reshape(-1)  # [n]
    n = flat.numel()
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if flat.dtype == torch.float32 and bool(flat.min() >= 0):
        keys = magnitude_keys(flat.contiguous())  # [n]
        return CutMask(select_cuts(keys, [k])[0])(keys).reshape(scores.shape)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    mask = flat > threshold
    missing = k - int(mask.sum())
    tied = torch.nonzero(flat == threshold).squeeze(1)  # [ties], ascending flat index
    mask[tied[:missing]] = True
    return mask.reshape(scores.shape)


def band_mask(scores: torch.Tensor, *, skip_top: int, keep: int) -> torch.Tensor:
    """Mask of the `keep` largest entries that remain after dropping the `skip_top` largest."""
    if skip_top == 0:
        return topk_mask(scores, keep)  # the same mask; one selection instead of two
    return topk_mask(scores, skip_top + keep) & ~topk_mask(scores, skip_top)


def rescale_l1(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """`pruned` scaled so its L1 norm matches `original`'s (mergekit's DARE/DELLA rescale)."""
    before = original.abs().sum()
    after = pruned.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return pruned
    return pruned * (before / after)


def _keep(delta: torch.Tensor, mask: torch.Tensor, *, rescale: bool) -> torch.Tensor:
    pruned = delta * mask
    return rescale_l1(delta, pruned) if rescale else pruned


@dataclass(frozen=True)
class Band:
    """What a magnitude sparsifier keeps of an n-entry task vector: the `keep` largest entries
    left after dropping the `skip_top` largest; `zero` keeps nothing and returns exact zeros.

    Shared by the whole-tensor functions here and the chunked ones (`methods/gta_stream.py`), so
    both count the same entries.
    """

    skip_top: int
    keep: int
    zero: bool = False


def magnitude_band(n: int, density: float) -> Band | None:
    """TIES's band: the `floor(density * n)` largest, at least one, as in mergekit; None keeps
    everything."""
    if density >= 1 or n == 0:
        return None
    if density <= 0:
        return Band(0, 0, zero=True)
    return Band(0, max(1, int(density * n)))


def outlier_band(n: int, density: float, gamma: float) -> Band | None:
    """Breadcrumbs' band: drop the `gamma` fraction largest and the smallest, keep `density`.

    When `density + gamma > 1` fewer outliers are dropped, so that `density` is always kept.
    """
    if density >= 1 or n == 0:
        return None
    keep = max(0, int(density * n))
    return Band(min(int(gamma * n), n - keep), keep)


def band_prune(delta: torch.Tensor, band: Band | None, *, rescale: bool) -> torch.Tensor:
    """`delta` with only the entries of `band` kept (by magnitude), optionally L1-rescaled."""
    if band is None:
        return delta
    if band.zero:
        return torch.zeros_like(delta)
    mask = band_mask(delta.abs(), skip_top=band.skip_top, keep=band.keep)
    return _keep(delta, mask, rescale=rescale)


def magnitude_prune(delta: torch.Tensor, density: float, *, rescale: bool) -> torch.Tensor:
    """TIES trim: keep the `density` fraction of entries largest in magnitude."""
    return band_prune(delta, magnitude_band(delta.numel(), density), rescale=rescale)


def outlier_prune(
    delta: torch.Tensor, density: float, gamma: float, *, rescale: bool
) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction largest in magnitude and the smallest; keep
    `density`."""
    return band_prune(delta, outlier_band(delta.numel(), density, gamma), rescale=rescale)


def random_prune(
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`.

    `torch.bernoulli` on a probability tensor draws the same stream as mergekit's, so a generator
    seeded like mergekit's `--random-seed` reproduces its masks tensor for tensor.
    """
    return drop_prune(delta, dare_rule(density), rescale=rescale, generator=generator)


def drop_prune(
    delta: torch.Tensor,
    rule: DropRule,
    *,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`delta` with entries kept at random by `rule` (one Bernoulli draw per entry, in flat
    order), optionally L1-rescaled; a rule that keeps or drops everything draws nothing."""
    if rule == "keep all" or delta.numel() == 0:
        return delta
    if rule == "drop all":
        return torch.zeros_like(delta)
    return _keep(delta, torch.bernoulli(rule(delta), generator=generator), rescale=rescale)


def dare_rule(density: float) -> DropRule:
    """DARE's keep probabilities: `density` everywhere (a model keeping all draws nothing)."""
    return "keep all" if density >= 1 else partial(_constant, value=density)


def _constant(delta: torch.Tensor, *, value: float) -> torch.Tensor:
    return torch.full_like(delta, value)


def ranked_random_prune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with magnitude rank within each row,
    from `density - epsilon` (smallest) to `density + epsilon` (largest).

    Rows are output units: `[shape[0], -1]`; a 1-D tensor is one row.
    """
    return drop_prune(delta, della_rule(density, epsilon), rescale=rescale, generator=generator)


def della_rule(density: float, epsilon: float) -> DropRule:
    """DELLA's keep probabilities (ranked within rows), or all kept / all dropped, drawing none."""
    if density >= 1:
        return "keep all"
    if density <= 0:
        return "drop all"
    return partial(_ranked, density=density, epsilon=epsilon)


def _ranked(delta: torch.Tensor, *, density: float, epsilon: float) -> torch.Tensor:
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    probs = (density - epsilon) + rank_fraction(rows.abs()) * 2 * epsilon  # [rows, cols]
    return probs.reshape(delta.shape)


def rank_fraction(scores: torch.Tensor) -> torch.Tensor:
    """Per-row rank of each entry of a 2-D tensor, scaled to [0, 1] (0: smallest, 1: largest).

    Ranks need one sort per row; a stable sort makes ties rank by column. A one-column row gets
    0.5, its mid-point (mergekit divides 0 by 0 there).
    """
    cols = scores.shape[1]
    if cols == 1:
        return torch.full_like(scores, 0.5)
    order = torch.argsort(scores, dim=1, stable=True)  # [rows, cols]: columns, smallest first
    positions = torch.arange(cols, dtype=scores.dtype, device=scores.device).expand_as(order)
    ranks = torch.empty_like(scores).scatter_(1, order, positions)
    return ranks / (cols - 1)
