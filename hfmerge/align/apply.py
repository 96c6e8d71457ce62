"""Align model directories: find B's permutations (and, for the orthogonal methods, B's folded
residual rotation and its within-head maps of attention) into A's basis and write B
so, streamed; or write one model in canonical unit order (`canonicalize_checkpoint`).

Its files beside the model (permutations, rotation, head maps) are `align/permutation_files.py`.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from hfmerge.align.activation_run import Batches, match_activations
from hfmerge.align.canonical import canonical_permutations
from hfmerge.align.head_maps import head_map_matching, with_head_maps
from hfmerge.align.permutation_files import (
    HEAD_MAPS_FILE,
    PERMUTATIONS_FILE,
    ROTATION_FILE,
    save_head_maps,
    save_permutations,
)
from hfmerge.align.weight_matching import MatchResult, weight_matching
from hfmerge.align.weights import Weights
from hfmerge.align.whole_memory import check_method_memory
from hfmerge.arch import require_permutable
from hfmerge.arch.config import CONFIG_FILE, mark_untied
from hfmerge.arch.permute import (
    compose,
    identity_permutations,
    invert,
)
from hfmerge.arch.residual import BasisMap, mapped_infos, read_in_basis, require_foldable
from hfmerge.arch.spec import Permutations
from hfmerge.errors import AlignmentError, UnknownNameError
from hfmerge.progress import track
from hfmerge.recipe.align_methods import ALIGN_METHODS, ORTHOGONAL_METHODS
from hfmerge.sources.inspection import (
    InspectedModel,
    check_mergeable,
    inspect_downloaded,
    inspect_model,
)
from hfmerge.sources.readers import open_reader
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import (
    LazyCheckpoint,
    ShardWriter,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    parse_size,
    plan_shards,
)

_WRITTEN = tuple(m for m in ALIGN_METHODS if m != "none")  # methods `align_checkpoint` takes


def _inspect_pair(
    model_a: Path | ModelSource, model_b: Path | ModelSource
) -> tuple[InspectedModel, InspectedModel]:
    """Configs, headers and specs of both models (a source's LoRA adapter checked against its
    base), refused unless they match tensor by tensor."""
    pair = tuple(
        inspect_downloaded(m if isinstance(m, ModelSource) else ModelSource(ref=str(m), path=m))
        for m in (model_a, model_b)
    )
    check_mergeable(pair)
    return pair[0], pair[1]


def _matched_names(model: InspectedModel) -> list[str]:
    """The checkpoint's tensors that alignment reads: every one but the buffers."""
    return [name for name, tensor in model.spec.tensors.items() if not tensor.buffer]


def _read_params(model: InspectedModel) -> dict[str, torch.Tensor]:
    """Every non-buffer tensor of the checkpoint as float64, its LoRA adapter applied (`learned`
    holds them whole)."""
    with ExitStack() as stack:
        reader = open_reader(stack, model)
        return {name: reader.get(name).to(torch.float64) for name in _matched_names(model)}


def _weights(stack: ExitStack, model: InspectedModel) -> Weights:
    """The tensors weight matching reads, streamed from the checkpoint (its adapter applied on
    read); shapes and sizes from the headers (an adapted tensor is read as float32)."""
    return Weights.from_headers(
        open_reader(stack, model).get, model.index.info, _matched_names(model)
    )


def _match(
    method: str,
    a: InspectedModel,
    b: InspectedModel,
    *,
    seed: int,
    batches: Batches | None,
    progress: bool,
    max_memory_bytes: int | None = None,
) -> MatchResult:
    if method == "none":
        return MatchResult(perms=identity_permutations(b.spec), iterations=0, objective=[])
    for model in (a, b):
        require_permutable(model.spec, label=model.label, feature=f"{method} matching")
    matched = set(_matched_names(a))
    shapes = {info.name: tuple(info.shape) for info in a.index if info.name in matched}
    check_method_memory(
        method, a.spec, shapes, max_memory_bytes=max_memory_bytes, progress=progress
    )
    if method in ORTHOGONAL_METHODS:
        for model in (a, b):
            require_foldable(model.spec, label=model.label, feature=f"`{method}` alignment")
        return _orthogonal_matching(
            method, a, b, batches, seed=seed, progress=progress, max_memory_bytes=max_memory_bytes
        )
    if method == "weight":
        # Streamed: tensors are read from the checkpoints one at a time (align/weights.py).
        with ExitStack() as stack:
            return weight_matching(
                b.spec,
                _weights(stack, a),
                _weights(stack, b),
                seed=seed,
                progress=progress,
                max_memory_bytes=max_memory_bytes,
            )
    if method == "canonical":
        # B to its normal form, then back out through A's: both models sorted the same way.
        # Streamed: each group's keys are read from the checkpoint when the group is sorted.
        with ExitStack() as stack:
            to_a = invert(a.spec, canonical_permutations(a.spec, _weights(stack, a)))
            perms = compose(b.spec, canonical_permutations(b.spec, _weights(stack, b)), to_a)
        return MatchResult(perms=perms, iterations=1, objective=[])
    if method == "activation":
        return match_activations(
            a, b, batches, residual="permute", progress=progress, max_memory_bytes=max_memory_bytes
        )
    raise UnknownNameError("alignment method", method, ALIGN_METHODS)


