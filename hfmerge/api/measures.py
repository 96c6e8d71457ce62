"""`fingerprint`, `evaluate`, `barrier`, `cka` and `units`: the commands that measure models, from
model references to reports.

The references are resolved in `api/references.py`. Every text is read before any model is
resolved, so bad data fails before a download or a zoo build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hfmerge.api.references import check_texts, probe_request, resolve, resolve_permutable

if TYPE_CHECKING:
    from hfmerge.analysis.barrier import BarrierResult
    from hfmerge.analysis.cka import CkaReport
    from hfmerge.analysis.evaluation import EvalCell
    from hfmerge.analysis.fingerprint import PairResult
    from hfmerge.analysis.unit_report import UnitsReport
    from hfmerge.lm.placement import DeviceMap, MemoryLimit
    from hfmerge.lm.scoring import EvalResult


@dataclass(frozen=True)
class FingerprintReport:
    """Every pair of models compared by their permutation-invariant fingerprints."""

    models: list[str]
    pairs: list[PairResult]

    def to_json(self) -> dict[str, Any]:
        """`models`, then `pairs`: `a`, `b`, `similarity`, `max_relative_change`, `verdict`."""
        return {"models": self.models, "pairs": [p.to_json() for p in self.pairs]}


def fingerprint(models: str | Sequence[str], *, progress: bool = True) -> FingerprintReport:
    """Permutation-invariant fingerprints from weights alone, compared pair by pair.

    Each model is read once (config, headers, then every tensor); no text, no transformers.

    Args:
        models: model references (directories, `zoo:NAME` or Hub ids); one or several.
        progress: draw progress bars on stderr.

    Returns:
        The models and, for two or more, every pair's similarity and verdict: same weights up to
        permutation, derived from, unrelated, or unrelated (different shapes).

    Raises:
        ModelSourceError, ArchitectureError: a model that cannot be read or has no spec.
        FingerprintError: a spec with no token embedding to probe the residual basis with.
    """
    from hfmerge.analysis.fingerprint import compare_all
    from hfmerge.analysis.fingerprint import fingerprint as fingerprint_of
    from hfmerge.sources.inspection import inspect_model

    refs = [models] if isinstance(models, str) else list(models)
    prints = [
        fingerprint_of(inspect_model(resolve(ref, progress=progress)), progress=progress)
        for ref in refs
    ]
    return FingerprintReport(refs, compare_all(prints))


@dataclass(frozen=True)
class EvalReport:
    """Every model's loss on every text (`evaluate`), model by model."""

    cells: list[EvalCell]

    def result(self, model: str, data: str | None = None) -> EvalResult:
        """The result of `model` (as named) on `data` (as given; None: the builtin text).

        Raises:
            KeyError: `model` was not evaluated on `data`.
        """
        from hfmerge.lm.textdata import describe_data

        name = describe_data(data)
        for cell in self.cells:
            if cell.model == model and cell.data == name:
                return cell.result
        raise KeyError(f"{model} was not evaluated on {name}")

    def to_json(self) -> dict[str, Any]:
        """One result's fields (`loss`, `perplexity`, `tokens`, ...), or `{"results": [...]}`."""
        from hfmerge.analysis.evaluation import grid_json

        return grid_json(self.cells)


