"""`align`, `canonicalize` and `extract_lora`: the commands that write a model, from model
references to result objects.

The references are resolved in `api/references.py`; a model is refused from its config and
headers, before any download, when the command needs what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hfmerge.api.references import resolve, resolve_permutable
from hfmerge.recipe.align_methods import ACTIVATION_METHODS

if TYPE_CHECKING:
    from hfmerge.pipeline.extract import ExtractedAdapter

AlignMethod = Literal[
    "weight", "activation", "canonical", "weight+orthogonal", "activation+orthogonal", "learned"
]
ALIGN_PROBE_LENGTH = 128  # tokens per probe window of activation matching (`align`)
ALIGN_PROBE_SAMPLES = 64  # probe windows of activation matching (`align`)


@dataclass(frozen=True)
class AlignResult:
    """Model B written in model A's basis (`align`)."""

    model_a: str
    model_b: str
    out_dir: Path
    method: str
    iterations: int  # weight matching's sweeps (orthogonal: rounds); 1 for the others


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
    max_memory: str | int | None = None,
) -> AlignResult:
    """Write `model_b` permuted into `model_a`'s basis: the same function, loadable as usual.

    Args:
        model_a: reference model, whose basis is kept.
        model_b: model to rewrite.
        out: output directory for the aligned `model_b` (with its permutations beside it).
        method: `weight` (weight matching, no data), `activation` (probe text), `canonical`
            (both models' canonical unit order, no data) or `weight+orthogonal` (pre-norm
            models: norm gains folded into their readers, the residual stream rotated by
            Procrustes alternated with weight matching, no data; writes B folded and untied) or
            `activation+orthogonal` (the same, Q by Procrustes on residual activations of the
            probe text and the units by activation matching) or `learned` (`weight+orthogonal`,
            then Q refined by gradient descent on the loss of the interpolated models at
            λ ~ U(0.4, 0.6) on the probe text).
        data: probe text for the activation methods and `learned` (`--data` forms; default
            `builtin`).
        seed: seed of weight matching's order over the groups.
        force: replace an existing output directory.
        progress: draw progress bars on stderr.
        max_memory: host memory of the alignment, e.g. "3GB" or bytes (weight matching streams
            within it; the activation methods run the models one at a time when they do not fit
            together, with layers offloaded to disk if need be; the orthogonal methods stream as
            weight matching does; canonical holds one group's sort keys at a time, learned both
            models whole); a budget too small for the models is refused before any weight is
            read.

    Returns:
        The models, the output directory, the method and its sweeps.

    Raises:
        UnknownNameError: an unknown method.
        ModelSourceError, IncompatibleModelsError, ArchitectureError: models that cannot be
            read, or cannot be aligned with each other.
        NoPermutationSpecError: a model whose model_type has no permutation spec (refused
            before any download).
        OutputError: the output exists (without `force`) or is one of the inputs.
        OptionError: `max_memory` is not a size, or is below what the method needs.
    """
    from hfmerge.align import align_checkpoint
    from hfmerge.engine.budget import parse_memory_budget
    from hfmerge.lm.batches import text_batches
    from hfmerge.tensors import check_output_dir

    max_memory_bytes = parse_memory_budget(max_memory)
    out_dir = Path(out)
    check_output_dir(out_dir, force=force)  # before a download or a zoo build, not after
    a, b = resolve_permutable([model_a, model_b], feature="`hfmerge align`", progress=progress)
    batches = None
    if method in ACTIVATION_METHODS:
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
        max_memory_bytes=max_memory_bytes,
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
    source = resolve(model, progress=progress)
    canonicalize_checkpoint(source.path, out_dir, force=force, progress=progress)
    return CanonicalizeResult(model, out_dir)


__all__ = [
    "ALIGN_PROBE_LENGTH",
    "ALIGN_PROBE_SAMPLES",
    "AlignMethod",
    "AlignResult",
    "CanonicalizeResult",
    "align",
    "canonicalize",
    "extract_lora",
]
