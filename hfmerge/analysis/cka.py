"""`hfmerge cka`: CKA of every layer of A with every layer of B on probe text, as a table and JSON.

The diagonal pairs layers at the same relative depth; `--units` adds Li et al.'s unit statistics.
"""

# Different depths: the diagonal walks the shallower model's layers and pairs layer i (0 = the
# embeddings) with the deeper model's layer round(i·(L_deep)/(L_shallow)), so embeddings meet
# embeddings and last block meets last block. With equal depths that is plain i <-> i.

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.analysis.cka_samples import check_memory, estimator_samples, tokens_per_window_for
from hfmerge.analysis.probe_pair import ProbePair, open_pair, probe_windows
from hfmerge.analysis.similarity import MIN_CKA_SAMPLES, CkaMatrix
from hfmerge.analysis.units import UnitCorrespondence, unit_correspondence
from hfmerge.errors import (
    CkaBelowThresholdError,
    InputDataError,
)
from hfmerge.lm.placement import forward_bytes, limit_setting, split_limit
from hfmerge.lm.probe_time import ProbeText
from hfmerge.sources.refs import ModelSource

if TYPE_CHECKING:  # lm/probe.py imports transformers, which a merge without `check:` never needs
    from hfmerge.lm.placement import DeviceMap, MemoryLimit
    from hfmerge.lm.probe import Pooling

MATRIX_MAX_LAYERS = 16  # print the full matrix only when it fits a terminal


@dataclass(frozen=True)
class CkaReport:
    """Everything `hfmerge cka` prints and writes (the JSON field names are a fixed format)."""

    model_a: str
    model_b: str
    revisions: dict[str, str | None]
    layers_a: list[str]
    layers_b: list[str]
    matrix: list[list[float]]  # [len(layers_a)][len(layers_b)], debiased
    diagonal_pairs: list[tuple[int, int]]  # (index into layers_a, index into layers_b)
    diagonal: list[float]
    biased_diagonal: list[float]  # the biased estimator on the same pairs, for comparison
    pooling: Pooling
    samples: int  # probe windows (sequences)
    tokens: int  # real tokens in them (padding and causal position 0 excluded)
    cka_samples: int  # samples the estimator saw: (subsampled) tokens, or windows with mean pooling
    settings: dict[str, Any] = field(default_factory=dict)
    units: list[UnitCorrespondence] | None = None
    estimator: str = "debiased"  # unbiased HSIC (Song et al. 2012) in every term; exact streaming
    tokens_per_window: int | None = None  # `tokens` subsample; None: every token (or mean)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (`--json`)."""
        document: dict[str, Any] = {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "revisions": self.revisions,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "matrix": self.matrix,
            "diagonal": self.diagonal,
            "estimator": self.estimator,
            "pooling": self.pooling,
            "tokens_per_window": self.tokens_per_window,
            "samples": self.samples,
            "tokens": self.tokens,
            "cka_samples": self.cka_samples,
            "diagonal_pairs": [[i, j] for i, j in self.diagonal_pairs],
            "diagonal_layers": [
                [self.layers_a[i], self.layers_b[j]] for i, j in self.diagonal_pairs
            ],
            "biased_diagonal": self.biased_diagonal,
            "settings": self.settings,
        }
        if self.units is not None:
            document["units"] = [u.to_json() for u in self.units]
        return document


def failing_layers(report: CkaReport, threshold: float) -> list[tuple[int, int, float]]:
    """Diagonal pairs whose CKA is below `threshold` or NaN."""
    return [
        (i, j, v)
        for (i, j), v in zip(report.diagonal_pairs, report.diagonal, strict=True)
        if math.isnan(v) or v < threshold
    ]


def check_fail_under(report: CkaReport, threshold: float | None) -> None:
    """Raise `CkaBelowThresholdError` when a diagonal value is below `threshold`."""
    if threshold is None:
        return
    failing = [(_pair_name(report, i, j), v) for i, j, v in failing_layers(report, threshold)]
    if failing:
        raise CkaBelowThresholdError(
            report.model_a,
            report.model_b,
            threshold=threshold,
            failing=failing,
            layers=len(report.diagonal),
        )


def _pair_name(report: CkaReport, i: int, j: int) -> str:
    a, b = report.layers_a[i], report.layers_b[j]
    return a if a == b and i == j else f"{a} (A) / {b} (B)"


def layer_names(count: int) -> list[str]:
    """`embeddings`, then `block.0` ... `block.{count-2}` (hidden_states order)."""
    return ["embeddings"] + [f"block.{i}" for i in range(count - 1)]


