"""`hfmerge units`: one-to-one, one-to-many and many-to-many unit correspondence of two models,
layer by layer, on probe text; a table and a JSON document.

Same layer pairing and probe windows as `hfmerge cka` (`analysis/cka.py`), every real token a
sample. Every fourth window is held out: the regressions of the one-to-many view are fit on the
others and scored on those (`analysis/correspondence.py` has the math).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.analysis.cka import diagonal_pairs, layer_names
from hfmerge.analysis.correspondence import (
    L1_PENALTY,
    LayerCorrespondence,
    Moments,
    layer_correspondence,
)
from hfmerge.analysis.probe_pair import ProbePair, open_pair, probe_windows
from hfmerge.analysis.similarity import CkaAccumulator
from hfmerge.errors import HfMergeError, InputDataError
from hfmerge.lm.placement import forward_bytes, limit_setting, split_limit
from hfmerge.lm.probe_time import ProbeText
from hfmerge.sources.refs import ModelSource

if TYPE_CHECKING:
    from hfmerge.lm.placement import DeviceMap, MemoryLimit

HELDOUT_EVERY = 4  # window i is held out when i % 4 == 3: a quarter, spread over the data
MAX_STATS_BYTES = 8 * 2**30  # float64 moments of every layer pair, fit and held out
MIN_SAMPLES = 2  # windows: at least one to fit on and one held out


@dataclass(frozen=True)
class UnitsReport:
    """Everything `hfmerge units` prints and writes (the JSON field names are a fixed format)."""

    model_a: str
    model_b: str
    revisions: dict[str, str | None]
    layers: list[LayerCorrespondence]  # one per same-depth pair, as `cka`'s diagonal
    samples: int  # probe windows
    tokens: int  # tokens that entered (padding and causal position 0 excluded)
    fit_tokens: int
    heldout_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (`--json`)."""
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "revisions": self.revisions,
            "samples": self.samples,
            "tokens": self.tokens,
            "fit_tokens": self.fit_tokens,
            "heldout_tokens": self.heldout_tokens,
            "layers": [layer.to_json() for layer in self.layers],
            "settings": self.settings,
        }