def evaluate(
    models: str | Sequence[str],
    *,
    data: str | Sequence[str] | None = None,
    max_length: int = 128,
    samples: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalReport:
    """Mean token loss and perplexity of models on text (MLM loss on fixed masks for BERT).

    Routed repos (local folders or Hub ids) are evaluated through their router.

    Args:
        models: model references or routed repos; one or several. `BASE+ADAPTER` is a base
            with its LoRA adapter applied.
        data: text to score: a UTF-8 file, a `.jsonl` with a `text` field, or
            `builtin[:code|prose|mixed]` (None: `builtin`); one or several.
        max_length: tokens per window (capped at the model's position limit).
        samples: use this many windows, spread over the text (None: all).
        batch_size: windows per forward pass.
        progress: draw progress bars on stderr.

    Returns:
        One cell per model and text.

    Raises:
        InputDataError: a text is unreadable; every text is checked before any model loads.
        ModelSourceError: a model cannot be found or loaded.
    """
    from hfmerge.analysis.evaluation import EvalCell
    from hfmerge.lm.textdata import describe_data

    refs = [models] if isinstance(models, str) else list(models)
    texts: list[str | None] = [data] if data is None or isinstance(data, str) else list(data)
    datas = texts or [None]
    check_texts(*datas)
    cells = []
    for ref in refs:
        results = _scores(
            ref,
            datas,
            max_length=max_length,
            samples=samples,
            batch_size=batch_size,
            progress=progress,
        )
        cells += [EvalCell(ref, describe_data(d), r) for d, r in zip(datas, results, strict=True)]
    return EvalReport(cells)


@dataclass(frozen=True)
class BarrierReport:
    """Loss curves from model A to model B, one per alignment mode (`barrier`)."""

    results: list[BarrierResult]

    def to_json(self) -> dict[str, Any]:
        """The first curve's `lambdas`, `loss`, `barrier`, `align`, `loss_a`, `loss_b`, ... at
        top level; with several curves, all of them under `results`."""
        from hfmerge.analysis.barrier import barrier_report

        return barrier_report(self.results)


def barrier(
    model_a: str,
    model_b: str,
    *,
    align: str | Sequence[str] = "none",
    steps: int = 11,
    data: str | None = None,
    probe_data: str | None = None,
    max_length: int = 128,
    samples: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> BarrierReport:
    """Loss along the straight line from `model_a` to `model_b`, and its barrier.

    Args:
        model_a: the model at λ = 0 (`BASE+ADAPTER`: a base with its LoRA adapter applied).
        model_b: the model at λ = 1.
        align: alignment modes to compare: `none`, `weight`, `activation`, `canonical`,
            `weight+orthogonal`, `activation+orthogonal` or `learned`, each optionally
            `+repair`; a name,
            a comma list, or a sequence of either.
        steps: points on the λ grid (λ = 0.5, the merged model, is always among them).
        data: text to score (`evaluate`'s forms; None: `builtin`).
        probe_data: text for activation matching, `learned` and REPAIR statistics (default:
            `data`).
        max_length: tokens per window.
        samples: use this many windows (None: all).
        batch_size: windows per forward pass.
        progress: draw progress bars on stderr.

    Returns:
        One curve per alignment mode, on the same windows and λ grid.

    Raises:
        UnknownNameError: an unknown alignment mode.
        InputDataError: unreadable text, checked before any model loads.
        IncompatibleModelsError: the models' tensors differ in names or shapes.
        NoPermutationSpecError: a mode other than `none` for a model whose model_type has no
            permutation spec (refused before any download).
    """
    from hfmerge.analysis.barrier import compare_barriers, parse_align_modes

    aligns = parse_align_modes([align] if isinstance(align, str) else list(align))
    check_texts(data, *([] if probe_data is None else [probe_data]))
    permuted = [mode for mode in aligns if mode != "none"]  # `weight`, `none+repair`, ...
    if permuted:
        feature = f"`barrier --align {permuted[0]}`"
        a, b = resolve_permutable(
            [model_a, model_b], feature=feature, progress=progress, adapters=True
        )
    else:
        a = resolve(model_a, progress=progress, adapters=True)
        b = resolve(model_b, progress=progress, adapters=True)
    results = compare_barriers(
        a,
        b,
        aligns=aligns,
        steps=steps,
        data=data,
        probe_data=probe_data,
        max_length=max_length,
        samples=samples,
        batch_size=batch_size,
        progress=progress,
    )
    return BarrierReport(results)


def cka(
    model_a: str,
    model_b: str,
    *,
    data: str | None = None,
    samples: int = 256,
    max_length: int = 128,
    batch_size: int = 8,
    pooling: str | None = None,
    tokens_per_window: int | None = None,
    device_map: DeviceMap = "auto",
    max_memory: str | MemoryLimit | None = None,
    units: bool = False,
    progress: bool = True,
) -> CkaReport:
    """Debiased linear CKA of every layer of `model_a` with every layer of `model_b`.

    Args:
        model_a: first model (`BASE+ADAPTER`: a base with its LoRA adapter applied).
        model_b: second model (it must share `model_a`'s tokenizer).
        data: probe text (`evaluate`'s forms; None: `builtin`).
        samples: probe windows.
        max_length: tokens per window.
        batch_size: windows per forward pass.
        pooling: `tokens` (the default: real tokens are the samples) or `mean` (one sample
            per window).
        tokens_per_window: with `tokens` pooling, at most this many tokens of each window, a
            seeded random subsample (None: 16, or every token with `units`; 0: every token).
        device_map: `auto`, `cpu`, `cuda:0`, ..., a JSON device map, or a mapping.
        max_memory: one size for the command's host memory (`4GB`: both models together,
            one at a time, or one at a time with layers offloaded to disk, as it allows), or
            per-device limits for accelerate, `0=20GiB,cpu=60GiB` or a mapping.
        units: add matched-unit correlation (Li et al. 2016).
        progress: draw progress bars on stderr.

    Returns:
        The report: layer names, the CKA matrix, the same-depth diagonal and the settings;
        `to_json()` is the `hfmerge cka --json` document.

    Raises:
        UnknownNameError: an unknown pooling.
        OptionError: a negative `tokens_per_window`, or one with `mean` pooling.
        ModelSourceError: a bad device map or memory limit, or a model that cannot be probed.
        InputDataError: unreadable text (checked before any model loads), or too little of it.
        IncompatibleModelsError: the models do not share a tokenizer, or one is causal and the
            other is not.
    """
    from hfmerge.analysis.cka import compute_cka
    from hfmerge.analysis.cka_samples import check_tokens_per_window
    from hfmerge.errors import UnknownNameError
    from hfmerge.lm.probe import POOLINGS

    if pooling is not None and pooling not in POOLINGS:
        raise UnknownNameError("pooling", pooling, list(POOLINGS))
    check_tokens_per_window(pooling, tokens_per_window)
    pair = probe_request(
        model_a,
        model_b,
        data=data,
        device_map=device_map,
        max_memory=max_memory,
        progress=progress,
    )
    return compute_cka(
        pair.a,
        pair.b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        pooling=pooling,  # narrowed to `Pooling` by the check above
        tokens_per_window=tokens_per_window,
        device_map=pair.device_map,
        max_memory=pair.max_memory,
        units=units,
        progress=progress,
    )


def units(
    model_a: str,
    model_b: str,
    *,
    data: str | None = None,
    samples: int = 256,
    max_length: int = 128,
    batch_size: int = 8,
    l1_penalty: float | None = None,
    device_map: DeviceMap = "auto",
    max_memory: str | MemoryLimit | None = None,
    progress: bool = True,
) -> UnitsReport:
    """How the units of `model_a` and `model_b` correspond, layer by layer (Li et al. 2016):
    one-to-one (matched correlation), one-to-many (sparse prediction) and many-to-many (groups).

    Args:
        model_a: first model (`BASE+ADAPTER`: a base with its LoRA adapter applied).
        model_b: second model (it must share `model_a`'s tokenizer).
        data: probe text (`evaluate`'s forms; None: `builtin`).
        samples: probe windows; every fourth is held out to score the regressions.
        max_length: tokens per window.
        batch_size: windows per forward pass.
        l1_penalty: the lasso's penalty in correlation units (None: 0.05).
        device_map: `auto`, `cpu`, `cuda:0`, ..., a JSON device map, or a mapping.
        max_memory: one size for the command's host memory (`4GB`: both models together,
            one at a time, or one at a time with layers offloaded to disk, as it allows), or
            per-device limits for accelerate, `0=20GiB,cpu=60GiB` or a mapping.
        progress: draw progress bars on stderr.

    Returns:
        The report: per layer pair `one_to_one`, `one_to_many` and `many_to_many`, with the
        windows and tokens used; `to_json()` is the `hfmerge units --json` document.

    Raises:
        OptionError: a negative L1 penalty.
        ModelSourceError: a bad device map or memory limit, or a model that cannot be probed.
        InputDataError: unreadable text (checked before any model loads), or too little of it.
        IncompatibleModelsError: the models do not share a tokenizer, or one is causal and the
            other is not.
        HfMergeError: models too wide for their moments to fit in memory.
    """
    from hfmerge.analysis.correspondence import L1_PENALTY
    from hfmerge.analysis.unit_report import compute_units
    from hfmerge.errors import OptionError

    penalty = L1_PENALTY if l1_penalty is None else l1_penalty
    if penalty < 0:
        raise OptionError("--l1", str(penalty), "is negative", fix="give a penalty of 0 or more")
    pair = probe_request(
        model_a,
        model_b,
        data=data,
        device_map=device_map,
        max_memory=max_memory,
        progress=progress,
    )
    return compute_units(
        pair.a,
        pair.b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        device_map=pair.device_map,
        max_memory=pair.max_memory,
        l1_penalty=penalty,
        progress=progress,
    )


def _scores(
    ref: str,
    datas: Sequence[str | None],
    *,
    max_length: int,
    samples: int | None,
    batch_size: int,
    progress: bool,
) -> list[EvalResult]:
    """`ref` scored on each text: a routed repo through its router, else the resolved model."""
    from hfmerge.analysis.evaluation import eval_model
    from hfmerge.errors import HubError
    from hfmerge.routing import eval_routed, is_routed_repo
    from hfmerge.sources.refs import unresolved_reference

    try:
        routed = is_routed_repo(ref, check_hub=True)
    except HubError as exc:  # the same error as `resolve_model` gives for a mistyped path
        raise unresolved_reference(ref, exc) from None
    if routed:
        return [
            eval_routed(
                ref,
                data=data,
                max_length=max_length,
                samples=samples,
                batch_size=batch_size,
                progress=progress,
            )
            for data in datas
        ]
    source = resolve(ref, progress=progress, adapters=True)
    return [
        eval_model(
            source,
            data=data,
            max_length=max_length,
            samples=samples,
            batch_size=batch_size,
            progress=progress,
        )
        for data in datas
    ]


__all__ = [
    "BarrierReport",
    "EvalReport",
    "FingerprintReport",
    "barrier",
    "cka",
    "evaluate",
    "fingerprint",
    "units",
]