def diagonal_pairs(count_a: int, count_b: int) -> list[tuple[int, int]]:
    """Same-relative-depth pairs over the shallower model (identity when depths agree)."""
    if count_a > count_b:
        return [(j, i) for i, j in diagonal_pairs(count_b, count_a)]
    if count_a == 1:
        return [(0, 0)]
    return [(i, round(i * (count_b - 1) / (count_a - 1))) for i in range(count_a)]


def compute_cka(
    model_a: ModelSource,
    model_b: ModelSource,
    *,
    data: str | None = None,
    samples: int | None = 256,
    max_length: int = 128,
    batch_size: int = 8,
    pooling: Pooling | None = None,
    tokens_per_window: int | None = None,
    device_map: DeviceMap | None = "auto",
    max_memory: MemoryLimit | None = None,
    units: bool = False,
    progress: bool = False,
) -> CkaReport:
    """Probe both models on the same windows of `data` and build the CKA report.

    `model_a` and `model_b` are resolved models (`hfmerge.sources.refs.resolve_model`); the
    report names them as their references were written. `pooling` defaults to `tokens`, with at
    most `tokens_per_window` random tokens of each window (default 16; 0: every token, the default
    with `units`); see `hfmerge.lm.probe`. `tokens_per_window` applies to `tokens` pooling only.

    Raises:
        InputDataError: the data is unreadable or too short for CKA.
        OptionError: a negative `tokens_per_window`, or one with `mean` pooling.
        HfMergeError: the estimator's statistics would not fit in memory.
        ModelSourceError, IncompatibleModelsError: a model cannot be probed, or not with the other.
    """
    from hfmerge.lm.batches import probe_batches
    from hfmerge.lm.probe import DEFAULT_POOLING
    from hfmerge.lm.textdata import describe_data, load_texts

    pooling = pooling or DEFAULT_POOLING
    per_window = tokens_per_window_for(pooling, tokens_per_window, units=units)
    texts = load_texts(data)  # first: a bad data file should fail before any model loads
    budget, limits = split_limit(max_memory)
    pair = open_pair(model_a, model_b, device_map=device_map, max_memory=limits)
    windows, length = probe_windows(pair, texts, max_length=max_length, samples=samples)
    batches = probe_batches(windows, pair.tokenizer, batch_size=batch_size)
    matrix, tokens, pair = _stream(
        pair,
        batches,
        pooling=pooling,
        tokens_per_window=per_window,
        budget=budget,
        batch_size=batch_size,
        length=length,
        progress=progress,
    )
    if matrix.count < MIN_CKA_SAMPLES:
        raise InputDataError(
            describe_data(data),
            f"gave only {matrix.count} samples",
            f"CKA needs at least {MIN_CKA_SAMPLES}; give more text or use --pooling tokens",
        )
    settings = {
        "data": describe_data(data),
        "max_length": length,
        "batch_size": batch_size,
        "device_map": device_map,
        "max_memory": limit_setting(max_memory),
        "placement": pair.placement.describe(),
        "causal": pair.causal,
        "bos_dropped": pair.causal,
    }
    return _report(
        model_a.label,
        model_b.label,
        matrix,
        revisions=pair.revisions,
        pooling=pooling,
        tokens_per_window=per_window,
        windows=len(windows),
        tokens=tokens,
        settings=settings,
        units=units,
    )


def _stream(
    pair: ProbePair,
    batches: list[dict[str, torch.Tensor]],
    *,
    pooling: Pooling,
    tokens_per_window: int | None,
    budget: int | None,
    batch_size: int,
    length: int,
    progress: bool,
) -> tuple[CkaMatrix, int, ProbePair]:
    """Feed every batch's states into one CkaMatrix; returns it, the real tokens probed and the
    pair as it was placed: with a `budget` in bytes, within it (together, one at a time, or one
    at a time with disk offload), checked before any model loads."""
    widths = [[w] * d for w, d in zip(pair.widths(), pair.depths(), strict=True)]
    matrix, tokens = CkaMatrix(widths[0], widths[1]), 0
    expected = estimator_samples(
        batches, causal=pair.causal, pooling=pooling, tokens_per_window=tokens_per_window
    )
    stats = check_memory(
        widths[0], widths[1], samples=expected, streaming=expected > matrix.buffer_rows
    )
    if budget is not None:
        working = stats + forward_bytes(pair.configs, batch_size=batch_size, length=length)
        pair = pair.within(budget, working=working, kept=4 * expected * sum(widths[0]))
        if progress:
            pair.announce("cka", budget=budget, text=ProbeText.of(batches))
    for states in pair.states(
        batches, pooling=pooling, tokens_per_window=tokens_per_window, progress=progress
    ):
        matrix.update(states.a, states.b)
        tokens += states.tokens
    return matrix, tokens, pair