def compute_units(
    model_a: ModelSource,
    model_b: ModelSource,
    *,
    data: str | None = None,
    samples: int | None = 256,
    max_length: int = 128,
    batch_size: int = 8,
    device_map: DeviceMap | None = "auto",
    max_memory: MemoryLimit | None = None,
    l1_penalty: float = L1_PENALTY,
    progress: bool = False,
) -> UnitsReport:
    """Probe both models on the same windows of `data` and measure unit correspondence per layer.

    Raises:
        InputDataError: the data is unreadable or too short.
        ModelSourceError, IncompatibleModelsError: a model cannot be probed, or not with the other.
        HfMergeError: the models are too wide for the moments to fit in memory.
    """
    from hfmerge.lm.textdata import describe_data, load_texts

    texts = load_texts(data)  # first: a bad data file should fail before any model loads
    budget, limits = split_limit(max_memory)
    pair = open_pair(model_a, model_b, device_map=device_map, max_memory=limits)
    windows, length = probe_windows(pair, texts, max_length=max_length, samples=samples)
    if len(windows) < MIN_SAMPLES:
        raise InputDataError(
            describe_data(data),
            f"gave {len(windows)} window(s)",
            f"unit correspondence needs at least {MIN_SAMPLES} (fit and held out); "
            "give more text or raise --samples",
        )
    heldout = [w for i, w in enumerate(windows) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    fit = [w for i, w in enumerate(windows) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    widths, depths = pair.widths(), pair.depths()
    pairs = diagonal_pairs(*depths)
    stats = _check_memory(widths, len(pairs))
    if budget is not None:
        tokens = sum(int(w.numel()) for w in windows)  # at most: every token is a sample
        pair = pair.within(
            budget,
            working=stats + forward_bytes(pair.configs, batch_size=batch_size, length=length),
            kept=4 * tokens * widths[0] * depths[0],
        )
        if progress:
            size = ProbeText(
                tokens, max(int(w.shape[-1]) for w in windows), -(-len(windows) // batch_size)
            )
            pair.announce("units", budget=budget, text=size)
    (fit_sums, fit_tokens), (held_sums, held_tokens) = _accumulate(
        pair, (fit, heldout), pairs, batch_size=batch_size, progress=progress
    )
    names_a, names_b = layer_names(depths[0]), layer_names(depths[1])
    layers = [
        layer_correspondence(
            Moments.of(fit_acc),
            Moments.of(held_acc),
            layer_a=names_a[i],
            layer_b=names_b[j],
            l1_penalty=l1_penalty,
        )
        for (i, j), fit_acc, held_acc in zip(pairs, fit_sums, held_sums, strict=True)
    ]
    return UnitsReport(
        model_a=model_a.label,
        model_b=model_b.label,
        revisions=pair.revisions,
        layers=layers,
        samples=len(windows),
        tokens=fit_tokens + held_tokens,
        fit_tokens=fit_tokens,
        heldout_tokens=held_tokens,
        settings={
            "data": describe_data(data),
            "max_length": length,
            "batch_size": batch_size,
            "pooling": "tokens",
            "heldout_windows": len(heldout),
            "l1_penalty": l1_penalty,
            "device_map": device_map,
            "max_memory": limit_setting(max_memory),
            "placement": pair.placement.describe(),
            "causal": pair.causal,
            "bos_dropped": pair.causal,
        },
    )


def _accumulate(
    pair: ProbePair,
    parts: tuple[list[torch.Tensor], list[torch.Tensor]],
    pairs: list[tuple[int, int]],
    *,
    batch_size: int,
    progress: bool,
) -> tuple[tuple[list[CkaAccumulator], int], tuple[list[CkaAccumulator], int]]:
    """Token-level moments of every layer pair on the fit and the held-out windows, and the
    tokens that entered each: one pass of the models over both parts' batches."""
    from hfmerge.lm.batches import probe_batches

    width_a, width_b = pair.widths()
    fit = probe_batches(parts[0], pair.tokenizer, batch_size=batch_size)
    heldout = probe_batches(parts[1], pair.tokenizer, batch_size=batch_size)
    sums = [[CkaAccumulator(width_a, width_b) for _ in pairs] for _ in range(2)]
    tokens = [0, 0]
    every_token = pair.states(
        fit + heldout, pooling="tokens", tokens_per_window=None, progress=progress
    )
    for index, states in enumerate(every_token):
        part = int(index >= len(fit))  # 0: fit, 1: held out
        for accumulator, (i, j) in zip(sums[part], pairs, strict=True):
            accumulator.update(states.a[i], states.b[j])
        tokens[part] += states.tokens
    if any(s.count < MIN_SAMPLES for part in sums for s in part):
        raise InputDataError(
            "the probe windows",
            "left fewer than 2 tokens in the fit or held-out part",
            "give longer text or raise --samples or --max-length",
        )
    return (sums[0], tokens[0]), (sums[1], tokens[1])


def _check_memory(widths: tuple[int, int], pairs: int) -> int:
    """Each layer pair keeps d_a² + d_b² + d_a·d_b float64 sums, twice (fit and held out)."""
    width_a, width_b = widths
    needed = 2 * pairs * 8 * (width_a**2 + width_b**2 + width_a * width_b)
    if needed > MAX_STATS_BYTES:
        raise HfMergeError(
            f"unit correspondence over {pairs} layer pairs would hold "
            f"{needed / 2**30:.1f} GiB of float64 moments",
            why="every unit's covariance with every other unit is kept per layer pair, which "
            f"suits widths of a few hundred; the limit is {MAX_STATS_BYTES / 2**30:.0f} GiB",
            fix="compare narrower or shallower models",
        )
    return needed


def format_units(report: UnitsReport) -> str:
    """The readable table, one row per layer pair."""
    first = report.layers[0].one_to_many.l1_penalty if report.layers else L1_PENALTY
    lines = [
        f"Unit correspondence {report.model_a} (A) vs {report.model_b} (B): "
        f"{report.tokens} tokens from {report.samples} windows of "
        f"{report.settings.get('data', '?')} ({report.heldout_tokens} tokens held out)",
        "one-to-one: Hungarian-matched r; one-to-many: lasso (L1 "
        f"{first:g}) held-out R² vs the matched unit alone; many-to-many: spectral groups",
        "",
        f"{'layer A':<11} {'layer B':<11} {'matched r':>9} {'R² 1 unit':>9} {'R² lasso':>9} "
        f"{'A units':>7} {'groups':>6} {'in |r|':>7} {'out |r|':>7} {'A+B size':>9} {'1+1':>5}",
    ]
    for layer in report.layers:
        one, many, groups = layer.one_to_one, layer.one_to_many, layer.many_to_many
        lines.append(
            f"{layer.layer_a:<11} {layer.layer_b:<11} {one.matched_correlation:>9.4f} "
            f"{many.single_unit_heldout_r2:>9.4f} {many.heldout_r2:>9.4f} "
            f"{many.mean_units_used:>7.2f} {groups.groups:>6} {groups.within_abs_r:>7.3f} "
            f"{groups.across_abs_r:>7.3f} "
            f"{f'{groups.mean_units_a:.1f}+{groups.mean_units_b:.1f}':>9} "
            f"{groups.one_to_one_groups:>5}"
        )
    return "\n".join(lines)


__all__ = ["HELDOUT_EVERY", "UnitsReport", "compute_units", "format_units"]
