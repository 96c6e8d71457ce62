"""`align`, `canonicalize`, `fingerprint`, `evaluate`, `barrier`, `cka` and `extract_lora`: model
references in, result objects out.

The references are resolved here (`hfmerge.sources.refs.resolve_model`). Every text is read before
any model is resolved, so bad data fails before a download or a zoo build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from hfmerge.analysis.barrier import BarrierResult
    from hfmerge.analysis.cka import CkaReport
    from hfmerge.analysis.evaluation import EvalCell
    from hfmerge.analysis.fingerprint import PairResult
    from hfmerge.lm.load import DeviceMap, MaxMemory
    from hfmerge.lm.scoring import EvalResult
    from hfmerge.pipeline.extract import ExtractedAdapter
    from hfmerge.sources.refs import ModelSource

AlignMethod = Literal["weight", "activation", "canonical"]
ALIGN_PROBE_LENGTH = 128  # tokens per probe window of activation matching (`align`)
ALIGN_PROBE_SAMPLES = 64  # probe windows of activation matching (`align`)


@dataclass(frozen=True)
class AlignResult:
    """Model B written in model A's basis (`align`)."""

    model_a: str
    model_b: str
    out_dir: Path
    method: str
    iterations: int  # weight matching's sweeps over all groups; 1 for the other methods


