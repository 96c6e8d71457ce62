"""Model references -> sources: a path, `zoo:NAME` (the offline model zoo), or a Hub id.

Hub ids (`org/name[@revision]`) are pinned to a commit sha through `hfmerge.hub` before anything
else; their files are downloaded only when asked (`fetch_files`), after preflight has passed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hfmerge.errors import ModelSourceError
from hfmerge.tensors import INDEX_FILE, SIDE_FILES, SINGLE_FILE

ZOO_PREFIX = "zoo:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A pinned model: where its files are, and the reference the user wrote for it."""

    ref: str  # as written in the recipe or on the command line
    # Local directory holding config.json and safetensors. For a Hub model, the cache's snapshot
    # folder of its pinned commit, which holds its files once `fetch_files` has run.
    path: Path
    hub_id: str | None = None  # set for models that came from the Hub
    revision: str | None = None  # the commit sha they were pinned to
    license: str | None = None  # the Hub card's license, when it declares one

    @property
    def label(self) -> str:
        """The model's name in messages and tables: the reference as the user wrote it."""
        return self.ref


def split_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); a reference without `@` has no revision."""
    if "@" in ref and not Path(ref).exists():
        name, _, revision = ref.rpartition("@")
        return name, revision or None
    return ref, None


def is_hub_id(ref: str) -> bool:
    """True for `org/name` that is not an existing local path."""
    return bool(_HUB_ID.match(split_revision(ref)[0])) and not Path(ref).exists()


def pin_model(
    ref: str, *, revision: str | None = None, offline: bool = False, progress: bool = True
) -> ModelSource:
    """Resolve a reference without downloading weights: Hub ids are pinned to a commit sha.

    Raises:
        ModelSourceError: the reference names nothing usable.
        HubError: the Hub cannot resolve it (missing repo or revision, no access, offline).
    """
    if ref.startswith(ZOO_PREFIX):
        from hfmerge.zoo import zoo_model

        return ModelSource(ref=ref, path=zoo_model(ref[len(ZOO_PREFIX) :], progress=progress))
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelSource(ref=ref, path=path.resolve())
    if path.exists():
        raise ModelSourceError(
            ref,
            "is a file, not a model directory",
            "name the directory that holds config.json and *.safetensors",
        )
    if is_hub_id(ref):
        return _pin_hub_model(ref, revision, offline=offline)
    raise ModelSourceError(
        ref, "no such directory", "give a model directory, `zoo:NAME` or a Hub id `org/name`"
    )


def resolve_model(
    ref: str, *, revision: str | None = None, offline: bool = False, progress: bool = True
) -> ModelSource:
    """Resolve one reference to a local model directory, downloading a Hub model if needed.

    Raises:
        ModelSourceError: the reference names nothing usable.
        HubError: the Hub cannot provide it.
    """
    source = pin_model(ref, revision=revision, offline=offline, progress=progress)
    return download_pinned(source, offline=offline)


def download_pinned(source: ModelSource, *, offline: bool = False) -> ModelSource:
    """A pinned Hub model's weights, config and tokenizer in the cache; local sources as is."""
    if source.hub_id is None or source.revision is None:
        return source
    from hfmerge import hub

    index = hub.remote_index(source.hub_id, source.revision, offline=offline)
    return fetch_files(source, index.shards, side_files=True, offline=offline)


def fetch_files(
    source: ModelSource, shards: Sequence[str], *, side_files: bool, offline: bool = False
) -> ModelSource:
    """Download a pinned Hub model's weight `shards` (and config/tokenizer files) to the cache.

    Only safetensors shards named by its header index and the known config and tokenizer files
    are fetched; local sources are returned unchanged.
    """
    if source.hub_id is None or source.revision is None:
        return source
    from hfmerge import hub

    patterns = list(shards)
    if tuple(shards) != (SINGLE_FILE,):
        patterns.append(INDEX_FILE)
    patterns += list(SIDE_FILES) if side_files else ["config.json"]
    path = hub.download(source.hub_id, source.revision, allow_patterns=patterns, offline=offline)
    return replace(source, path=path)


def _pin_hub_model(ref: str, revision: str | None, *, offline: bool) -> ModelSource:
    from hfmerge import hub

    repo_id, inline = split_revision(ref)
    if inline and revision and inline != revision:
        raise ModelSourceError(
            ref,
            f"names revision {inline!r} and also `revision: {revision}`",
            "give the revision once, either as `org/name@rev` or as `revision:`",
        )
    pinned = hub.pin(repo_id, revision or inline, offline=offline)
    return ModelSource(
        ref=f"{ref}@{revision}" if revision and not inline else ref,  # as a recipe entry's ref
        path=hub.snapshot_dir(repo_id, pinned.sha),
        hub_id=repo_id,
        revision=pinned.sha,
        license=pinned.license,
    )