def _report(
    model_a: str,
    model_b: str,
    matrix: CkaMatrix,
    *,
    revisions: dict[str, str | None],
    pooling: Pooling,
    tokens_per_window: int | None,
    windows: int,
    tokens: int,
    settings: dict[str, Any],
    units: bool,
) -> CkaReport:
    values = matrix.values("debiased")  # [layers_a, layers_b]
    pairs = diagonal_pairs(len(matrix.dims_a), len(matrix.dims_b))
    biased = matrix.values("biased")
    return CkaReport(
        model_a=model_a,
        model_b=model_b,
        revisions=revisions,
        layers_a=layer_names(len(matrix.dims_a)),
        layers_b=layer_names(len(matrix.dims_b)),
        matrix=values.tolist(),
        diagonal_pairs=pairs,
        diagonal=[float(values[i, j]) for i, j in pairs],
        biased_diagonal=[float(biased[i, j]) for i, j in pairs],
        pooling=pooling,
        tokens_per_window=tokens_per_window,
        samples=windows,
        tokens=tokens,
        cka_samples=matrix.count,
        settings=settings,
        units=[unit_correspondence(matrix.accumulator(i, j)) for i, j in pairs] if units else None,
    )


def format_report(report: CkaReport) -> str:
    """The readable table: settings, the diagonal (with --units columns), then a small matrix."""
    lines = [
        f"CKA {report.model_a} (A) vs {report.model_b} (B): {report.estimator} linear CKA "
        "(unbiased HSIC, exact over all sample pairs)",
        f"{pooling_label(report)}, {report.cka_samples} samples from {report.samples} windows "
        f"({report.tokens} tokens) of {report.settings.get('data', '?')}",
        *_placement_line(report),
        "",
        _diagonal_table(report),
    ]
    if max(len(report.layers_a), len(report.layers_b)) <= MATRIX_MAX_LAYERS:
        lines += ["", "matrix (rows: layers of A, columns: layers of B)", _matrix_table(report)]
    return "\n".join(lines)


def _placement_line(report: CkaReport) -> list[str]:
    """A line saying the models ran one at a time (within a --max-memory size), if they did."""
    placement = report.settings.get("placement", "together")
    if placement == "together":
        return []
    return [f"models run {placement}, within --max-memory of {report.settings.get('max_memory')}"]


def pooling_label(report: CkaReport) -> str:
    """`mean pooling`, `tokens pooling`, or `tokens pooling (16 per window)`."""
    if report.tokens_per_window is None:
        return f"{report.pooling} pooling"
    return f"{report.pooling} pooling ({report.tokens_per_window} per window)"


def _diagonal_table(report: CkaReport) -> str:
    header = f"{'layer A':<12} {'layer B':<12} {'CKA':>8} {'biased':>8}"
    if report.units is not None:
        k, r2 = report.units[0].top_k, report.units[0].r2_threshold
        header += f" {'matched r':>10} {'same-index r':>13} {f'R²>{r2:g} top-{k}':>14}"
    rows = [header]
    for n, (i, j) in enumerate(report.diagonal_pairs):
        row = (
            f"{report.layers_a[i]:<12} {report.layers_b[j]:<12} "
            f"{report.diagonal[n]:>8.4f} {report.biased_diagonal[n]:>8.4f}"
        )
        if report.units is not None:
            u = report.units[n]
            same = "-" if u.same_index_correlation is None else f"{u.same_index_correlation:.4f}"
            row += f" {u.matched_correlation:>10.4f} {same:>13} {u.predicted_share:>14.1%}"
        rows.append(row)
    return "\n".join(rows)


def short_name(layer: str) -> str:
    """`embeddings` -> `emb`, `block.3` -> `3` (matrix headers and plot ticks)."""
    return "emb" if layer == "embeddings" else layer.removeprefix("block.")


def _matrix_table(report: CkaReport) -> str:
    rows = [f"{'':<12}" + "".join(f"{short_name(b):>8}" for b in report.layers_b)]
    for layer, values in zip(report.layers_a, report.matrix, strict=True):
        rows.append(f"{layer:<12}" + "".join(f"{v:>8.3f}" for v in values))
    return "\n".join(rows)


__all__ = [
    "CkaReport",
    "check_fail_under",
    "compute_cka",
    "diagonal_pairs",
    "failing_layers",
    "format_report",
    "layer_names",
    "pooling_label",
    "short_name",
]
