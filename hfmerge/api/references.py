"""Model references and texts as the API commands take them: resolved, or refused early.

The one place in `api/` that turns what a user writes (`org/name[@revision]`, a local folder,
`zoo:NAME`) into resolved sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfmerge.errors import AdapterError

if TYPE_CHECKING:
    from hfmerge.lm.placement import DeviceMap, MemoryLimit
    from hfmerge.sources.refs import ModelSource


def resolve(ref: str, *, progress: bool, adapters: bool = False) -> ModelSource:
    """A model reference as a local model directory (Hub models pinned and downloaded).

    With `adapters` (a command that loads models whole, and so applies a LoRA adapter when it
    loads them), `BASE+ADAPTER` is a base with its adapter, both pinned and downloaded;
    otherwise `BASE+ADAPTER` is refused with an AdapterError (a path that exists is a path).
    """
    from hfmerge.sources.refs import download_pinned

    return download_pinned(_pin(ref, progress=progress, adapters=adapters))


def resolve_permutable(
    refs: Sequence[str], *, feature: str, progress: bool, adapters: bool = False
) -> list[ModelSource]:
    """`resolve` for a command that permutes or repairs: a model without a permutation spec is
    refused from its config and headers, before any weight is downloaded."""
    from hfmerge.sources.inspection import refuse_unpermutable
    from hfmerge.sources.refs import download_pinned

    pinned = [_pin(ref, progress=progress, adapters=adapters) for ref in refs]
    refuse_unpermutable(pinned, feature=feature)
    return [download_pinned(source) for source in pinned]


def _pin(ref: str, *, progress: bool, adapters: bool) -> ModelSource:
    """`ref` pinned; `BASE+ADAPTER` as a base with its adapter when `adapters`."""
    from hfmerge.recipe.adapter_refs import split_adapter
    from hfmerge.sources.refs import pin_model

    model, adapter = split_adapter(ref)
    if adapter is not None and not adapters:
        raise AdapterError(
            adapter,
            model,
            ["this command reads the model's own weights, and does not apply LoRA adapters"],
            fix="merge the adapter into its base first (`hfmerge run` on a recipe whose one "
            "model is BASE+ADAPTER, or PEFT's merge_and_unload) and name that model",
        )
    return pin_model(model, lora=adapter, progress=progress)


def check_texts(*datas: str | None) -> None:
    """Read every text once before any model is resolved: bad data fails fast, not after a
    download or a zoo build."""
    from hfmerge.lm.textdata import load_texts

    for data in dict.fromkeys(datas):
        load_texts(data)


@dataclass(frozen=True)
class ProbeRequest:
    """Two resolved models to probe side by side, and the placement flags as parsed."""

    a: ModelSource
    b: ModelSource
    device_map: DeviceMap
    max_memory: MemoryLimit | None


def probe_request(
    model_a: str,
    model_b: str,
    *,
    data: str | None,
    device_map: DeviceMap,
    max_memory: str | MemoryLimit | None,
    progress: bool,
) -> ProbeRequest:
    """The models a probing command (`cka`, `units`) runs, resolved once the placement flags
    parse and the probe text reads: a bad flag or text fails before any download."""
    from hfmerge.lm.placement import check_budget_map, parse_device_map, parse_memory_limit

    placement = parse_device_map(device_map) if isinstance(device_map, str) else device_map
    limits = parse_memory_limit(max_memory) if isinstance(max_memory, str) else max_memory
    if isinstance(limits, int):
        check_budget_map(placement)
    check_texts(data)
    a = resolve(model_a, progress=progress, adapters=True)
    b = resolve(model_b, progress=progress, adapters=True)
    return ProbeRequest(a, b, placement, limits or None)
