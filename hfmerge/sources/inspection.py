"""Everything hfmerge learns about a model without reading its weights: config, headers, spec.

`inspect_models` pins and inspects every model (Hub models remotely: config and safetensors
headers only) and compares them, reporting every problem of every model at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hfmerge.arch import check_shapes, require_permutable, spec_for
from hfmerge.arch.config import config_field, read_config
from hfmerge.arch.layers import layer_of
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import HfMergeError, IncompatibleModelsError, PreflightError
from hfmerge.sources.adapters import InspectedAdapter, inspect_adapter
from hfmerge.sources.refs import ModelSource, pin_model
from hfmerge.tensors import CheckpointIndex, dtype_kind, read_checkpoint_index

# Config keys that must agree for two checkpoints to be merged tensor by tensor. Vocabulary sizes
# may differ (added tokens, padding): the embeddings are remapped onto the output vocabulary.
_SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


@dataclass(frozen=True)
class InspectedModel:
    """A source with what is known before any weight is read: config, header index, spec."""

    source: ModelSource
    config: dict[str, Any]
    index: CheckpointIndex  # the base's tensors: an adapter changes values, not names or shapes
    spec: ArchSpec
    adapter: InspectedAdapter | None = None  # a LoRA adapter applied on read (`source.adapter`)

    @property
    def label(self) -> str:
        """The model's name in messages and tables (its source's label)."""
        return self.source.label


def inspect_model(
    source: ModelSource, *, offline: bool = False, warn: bool = True
) -> InspectedModel:
    """Config + safetensors headers + architecture spec; reads no tensor data.

    A pinned Hub model is read remotely (config.json and header bytes only) unless its files are
    already in the cache. A source with an adapter has it checked against the model
    (`inspect_adapter`, which with `warn` says when the adapter names another base), from its
    config and header alone as well.
    """
    if source.hub_id is not None and source.revision is not None:
        from hfmerge import hub

        config = hub.remote_config(source.hub_id, source.revision, offline=offline)
        index = hub.remote_index(source.hub_id, source.revision, offline=offline)
    else:
        config = read_config(source.path, label=source.label)
        index = read_checkpoint_index(source.path)
    shapes = {name: index.info(name).shape for name in index.names}
    spec = spec_for(config, index.names, label=source.label, shapes=shapes)
    check_shapes(spec, shapes, label=source.label)  # header shapes agree with config.json
    adapter = None
    if source.adapter is not None:
        adapter = inspect_adapter(
            source.adapter, source.without_adapter, index, spec, offline=offline, warn=warn
        )
    return InspectedModel(source=source, config=config, index=index, spec=spec, adapter=adapter)


def inspect_downloaded(source: ModelSource) -> InspectedModel:
    """`inspect_model` of a source's files on disk (a Hub model's once downloaded, its adapter's
    too): what a step that reads the weights checks them against, with no Hub request. The
    pair was inspected, and any warning about it given, when it was named."""
    return inspect_model(_on_disk(source), warn=False)


def _on_disk(source: ModelSource) -> ModelSource:
    adapter = None if source.adapter is None else _on_disk(source.adapter)
    return replace(source, hub_id=None, revision=None, adapter=adapter)


def refuse_unpermutable(
    sources: Sequence[ModelSource], *, feature: str, offline: bool = False
) -> None:
    """Refuse, from configs and headers alone (no weights), a model without a permutation spec.

    Raises:
        NoPermutationSpecError: the first model whose model_type has no family, for `feature`.
    """
    for source in sources:
        model = inspect_model(source, offline=offline)
        require_permutable(model.spec, label=model.label, feature=feature)


def inspect_models(
    refs: Sequence[tuple[str, str | None, str | None]],
    *,
    offline: bool = False,
    progress: bool = True,
    recipe_dir: Path | None = None,
) -> list[InspectedModel]:
    """Pin and inspect every (reference, revision, LoRA adapter or None), then check them
    against the first.

    No weights are downloaded. Raises the one problem found, or `PreflightError` listing every
    problem of every model (missing repo or revision, no access, offline, incompatible).
    `recipe_dir` is the folder of the recipe naming them, for hints (`pin_model`).
    """
    found: list[InspectedModel] = []
    problems: list[HfMergeError] = []
    for ref, revision, lora in refs:
        try:
            source = pin_model(
                ref,
                revision=revision,
                lora=lora,
                offline=offline,
                progress=progress,
                recipe_dir=recipe_dir,
            )
            found.append(inspect_model(source, offline=offline))
        except HfMergeError as exc:
            problems.append(exc)
    problems += compatibility_problems(found)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PreflightError(problems)
    return found


def check_mergeable(models: Sequence[InspectedModel]) -> None:
    """Every model against the first: same family, config shape keys, tensor names and shapes.

    Raises:
        IncompatibleModelsError: naming the first pair that differs and every difference found.
    """
    problems = compatibility_problems(models)
    if problems:
        raise problems[0]


def compatibility_problems(models: Sequence[InspectedModel]) -> list[IncompatibleModelsError]:
    """One error per model that differs from the first (family, config, tensor names, shapes)."""
    if not models:
        return []
    reference = models[0]
    errors = []
    for other in models[1:]:
        problems = _config_differences(reference, other) + tensor_differences(
            reference.index,
            other.index,
            label_a=reference.label,
            label_b=other.label,
            vocab=(vocab_size(reference), vocab_size(other)),
        )
        if problems:
            errors.append(IncompatibleModelsError(reference.label, other.label, problems))
    return errors


def _config_differences(a: InspectedModel, b: InspectedModel) -> list[str]:
    if a.spec.family != b.spec.family:
        return [f"architecture family {a.spec.family} vs {b.spec.family}"]
    return [
        f"config {key} {a.config.get(key)} vs {b.config.get(key)}"
        for key in _SHAPE_KEYS
        if a.config.get(key) != b.config.get(key)
    ]


def vocab_size(model: InspectedModel) -> int | None:
    """The model's vocabulary size from its config (nested text configs too)."""
    size = config_field(model.config, "vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def tensor_differences(
    index_a: CheckpointIndex,
    index_b: CheckpointIndex,
    *,
    label_a: str,
    label_b: str,
    vocab: tuple[int | None, int | None] = (None, None),
) -> list[str]:
    """Tensors only in one checkpoint, then tensors whose shapes differ (from headers alone).

    With `vocab` (each model's vocabulary size), a token-indexed tensor outside the blocks may
    have each model's own number of rows: it is remapped onto the output vocabulary.
    """
    names_a, names_b = set(index_a.names), set(index_b.names)
    problems = [f"tensor {n} only in {label_a}" for n in sorted(names_a - names_b)]
    problems += [f"tensor {n} only in {label_b}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        info_a, info_b = index_a.info(name), index_b.info(name)
        if tuple(info_a.shape) != tuple(info_b.shape) and not _vocab_rows(
            name, info_a.shape, info_b.shape, vocab
        ):
            problems.append(f"tensor {name} has shape {list(info_a.shape)} vs {list(info_b.shape)}")
        # BF16 against F32 converts exactly enough; an integer against a float would be merged
        # as the integers' values, a silent corruption of the output
        if dtype_kind(info_a.dtype) != dtype_kind(info_b.dtype):
            problems.append(
                f"tensor {name} is {info_a.dtype} vs {info_b.dtype}: a merge needs the same kind "
                "of number (float, integer, bool) in every model"
            )
    return problems


def _vocab_rows(
    name: str, shape_a: Sequence[int], shape_b: Sequence[int], vocab: tuple[int | None, int | None]
) -> bool:
    """Whether two shapes differ only in their rows, each model's own vocabulary size."""
    return (
        layer_of(name) is None
        and len(shape_a) == len(shape_b) >= 1
        and tuple(shape_a[1:]) == tuple(shape_b[1:])
        and (shape_a[0], shape_b[0]) == vocab
    )