def align(
    model_a: str,
    model_b: str,
    out: str | Path,
    *,
    method: AlignMethod = "weight",
    data: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> AlignResult:
    """Write `model_b` permuted into `model_a`'s basis: the same function, loadable as usual.

    Args:
        model_a: reference model, whose basis is kept.
        model_b: model to rewrite.
        out: output directory for the aligned `model_b` (with its permutations beside it).
        method: `weight` (weight matching, no data), `activation` (probe text) or `canonical`
            (both models' canonical unit order, no data).
        data: probe text for activation matching (`--data` forms; default `builtin`).
        seed: seed of weight matching's order over the groups.
        force: replace an existing output directory.
        progress: draw progress bars on stderr.

    Returns:
        The models, the output directory, the method and its sweeps.

    Raises:
        UnknownNameError: an unknown method.
        ModelSourceError, IncompatibleModelsError, ArchitectureError: models that cannot be
            read, or cannot be aligned with each other.
        NoPermutationSpecError: a model whose model_type has no permutation spec (refused
            before any download).
        OutputError: the output exists (without `force`) or is one of the inputs.
    """
    from hfmerge.align import align_checkpoint
    from hfmerge.lm.batches import text_batches
    from hfmerge.tensors import check_output_dir

    out_dir = Path(out)
    check_output_dir(out_dir, force=force)  # before a download or a zoo build, not after
    a, b = _resolve_permutable([model_a, model_b], feature="`hfmerge align`", progress=progress)
    batches = None
    if method == "activation":
        batches = text_batches(
            a.path,
            label=a.label,
            data=data,
            max_length=ALIGN_PROBE_LENGTH,
            samples=ALIGN_PROBE_SAMPLES,
        )
    result = align_checkpoint(
        a.path,
        b.path,
        out_dir,
        method=method,
        seed=seed,
        batches=batches,
        force=force,
        progress=progress,
    )
    return AlignResult(model_a, model_b, out_dir, method, result.iterations)


def extract_lora(
    model: str,
    base: str,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    modules_to_save: bool = False,
    force: bool = False,
    offline: bool = False,
    progress: bool = True,
) -> ExtractedAdapter:
    """Extract a PEFT LoRA adapter from a fine-tune: `base` plus the adapter ≈ `model`.

    Each linear weight's difference from the base is factored by SVD, streamed one tensor at a
    time in float32; `PeftModel.from_pretrained(base, out)` loads the result. At full rank the
    adapter reproduces the fine-tune's linear weights exactly.

    Args:
        model: the fine-tune (a local directory, `zoo:NAME` or a Hub id).
        base: the model it was fine-tuned from.
        out: output directory: adapter_model.safetensors, adapter_config.json, README.md.
        rank: the rank of every delta (capped by the matrix's own). Default 16 without `energy`.
        energy: instead of `rank`, per tensor the smallest rank keeping this share (0 < F <= 1)
            of the delta's squared singular values.
        modules_to_save: save changed embeddings, norms and biases whole (PEFT's
            `modules_to_save`) instead of leaving them out.
        force: replace an existing output directory.
        offline: use only the local HF cache.
        progress: draw progress bars on stderr.

    Returns:
        The output directory, the adapter's config, and each tensor's rank and kept energy.

    Raises:
        OptionError: both `rank` and `energy`, or a value out of range.
        ModelSourceError, HubError, IncompatibleModelsError: models that cannot be read, or
            that are not one base and its fine-tune (names or shapes differ).
        OutputError: the output exists (without `force`) or overlaps an input.
        NonFiniteWeightsError: a delta holds NaN or Inf values.
    """
    from hfmerge.lora.factor import rank_choice
    from hfmerge.pipeline.extract import extract_lora_adapter
    from hfmerge.sources.refs import pin_model
    from hfmerge.tensors import check_output_dir

    choice = rank_choice(rank, energy)
    check_output_dir(Path(out), force=force)  # before a download or a zoo build, not after
    pinned_model = pin_model(model, offline=offline, progress=progress)
    pinned_base = pin_model(base, offline=offline, progress=progress)
    return extract_lora_adapter(
        pinned_model,
        pinned_base,
        Path(out),
        choice,
        modules_to_save=modules_to_save,
        force=force,
        offline=offline,
        progress=progress,
    )


@dataclass(frozen=True)
class CanonicalizeResult:
    """A model written in canonical unit order (`canonicalize`)."""

    model: str
    out_dir: Path


def canonicalize(
    model: str, out: str | Path, *, force: bool = False, progress: bool = True
) -> CanonicalizeResult:
    """Write `model` with every permutation group in canonical order: the same function, and the
    same tensors, bit for bit, for any permuted copy of it.

    Args:
        model: the model to rewrite (a directory, `zoo:NAME` or a Hub id).
        out: output directory (config, tokenizer and side files copied from `model`).
        force: replace an existing output directory.
        progress: draw progress bars on stderr.

    Returns:
        The model and the output directory.

    Raises:
        ModelSourceError, ArchitectureError: a model that cannot be read or has no spec.
        AlignmentError: a permutation group that no tensor can key (an unusual spec).
        OutputError: the output exists (without `force`) or is the input.
    """
    from hfmerge.align import canonicalize_checkpoint
    from hfmerge.tensors import check_output_dir

    out_dir = Path(out)
    check_output_dir(out_dir, force=force)  # before a download or a zoo build, not after
    source = _resolve(model, progress=progress)
    canonicalize_checkpoint(source.path, out_dir, force=force, progress=progress)
    return CanonicalizeResult(model, out_dir)


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
        fingerprint_of(inspect_model(_resolve(ref, progress=progress)), progress=progress)
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
        models: model references or routed repos; one or several.
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
    _check_texts(*datas)
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
        model_a: the model at λ = 0.
        model_b: the model at λ = 1.
        align: alignment modes to compare: `none`, `weight`, `activation` or `canonical`, each
            optionally `+repair`; a name, a comma list, or a sequence of either.
        steps: points on the λ grid (λ = 0.5, the merged model, is always among them).
        data: text to score (`evaluate`'s forms; None: `builtin`).
        probe_data: text for activation matching and REPAIR statistics (default: `data`).
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
    _check_texts(data, *([] if probe_data is None else [probe_data]))
    permuted = [mode for mode in aligns if mode != "none"]  # `weight`, `none+repair`, ...
    if permuted:
        feature = f"`barrier --align {permuted[0]}`"
        a, b = _resolve_permutable([model_a, model_b], feature=feature, progress=progress)
    else:
        a, b = _resolve(model_a, progress=progress), _resolve(model_b, progress=progress)
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
    device_map: DeviceMap = "auto",
    max_memory: str | MaxMemory | None = None,
    units: bool = False,
    progress: bool = True,
) -> CkaReport:
    """Debiased linear CKA of every layer of `model_a` with every layer of `model_b`.

    Args:
        model_a: first model.
        model_b: second model (it must share `model_a`'s tokenizer).
        data: probe text (`evaluate`'s forms; None: `builtin`).
        samples: probe windows.
        max_length: tokens per window.
        batch_size: windows per forward pass.
        pooling: `mean` (one sample per window; the default) or `tokens` (every real token;
            the default with `units`).
        device_map: `auto`, `cpu`, `cuda:0`, ..., a JSON device map, or a mapping.
        max_memory: per-device limits, `0=20GiB,cpu=60GiB` or a mapping.
        units: add matched-unit correlation (Li et al. 2016).
        progress: draw progress bars on stderr.

    Returns:
        The report: layer names, the CKA matrix, the same-depth diagonal and the settings;
        `to_json()` is the `hfmerge cka --json` document.

    Raises:
        UnknownNameError: an unknown pooling.
        ModelSourceError: a bad device map or memory limit, or a model that cannot be probed.
        InputDataError: unreadable text (checked before any model loads), or too little of it.
        IncompatibleModelsError: the models do not share a tokenizer, or one is causal and the
            other is not.
    """
    from hfmerge.analysis.cka import compute_cka
    from hfmerge.errors import UnknownNameError
    from hfmerge.lm.load import parse_device_map, parse_max_memory
    from hfmerge.lm.probe import POOLINGS

    if pooling is not None and pooling not in POOLINGS:
        raise UnknownNameError("pooling", pooling, list(POOLINGS))
    placement = parse_device_map(device_map) if isinstance(device_map, str) else device_map
    limits = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    _check_texts(data)
    a, b = _resolve(model_a, progress=progress), _resolve(model_b, progress=progress)
    return compute_cka(
        a,
        b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        pooling=pooling,  # narrowed to `Pooling` by the check above
        device_map=placement,
        max_memory=limits or None,
        units=units,
        progress=progress,
    )


def _resolve(ref: str, *, progress: bool) -> ModelSource:
    """A model reference as a local model directory (Hub models pinned and downloaded)."""
    from hfmerge.sources.refs import resolve_model

    return resolve_model(ref, progress=progress)


def _resolve_permutable(refs: Sequence[str], *, feature: str, progress: bool) -> list[ModelSource]:
    """`_resolve` for a command that permutes or repairs: a model without a permutation spec is
    refused from its config and headers, before any weight is downloaded."""
    from hfmerge.sources.inspection import refuse_unpermutable
    from hfmerge.sources.refs import download_pinned, pin_model

    pinned = [pin_model(ref, progress=progress) for ref in refs]
    refuse_unpermutable(pinned, feature=feature)
    return [download_pinned(source) for source in pinned]


def _check_texts(*datas: str | None) -> None:
    """Read every text once before any model is resolved: bad data fails fast, not after a
    download or a zoo build."""
    from hfmerge.lm.textdata import load_texts

    for data in dict.fromkeys(datas):
        load_texts(data)


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
    source = _resolve(ref, progress=progress)
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
    "ALIGN_PROBE_LENGTH",
    "ALIGN_PROBE_SAMPLES",
    "AlignMethod",
    "AlignResult",
    "BarrierReport",
    "CanonicalizeResult",
    "EvalReport",
    "FingerprintReport",
    "align",
    "barrier",
    "canonicalize",
    "cka",
    "evaluate",
    "extract_lora",
    "fingerprint",
]
