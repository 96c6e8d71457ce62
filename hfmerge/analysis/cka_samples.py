"""What CKA's estimator will see and hold: the tokens each window gives, the samples, the memory.

`compute_cka` checks these before the forward passes, so a run that cannot fit fails at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hfmerge.errors import HfMergeError, OptionError

if TYPE_CHECKING:  # lm/probe.py imports transformers, which a merge without `check:` never needs
    from hfmerge.lm.probe import Pooling

MAX_STATS_BYTES = 8 * 2**30  # float64 sums, or rows and Grams; see `check_memory`


def tokens_per_window_for(
    pooling: Pooling, tokens_per_window: int | None, *, units: bool
) -> int | None:
    """The tokens each window gives under `tokens` pooling (None: every one, or `mean` pooling)."""
    from hfmerge.lm.probe import default_tokens_per_window

    check_tokens_per_window(pooling, tokens_per_window)
    if pooling != "tokens" or tokens_per_window == 0:
        return None
    return tokens_per_window or default_tokens_per_window(units=units)


def check_tokens_per_window(pooling: str | None, tokens_per_window: int | None) -> None:
    """Raise `OptionError` for a negative count, or a count with `mean` pooling."""
    if tokens_per_window is None:
        return
    if tokens_per_window < 0:
        raise OptionError(
            "--tokens-per-window",
            str(tokens_per_window),
            "is negative",
            fix="give 1 or more tokens per window, or 0 for every token",
        )
    if pooling == "mean":
        raise OptionError(
            "--tokens-per-window",
            str(tokens_per_window),
            "applies to --pooling tokens only",
            why="mean pooling averages every token of a window",
            fix="drop --tokens-per-window, or use --pooling tokens",
        )


def estimator_samples(
    batches: list[dict[str, torch.Tensor]],
    *,
    causal: bool,
    pooling: Pooling,
    tokens_per_window: int | None,
) -> int:
    """The samples the estimator will see (at most; a mean drops windows without tokens)."""
    from hfmerge.lm.probe import kept_positions

    kept = torch.cat(
        [kept_positions(b["attention_mask"], causal=causal).sum(1) for b in batches]
    )  # [windows]: kept tokens per window
    if pooling == "mean":
        return len(kept)
    if tokens_per_window is not None:
        kept = kept.clamp(max=tokens_per_window)
    return int(kept.sum())


def check_memory(widths_a: list[int], widths_b: list[int], *, samples: int, streaming: bool) -> int:
    """The bytes of the estimator's statistics, refused when they cannot fit: with `streaming`,
    d_a·d_b float64 sums per layer pair; otherwise the samples' rows and an n×n Gram matrix per
    layer (`CkaMatrix`)."""
    if streaming:
        needed = 8 * (
            sum(d * d for d in widths_a)
            + sum(d * d for d in widths_b)
            + sum(widths_a) * sum(widths_b)
        )
        why = (
            "with more samples than the width the exact estimator keeps a width×width sum per "
            "layer pair, which suits widths of a few hundred"
        )
    else:
        layers = len(widths_a) + len(widths_b)
        needed = 8 * samples * (sum(widths_a) + sum(widths_b) + samples * layers)
        why = (
            f"with at most the width in samples the exact estimator keeps the {samples} samples' "
            "rows and a samples×samples Gram matrix per layer"
        )
    if needed > MAX_STATS_BYTES:
        raise HfMergeError(
            f"CKA over all {len(widths_a)}×{len(widths_b)} layer pairs would hold "
            f"{needed / 2**30:.1f} GiB of float64 statistics",
            why=f"{why}; the limit is {MAX_STATS_BYTES / 2**30:.0f} GiB",
            fix=f"use --pooling mean with at most {max(widths_a + widths_b)} windows (--samples), "
            "or fewer windows or --tokens-per-window, or compare narrower or shallower models",
        )
    return needed


__all__ = [
    "MAX_STATS_BYTES",
    "check_memory",
    "check_tokens_per_window",
    "estimator_samples",
    "tokens_per_window_for",
]
