"""A LoRA adapter checked against its base before any weight is downloaded.

The adapter's `adapter_config.json` and the header of its `adapter_model.safetensors` are read
(for a Hub adapter remotely, as a model's config and headers are) and every adapted module is
checked against the base's tensors: its name, its shapes and its rank. Every problem is reported
at once, in one `AdapterError` naming the adapter and the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import AdapterError, ModelSourceError
from hfmerge.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NOT_AN_ADAPTER_FIX,
    PICKLE_FIX,
    AdapterConfig,
    AdapterFiles,
    AdapterLayout,
    missing_weights,
    parse_adapter_config,
    plan_adapter,
    read_local_adapter,
)
from hfmerge.progress import say
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import PICKLE_SUFFIXES, CheckpointIndex, TensorInfo, read_shard_header

_CONV1D_FAMILIES = frozenset({"gpt2"})  # linear weights stored [in, out] (transformers' Conv1D)


@dataclass(frozen=True)
class InspectedAdapter:
    """An adapter checked against its base: where it is, its config and its layout."""

    source: ModelSource
    config: AdapterConfig
    layout: AdapterLayout
    tensors: tuple[TensorInfo, ...]  # its weights' header, to check a download against

    @property
    def weights(self) -> Path:
        """The adapter's safetensors file (for a Hub adapter, once downloaded)."""
        return self.source.path / ADAPTER_WEIGHTS


def inspect_adapter(
    adapter: ModelSource,
    base: ModelSource,
    index: CheckpointIndex,
    spec: ArchSpec,
    *,
    offline: bool,
    warn: bool = True,
) -> InspectedAdapter:
    """Read `adapter`'s config and header and check them against the base's `index`; with
    `warn`, say so when its config names another base.

    Raises:
        AdapterError: with every problem found (no adapter files, pickle-only weights, an
            unsupported PEFT type or option, a module the base lacks, wrong shapes or rank).
    """
    files, problems = _read(adapter, offline=offline)
    if files is None:
        pickled = any("pickle" in problem for problem in problems)
        fix = PICKLE_FIX if pickled else NOT_AN_ADAPTER_FIX
        raise AdapterError(adapter.label, base.label, problems, fix)
    config, problems = parse_adapter_config(files.config)
    if config is None:
        raise AdapterError(adapter.label, base.label, problems, _fix(problems))
    base_tensors = {info.name: info for info in index}
    layout, problems = plan_adapter(
        config, files.tensors, base_tensors, conv1d=spec.family in _CONV1D_FAMILIES
    )
    if problems:
        raise AdapterError(
            adapter.label,
            base.label,
            problems,
            "apply the adapter to the base it was trained on (its adapter_config.json names it "
            f"as base_model_name_or_path: {config.base_model or 'not given'})",
        )
    if warn:
        _warn_other_base(adapter, base, config)
    return InspectedAdapter(adapter, config, layout, files.tensors)


def _fix(problems: list[str]) -> str:
    if any("cannot apply" in p or "peft_type" in p for p in problems):
        return (
            "merge it into its base with PEFT first (`merge_and_unload()`, then "
            "`save_pretrained`) and use that model instead of BASE+ADAPTER"
        )
    return f"repair its {ADAPTER_CONFIG}, or save the adapter again with PEFT"


def _read(adapter: ModelSource, *, offline: bool) -> tuple[AdapterFiles | None, list[str]]:
    if adapter.hub_id is None or adapter.revision is None:
        return read_local_adapter(adapter.path, label=adapter.label)
    from hfmerge import hub

    config_path = hub.remote_file(adapter.hub_id, adapter.revision, ADAPTER_CONFIG, offline=offline)
    tensors = hub.remote_file_header(
        adapter.hub_id, adapter.revision, ADAPTER_WEIGHTS, offline=offline
    )
    problems = []
    config: Any = None
    if config_path is None:
        problems.append(f"it has no {ADAPTER_CONFIG} at commit {adapter.revision}")
    else:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"its {ADAPTER_CONFIG} cannot be read ({exc})")
    if tensors is None:
        files = hub.repo_files(adapter.hub_id, adapter.revision, offline=offline)
        problems.append(missing_weights([f for f in files if f.endswith(PICKLE_SUFFIXES)]))
    if problems or tensors is None:
        return None, problems
    return AdapterFiles(config, tuple(tensors)), []


def _warn_other_base(adapter: ModelSource, base: ModelSource, config: AdapterConfig) -> None:
    """A warning, not an error: a base's name changes with copies and mirrors, and the shapes
    fit (checked above)."""
    named = config.base_model
    if named is None:
        return
    names = {base.ref, base.hub_id, str(base.path), Path(base.ref).name}
    if named.rstrip("/") in names or Path(named).name in names:
        return
    say(
        f"warning: adapter {adapter.label} names {named} as its base "
        f"(base_model_name_or_path) and is applied to {base.label}; its shapes fit"
    )


def fetch_adapter(adapter: InspectedAdapter, *, offline: bool = False) -> InspectedAdapter:
    """A Hub adapter's config and weights downloaded into the cache (a local one as it is);
    the downloaded header must be the one inspected.

    Raises:
        ModelSourceError: the downloaded weights differ from the header read before.
    """
    source = adapter.source
    if source.hub_id is None or source.revision is None:
        return adapter
    from hfmerge import hub

    patterns = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    path = hub.download(source.hub_id, source.revision, allow_patterns=patterns, offline=offline)
    fetched = replace(adapter, source=replace(source, path=path))
    if tuple(read_shard_header(fetched.weights, ADAPTER_WEIGHTS, label=source.label)) != (
        adapter.tensors
    ):
        raise ModelSourceError(
            source.label,
            "its downloaded adapter weights do not match the header read before downloading",
            "delete its folder in the HF cache and run again",
        )
    return fetched
