"""Activation matching of two model folders: loading them, the probe text, and memory.

Without a budget both models load whole. With `max_memory_bytes` (`hfmerge align --method
activation --max-memory`), the models and the statistics are planned from the configs, the
safetensors headers and the groups' widths before anything loads (`lm.placement.plan_placement`):
both together when they fit beside every group's float64 sums, else one at a time, each one's
features written to a temporary folder and each group's sums made from them and dropped once it
is matched (`align/activation_store.py`), with the layers that do not fit offloaded to disk.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.align.activation_matching import (
    ResidualMap,
    activation_matching,
    activation_matching_one_at_a_time,
)
from hfmerge.align.activation_probes import Probe, probes_of
from hfmerge.align.weight_matching import MatchResult
from hfmerge.arch import spec_for
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import AlignmentError
from hfmerge.sources.inspection import InspectedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hfmerge.lm.placement import ProbePlacement

Batches = Iterable[dict[str, torch.Tensor]]
PROBE_SAMPLES, PROBE_LENGTH, PROBE_BATCH = 32, 128, 8  # built-in probe when no batches are given
FLOAT32, FLOAT64 = 4, 8


def model_class(model: InspectedModel) -> Any:
    """The checkpoint's own model class (config `architectures`), else AutoModel."""
    import transformers

    names = model.config.get("architectures") or []
    cls = getattr(transformers, str(names[0]), None) if names else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel


def load_model(
    model: InspectedModel,
    placement: ProbePlacement | None = None,
    offload_folder: Path | None = None,
) -> PreTrainedModel:
    """The checkpoint's own model class in float32, placed as `placement` says (default: whole,
    on the CPU)."""
    from hfmerge.lm.load import load_pretrained

    where: dict[str, Any] = {}
    if placement is not None:
        where = {"device_map": placement.device_map, "max_memory": placement.max_memory}
    try:
        return load_pretrained(
            model_class(model),
            model.source.path,
            label=model.label,
            adapter=model.source.adapter_path,
            offload_folder=offload_folder,
            **where,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise AlignmentError(
            f"transformers cannot load {model.label}: {exc}",
            fix="use weight matching, which reads the safetensors directly",
        ) from None


def builtin_batches(model: InspectedModel) -> list[dict[str, torch.Tensor]]:
    """Batches of the built-in English probe text, tokenized with the model's own tokenizer."""
    from hfmerge.lm.batches import text_batches

    return text_batches(
        model.source.path,
        label=model.label,
        data=None,
        max_length=PROBE_LENGTH,
        samples=PROBE_SAMPLES,
        batch_size=PROBE_BATCH,
    )


def _loaded_spec(model: InspectedModel, loaded: PreTrainedModel) -> ArchSpec:
    """The spec over the loaded module names (group names do not depend on name prefixes, so its
    permutations fit the checkpoint's spec too). A mixture of experts keeps the checkpoint's
    spec: its loaded experts are fused, and are found by checkpoint name."""
    if model.spec.has_experts:
        return model.spec
    return spec_for(loaded.config.to_dict(), loaded.state_dict().keys(), label=model.label)


def match_activations(
    a: InspectedModel,
    b: InspectedModel,
    batches: Batches | None,
    *,
    residual: ResidualMap,
    progress: bool,
    max_memory_bytes: int | None = None,
) -> MatchResult:
    """Activation matching of the two models (`activation_matching`), within
    `max_memory_bytes` of host memory when given.

    Raises:
        HfMergeError: the budget cannot hold one model's probe with its layers on disk.
    """
    data = builtin_batches(a) if batches is None else list(batches)
    if max_memory_bytes is None:
        model_a, model_b = load_model(a), load_model(b)
        spec = _loaded_spec(a, model_a)
        return activation_matching(
            spec, model_a, model_b, data, residual=residual, progress=progress
        )
    skeleton = _skeleton(a)
    spec = _loaded_spec(a, skeleton)
    probes = probes_of(spec, dict(skeleton.named_modules()))
    placement = _plan(a, b, skeleton.config, probes, data, max_memory_bytes)
    if progress:
        from hfmerge.lm.probe_time import ProbeText, announce_probe

        announce_probe(
            placement,
            "activation matching",
            budget=max_memory_bytes,
            path=a.source.path,
            label=a.label,
            text=ProbeText.of(data),
            passes=2,
        )
    if not placement.one_at_a_time:
        model_a, model_b = load_model(a, placement), load_model(b, placement)
        return activation_matching(
            spec, model_a, model_b, data, residual=residual, progress=progress
        )
    with tempfile.TemporaryDirectory(prefix="hfmerge-") as folder:
        root = Path(folder)
        loaders = (
            lambda: load_model(a, placement, root / "offload-a" if placement.offload else None),
            lambda: load_model(b, placement, root / "offload-b" if placement.offload else None),
        )
        return activation_matching_one_at_a_time(
            spec,
            probes,
            loaders,
            data,
            root / "features",
            residual=residual,
            progress=progress,
        )


def _skeleton(model: InspectedModel) -> PreTrainedModel:
    from hfmerge.lm.load import empty_model

    return empty_model(model_class(model), model.source.path, label=model.label)


def _plan(
    a: InspectedModel,
    b: InspectedModel,
    config: Any,
    probes: list[Probe],
    batches: list[dict[str, torch.Tensor]],
    budget: int,
) -> ProbePlacement:
    """Where the models go within `budget`: every group's float64 sums are held when they run
    together, one group's at a time (and one batch of features) when they run one at a time."""
    from hfmerge.lm.placement import Footprint, forward_bytes, plan_placement

    widths = [len(p.columns) for p in probes]
    hidden, depth = int(config.hidden_size), int(config.num_hidden_layers) + 1
    sums = [_sums_bytes(w) for w in widths] + [_sums_bytes(hidden)] * depth
    batch, length = (max(int(b["input_ids"].shape[i]) for b in batches) for i in (0, 1))
    # One batch's captured activations (float32), and one feature set of them in float64.
    features = batch * length * (FLOAT32 * (sum(widths) + hidden * depth) + FLOAT64 * max(widths))
    return plan_placement(
        (Footprint.of(a.source.path, label=a.label), Footprint.of(b.source.path, label=b.label)),
        budget=budget,
        device_map="auto",
        working=forward_bytes([config], batch_size=batch, length=length) + features,
        kept=max(sums),
        paired=sum(sums),
    )


def _sums_bytes(width: int) -> int:
    """A CrossStats of two width-`width` feature sets: the cross sums and four vectors."""
    return FLOAT64 * (width * width + 4 * width)


__all__ = ["Batches", "builtin_batches", "load_model", "match_activations", "model_class"]
