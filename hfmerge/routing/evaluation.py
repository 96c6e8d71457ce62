"""`hfmerge eval` on a routed repo: the token-weighted loss of the routed model, each window
scored by the expert it is routed to."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from hfmerge.lm.batches import pad_id_of
from hfmerge.lm.placement import DeviceMap, MaxMemory
from hfmerge.lm.scoring import EvalResult, causal_targets, score
from hfmerge.routing.model import RoutedModel
from hfmerge.routing.vocab import common_usable_length


def routed_length(model: RoutedModel, max_length: int) -> int:
    """`max_length`, capped at the shortest position limit among the experts."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    return common_usable_length((entry.path for entry in model.pool.models.values()), max_length)


def eval_routed(
    ref: str | Path,
    *,
    data: str | None,
    max_length: int = 128,
    samples: int | None = None,
    batch_size: int = 8,
    device_map: DeviceMap | None = "auto",
    max_memory: MaxMemory | None = None,
    offline: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Mean token loss of the routed repo `ref` on `data` (as `evaluate.eval_model`)."""
    from hfmerge.lm.textdata import describe_data, load_texts, token_windows

    texts = load_texts(data)  # first: a bad data file should fail before any model loads
    model = RoutedModel.from_pretrained(
        ref, device_map=device_map, max_memory=max_memory, offline=offline, progress=progress
    )
    length = routed_length(model, max_length)
    windows = token_windows(model.tokenizer, texts, max_length=length, samples=samples)
    # `score` needs only `train(False)` and `model(input_ids=..., attention_mask=...).logits`,
    # which RoutedModel provides; it is typed for transformers models.
    result = score(
        cast(Any, model),
        causal_targets(windows),
        pad_id=pad_id_of(model.tokenizer),
        objective="causal",
        batch_size=batch_size,
        progress=progress,
    )
    return replace(result, max_length=length, data=describe_data(data))


__all__ = ["eval_routed", "routed_length"]