def _orthogonal_matching(
    method: str,
    a: InspectedModel,
    b: InspectedModel,
    batches: Batches | None,
    *,
    seed: int,
    progress: bool,
    max_memory_bytes: int | None,
) -> MatchResult:
    """The methods that fold both models and rotate B's residual stream."""
    if method == "learned":
        return _learned_matching(a, b, batches, seed=seed, progress=progress)
    found = None
    if method == "activation+orthogonal":
        found = match_activations(
            a, b, batches, residual="rotate", progress=progress, max_memory_bytes=max_memory_bytes
        )
    # Streamed: both checkpoints read one tensor at a time, folded and mapped on read.
    with ExitStack() as stack:
        weights_a, weights_b = _weights(stack, a), _weights(stack, b)
        if found is not None:
            # B's within-head maps added to the activation-matched map (align/head_maps.py).
            return with_head_maps(b.spec, weights_a, weights_b, found)
        # Procrustes and weight matching, then B's within-head maps (align/head_maps.py).
        return head_map_matching(
            b.spec,
            weights_a,
            weights_b,
            seed=seed,
            progress=progress,
            max_memory_bytes=max_memory_bytes,
        )


def _learned_matching(
    a: InspectedModel, b: InspectedModel, batches: Batches | None, *, seed: int, progress: bool
) -> MatchResult:
    """`weight+orthogonal`, its rotation then refined on the probe text (`learned_matching`),
    through A's causal LM loaded once."""
    from hfmerge.align.activation_run import builtin_batches
    from hfmerge.align.learned import learned_matching
    from hfmerge.lm.load import load_lm

    model = load_lm(a.source.path, label=a.label, adapter=a.source.adapter_path)
    data = builtin_batches(a) if batches is None else batches
    params_a, params_b = _read_params(a), _read_params(b)
    return learned_matching(
        b.spec, model, params_a, params_b, data, label=a.label, seed=seed, progress=progress
    )


def align_permutations(
    method: str,
    model_a: Path | ModelSource,
    model_b: Path | ModelSource,
    *,
    seed: int = 0,
    batches: Batches | None = None,
    progress: bool = False,
    max_memory_bytes: int | None = None,
) -> Permutations:
    """Permutations bringing model B into model A's basis (`none` gives the identity).

    `weight` streams both checkpoints' tensors, within `max_memory_bytes` when given (refused
    before any weight is read if too small); `canonical` streams them too, one group's keys at a
    time; `activation` loads both models with transformers and runs `batches` (default: the
    built-in probe text through A's tokenizer), within `max_memory_bytes` when given: together,
    or one at a time with their features on disk and layers offloaded as needed
    (`align/activation_run.py`). A model is a folder, or a resolved source whose LoRA adapter is
    applied to what is read.
    """
    if method in ORTHOGONAL_METHODS:
        raise AlignmentError(
            f"`{method}` maps the residual stream by an orthogonal matrix, not a permutation",
            fix="call align_basis, which returns the permutations and the rotation together",
        )
    return _solve(method, model_a, model_b, seed, batches, progress, max_memory_bytes).perms


def align_basis(
    method: str,
    model_a: Path | ModelSource,
    model_b: Path | ModelSource,
    *,
    seed: int = 0,
    batches: Batches | None = None,
    progress: bool = False,
    max_memory_bytes: int | None = None,
) -> BasisMap:
    """How model B is read into model A's basis by any method (`none`: as it is).

    As `align_permutations`; the orthogonal methods add the norm fold and B's residual rotation.
    `max_memory_bytes` bounds `weight`, `activation` and the orthogonal methods, which stream;
    `learned`, which holds both models whole, is refused when it, or the machine, is below its
    peak (`align/whole_memory.py`).
    """
    return _solve(method, model_a, model_b, seed, batches, progress, max_memory_bytes).basis


