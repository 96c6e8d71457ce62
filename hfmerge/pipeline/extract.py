"""`extract-lora`: a fine-tune and its base in, a PEFT LoRA adapter folder out.

Both models are inspected from configs and headers and checked tensor by tensor before any
weight is downloaded; the output is checked (and refused over an input) before the long work,
and staged like every output (`atomic_output_dir`): only a complete adapter replaces the target.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from hfmerge.lora import ADAPTER_CONFIG
from hfmerge.lora.export import adapter_config, rank_table, render_adapter_card
from hfmerge.lora.extract import Extraction, ExtractSources, extract_adapter, float_parameters
from hfmerge.lora.factor import RankChoice
from hfmerge.runtime import resolve_device
from hfmerge.sources.inspection import check_mergeable, inspect_model
from hfmerge.sources.refs import ModelSource, download_pinned
from hfmerge.tensors import LazyCheckpoint, atomic_output_dir, check_output_dir, output_path

_CONV1D_FAMILIES = frozenset({"gpt2"})


@dataclass(frozen=True)
class ExtractedAdapter:
    """Where the adapter went, its PEFT config, and what became of every tensor."""

    out_dir: Path
    config: dict[str, object]
    extraction: Extraction

    @property
    def table(self) -> str:
        """Each tensor's rank and kept energy, as the card shows it (Markdown)."""
        return rank_table(self.extraction)


def extract_lora_adapter(
    model: ModelSource,
    base: ModelSource,
    out: Path,
    choice: RankChoice,
    *,
    modules_to_save: bool = False,
    force: bool = False,
    offline: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> ExtractedAdapter:
    """Write the LoRA adapter that turns `base` into (approximately) `model` into `out`.

    Raises:
        OutputError: `out` exists (without `force`) or overlaps an input.
        IncompatibleModelsError: the two checkpoints differ in names or shapes.
        NonFiniteWeightsError: a delta holds NaN or Inf values.
    """
    target = output_path(out)
    check_output_dir(target, force=force)
    inspected_model = inspect_model(model, offline=offline)
    inspected_base = inspect_model(base, offline=offline)
    check_mergeable([inspected_base, inspected_model])
    check_output_dir(target, force=force, inputs=[base.path, model.path])  # before downloads
    model_path = download_pinned(model, offline=offline).path
    base_path = download_pinned(base, offline=offline).path
    spec = inspected_base.spec
    buffers = frozenset(name for name, t in spec.tensors.items() if t.buffer)
    conv1d = spec.family in _CONV1D_FAMILIES
    base_name = base.hub_id or base.ref
    with atomic_output_dir(target, force=force) as staging, ExitStack() as stack:
        sources = ExtractSources(
            base=stack.enter_context(LazyCheckpoint(base_path, label=base.label)),
            model=stack.enter_context(LazyCheckpoint(model_path, label=model.label)),
            tensors=float_parameters(list(inspected_base.index), buffers),
            label=model.label,
            conv1d=conv1d,
        )
        extraction = extract_adapter(
            sources,
            staging,
            choice,
            modules_to_save=modules_to_save,
            device=resolve_device(device),
            progress=progress,
        )
        config = adapter_config(extraction, base_model=base_name, conv1d=conv1d)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        card = render_adapter_card(
            extraction, title=target.name, base_model=base_name, model=model.label, choice=choice
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
    return ExtractedAdapter(target, config, extraction)
