"""Model references and texts as the API commands take them: resolved, or refused early.

The one place in `api/` that turns what a user writes (`org/name[@revision]`, a local folder,
`zoo:NAME`) into resolved sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