def _solve(
    method: str,
    model_a: Path | ModelSource,
    model_b: Path | ModelSource,
    seed: int,
    batches: Batches | None,
    progress: bool,
    max_memory_bytes: int | None,
) -> MatchResult:
    """Both models inspected, then matched by `method`."""
    a, b = _inspect_pair(model_a, model_b)
    return _match(
        method,
        a,
        b,
        seed=seed,
        batches=batches,
        progress=progress,
        max_memory_bytes=max_memory_bytes,
    )


def align_checkpoint(
    model_a_dir: Path,
    model_b_dir: Path,
    out_dir: Path,
    *,
    method: Literal[
        "weight", "activation", "canonical", "weight+orthogonal", "activation+orthogonal", "learned"
    ],
    seed: int = 0,
    batches: Batches | None = None,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
    max_memory_bytes: int | None = None,
) -> MatchResult:
    """Write model B permuted into A's basis to `out_dir`: same function as B, loadable as usual.

    Tensors stream one at a time from B's shards into the output; config and tokenizer files are
    copied from B, and the permutations are saved as `hfmerge_permutations.safetensors`. The
    orthogonal methods write B folded (norm gains 1, a tied head untied) and rotated, with the
    rotation beside it (`hfmerge_rotation.safetensors`) and B's heads mapped within
    (`hfmerge_head_maps.safetensors`).
    `max_memory_bytes` bounds weight matching (see `align_permutations`).
    """
    parse_size(max_shard_size)  # a bad size fails now, not after the matching
    if method not in _WRITTEN:
        raise UnknownNameError("alignment method", method, _WRITTEN)
    out_dir = Path(out_dir)
    # before the long matching, not after it
    check_output_dir(out_dir, force=force, inputs=[Path(model_a_dir), Path(model_b_dir)])
    a, b = _inspect_pair(model_a_dir, model_b_dir)
    result = _match(
        method,
        a,
        b,
        seed=seed,
        batches=batches,
        progress=progress,
        max_memory_bytes=max_memory_bytes,
    )
    _write_aligned(
        b,
        out_dir,
        result.basis,
        force=force,
        progress=progress,
        max_shard_bytes=parse_size(max_shard_size),
        metadata={"aligned_by": "hfmerge", "align_method": method},
    )
    return result


def canonicalize_checkpoint(
    model_dir: Path,
    out_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
) -> Permutations:
    """Write the model in canonical unit order to `out_dir`: the same function, loadable as usual.

    Any permuted copy of the model is written as the very same tensors. Config and tokenizer files
    are copied; the permutations are saved beside the weights, as `align_checkpoint` does.
    """
    max_shard_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force=force, inputs=[Path(model_dir)])
    model = inspect_model(ModelSource(ref=str(model_dir), path=Path(model_dir)))
    require_permutable(model.spec, label=model.label, feature="canonicalize")
    with ExitStack() as stack:  # streamed: one group's keys held at a time
        perms = canonical_permutations(model.spec, _weights(stack, model))
    _write_aligned(
        model,
        out_dir,
        BasisMap(perms),
        force=force,
        progress=progress,
        max_shard_bytes=max_shard_bytes,
        metadata={"aligned_by": "hfmerge", "align_method": "canonical"},
        description="writing canonical model",
    )
    return perms


def _write_aligned(
    b: InspectedModel,
    out_dir: Path,
    basis: BasisMap,
    *,
    force: bool,
    progress: bool,
    max_shard_bytes: int,
    metadata: dict[str, str],
    description: str = "writing aligned model",
) -> None:
    """Stream B's tensors through `basis` into shards, keeping B's dtypes, names and side files
    (a head untied by the fold is added, with the tensor's it was tied to dtype and shape)."""
    spec, path = b.spec, b.source.path
    infos = mapped_infos(spec, b.index, basis)
    plan = plan_shards(infos, max_shard_bytes=max_shard_bytes)
    perms = basis.perms if basis.perms is not None else identity_permutations(spec)
    with atomic_output_dir(out_dir, force=force) as tmp:
        with (
            LazyCheckpoint(path, label=b.label) as reader,
            ShardWriter(tmp, plan, metadata=metadata) as writer,
        ):
            for name in track(plan.names, description=description, enabled=progress):
                writer.write(name, read_in_basis(name, reader.get, spec, basis))
        copy_side_files(path, tmp)
        if len(infos) > len(b.index.names):
            mark_untied(tmp / CONFIG_FILE)
        save_permutations(
            tmp / PERMUTATIONS_FILE, perms, metadata={"family": spec.family, **metadata}
        )
        if basis.rotation is not None:
            rotation = basis.rotation.to(torch.float64).contiguous()
            save_file({"rotation": rotation}, str(tmp / ROTATION_FILE), metadata=metadata)
        if basis.head_maps is not None:
            save_head_maps(tmp / HEAD_MAPS_FILE, basis.head_maps, metadata=metadata)
