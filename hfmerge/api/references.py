"""Model references and texts as the API commands take them: resolved, or refused early.

The one place in `api/` that turns what a user writes (`org/name[@revision]`, a local folder,
`zoo:NAME`) into resolved sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfmerge.lm.load import DeviceMap, MaxMemory
    from hfmerge.sources.refs import ModelSource


def resolve(ref: str, *, progress: bool) -> ModelSource:
    """A model reference as a local model directory (Hub models pinned and downloaded)."""
    from hfmerge.sources.refs import resolve_model

    return resolve_model(ref, progress=progress)


def resolve_permutable(refs: Sequence[str], *, feature: str, progress: bool) -> list[ModelSource]:
    """`resolve` for a command that permutes or repairs: a model without a permutation spec is
    refused from its config and headers, before any weight is downloaded."""
    from hfmerge.sources.inspection import refuse_unpermutable
    from hfmerge.sources.refs import download_pinned, pin_model

    pinned = [pin_model(ref, progress=progress) for ref in refs]
    refuse_unpermutable(pinned, feature=feature)
    return [download_pinned(source) for source in pinned]


def check_texts(*datas: str | None) -> None:
    """Read every text once before any model is resolved: bad data fails fast, not after a
    download or a zoo build."""
    from hfmerge.lm.textdata import load_texts

    for data in dict.fromkeys(datas):
        load_texts(data)


@dataclass(frozen=True)
class ProbePair:
    """Two resolved models to run side by side, and where to place them."""

    a: ModelSource
    b: ModelSource
    device_map: DeviceMap
    max_memory: MaxMemory | None


def probe_pair(
    model_a: str,
    model_b: str,
    *,
    data: str | None,
    device_map: DeviceMap,
    max_memory: str | MaxMemory | None,
    progress: bool,
) -> ProbePair:
    """The models a probing command (`cka`, `units`) runs, resolved once the placement flags
    parse and the probe text reads: a bad flag or text fails before any download."""
    from hfmerge.lm.load import parse_device_map, parse_max_memory

    placement = parse_device_map(device_map) if isinstance(device_map, str) else device_map
    limits = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    check_texts(data)
    a, b = resolve(model_a, progress=progress), resolve(model_b, progress=progress)
    return ProbePair(a, b, placement, limits or None)
