"""Reading from the Hub: pin revisions, configs and safetensors headers (no weights), downloads."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    constants,
    get_session,
    hf_hub_download,
    hf_hub_url,
    hf_raise_for_status,
    snapshot_download,
)
from huggingface_hub import errors as hf_errors

# The documented import path; utils re-exports it lazily, which mypy cannot follow.
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from hfmerge.arch.config import CONFIG_FILE, read_config
from hfmerge.errors import HfMergeError, HubError, ModelSourceError
from hfmerge.hub.settings import (
    LIBRARY,
    HubSettings,
    check_repo_id,
    hub_api,
    remember_ref,
    settings,
    snapshot_dir,
)
from hfmerge.hub.translate import OFFLINE_FIX, translated
from hfmerge.tensors import (
    CONVERT_FIX,
    INDEX_FILE,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    CheckpointIndex,
    TensorInfo,
    check_weight_map,
    header_length,
    parse_shard_header,
    read_checkpoint_index,
    read_shard_header,
    read_weight_map,
)


@dataclass(frozen=True)
class PinnedRepo:
    """A Hub model repo pinned to one commit."""

    repo_id: str
    sha: str
    license: str | None  # from the repo card's metadata, when it declares one


def pin(repo_id: str, revision: str | None, *, offline: bool = False) -> PinnedRepo:
    """Resolve `revision` (branch, tag, sha; None for main) of a model repo to its commit sha.

    Offline, the sha comes from the cache (`refs/<branch>`, or the snapshot folder of a sha).
    """
    hub = settings(offline=offline)
    check_repo_id(repo_id)
    with translated(repo_id, revision, hub=hub, action="read"):
        if hub.offline:  # the snapshot folder of the cached commit is named by its sha
            return PinnedRepo(
                repo_id, Path(_snapshot(repo_id, revision, hub, patterns=[])).name, license=None
            )
        info = hub_api(hub).model_info(repo_id, revision=revision)
        remember_ref(repo_id, revision or "main", str(info.sha), hub)
    license = getattr(info.card_data, "license", None)
    return PinnedRepo(repo_id, str(info.sha), license=license if isinstance(license, str) else None)


def resolve_revision(repo_id: str, revision: str | None, *, offline: bool = False) -> str:
    """The commit sha that `revision` of `repo_id` points to now."""
    return pin(repo_id, revision, offline=offline).sha


def remote_config(repo_id: str, sha: str, *, offline: bool = False) -> dict[str, Any]:
    """The repo's config.json at `sha` (a few KB, through the cache; no weights)."""
    hub = settings(offline=offline)
    with translated(repo_id, sha, hub=hub, action="read"):
        path = _hf_file(repo_id, sha, CONFIG_FILE, hub)
    if path is None:
        raise ModelSourceError(
            repo_id,
            f"has no config.json at commit {sha}",
            "name a transformers model repo (saved with `save_pretrained`)",
        )
    return read_config(path.parent, label=repo_id)  # the file sits in the commit's snapshot


def remote_index(repo_id: str, sha: str, *, offline: bool = False) -> CheckpointIndex:
    """Every tensor of the repo's safetensors checkpoint at `sha`, from its headers alone.

    Headers come from the cache when the weights are there, else from HTTP range requests that
    stop at each header's end: not one byte of tensor data is downloaded. The index's directory
    is the snapshot folder that `download` fills.
    """
    hub = settings(offline=offline)
    folder = snapshot_dir(repo_id, sha, hub=hub)
    cached = _cached_index(folder, repo_id)
    if cached is not None:
        return cached
    if hub.offline:
        raise HubError(
            repo_id,
            "its safetensors weights are not in the local cache "
            f"({hub.cache_dir}) and offline mode is on",
            kind="offline",
            revision=sha,
            fix=OFFLINE_FIX,
        )
    with translated(repo_id, sha, hub=hub, action="read"):
        tensors = _remote_tensors(repo_id, sha, hub)
    if not tensors:
        raise ModelSourceError(
            repo_id, "its safetensors checkpoint holds no tensors", "name a model with weights"
        )
    return CheckpointIndex(folder, tensors, label=repo_id)


def remote_file(repo_id: str, sha: str, filename: str, *, offline: bool = False) -> Path | None:
    """One small file of the repo at `sha` (an adapter's config), through the cache; None when
    the commit has no such file."""
    hub = settings(offline=offline)
    with translated(repo_id, sha, hub=hub, action="read"):
        return _hf_file(repo_id, sha, filename, hub)


def remote_file_header(
    repo_id: str, sha: str, filename: str, *, offline: bool = False
) -> list[TensorInfo] | None:
    """The tensors in the header of one safetensors file of the repo at `sha` (an adapter's
    weights), from the cache or by range requests; None when the commit has no such file."""
    hub = settings(offline=offline)
    cached = snapshot_dir(repo_id, sha, hub=hub) / filename
    if cached.is_file():
        return read_shard_header(cached, filename, label=repo_id)
    if hub.offline:
        raise HubError(
            repo_id,
            f"its {filename} is not in the local cache ({hub.cache_dir}) and offline mode is on",
            kind="offline",
            revision=sha,
            fix=OFFLINE_FIX,
        )
    with translated(repo_id, sha, hub=hub, action="read"):
        return _remote_header(repo_id, sha, filename, hub)


def repo_files(repo_id: str, sha: str, *, offline: bool = False) -> list[str]:
    """The file names of the repo at `sha` (empty offline: the Hub cannot be asked)."""
    hub = settings(offline=offline)
    if hub.offline:
        return []
    with translated(repo_id, sha, hub=hub, action="read"):
        return list(hub_api(hub).list_repo_files(repo_id, revision=sha))


def download(
    repo_id: str,
    sha: str,
    *,
    allow_patterns: Sequence[str],
    offline: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Download the files of `repo_id` at `sha` matching `allow_patterns` into the HF cache.

    Returns the snapshot folder. Patterns that would fetch pickle checkpoints are refused
    unless `allow_pickle`: unpickling a file can run arbitrary code.
    """
    pickles = [p for p in allow_patterns if _matches_pickle(p)]
    if pickles and not allow_pickle:
        raise ModelSourceError(
            repo_id,
            f"downloading pickle checkpoints ({', '.join(pickles)}) "
            "is refused, because unpickling a file can run arbitrary code",
            CONVERT_FIX,
        )
    hub = settings(offline=offline)
    with translated(repo_id, sha, hub=hub, action="download"):
        return Path(_snapshot(repo_id, sha, hub, patterns=list(allow_patterns)))


def _snapshot(repo_id: str, revision: str | None, hub: HubSettings, *, patterns: list[str]) -> str:
    return str(
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=hub.cache_dir,
            endpoint=hub.endpoint,
            token=hub.token,
            local_files_only=hub.offline,
            library_name=LIBRARY,
        )
    )


def _hf_file(repo_id: str, sha: str, filename: str, hub: HubSettings) -> Path | None:
    """One small file of the repo through the cache; None when the commit has no such file."""
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=sha,
                cache_dir=hub.cache_dir,
                endpoint=hub.endpoint,
                token=hub.token,
                local_files_only=hub.offline,
                library_name=LIBRARY,
            )
        )
    except hf_errors.RemoteEntryNotFoundError:
        return None


def _cached_index(folder: Path, label: str) -> CheckpointIndex | None:
    if not ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()):
        return None
    try:
        return read_checkpoint_index(folder, label=label)
    except ModelSourceError:
        return None  # an index whose shards are not all cached yet: read them remotely


def _remote_tensors(repo_id: str, sha: str, hub: HubSettings) -> list[TensorInfo]:
    # One file wins over an index when a repo has both, as in transformers.
    single = _remote_header(repo_id, sha, SINGLE_FILE, hub)
    if single is not None:
        return single
    index_path = _hf_file(repo_id, sha, INDEX_FILE, hub)
    if index_path is None:
        raise _no_safetensors(repo_id, sha, hub)
    weight_map = read_weight_map(index_path, repo_id)
    tensors: list[TensorInfo] = []
    for shard in sorted(set(weight_map.values())):
        found = _remote_header(repo_id, sha, shard, hub)
        if found is None:
            raise ModelSourceError(
                repo_id,
                f"{INDEX_FILE} names shard {shard}, which the repo lacks at {sha}",
                "pin a revision with every shard",
            )
        tensors.extend(found)
    check_weight_map(weight_map, tensors, repo_id)
    return tensors


def _remote_header(
    repo_id: str, sha: str, filename: str, hub: HubSettings
) -> list[TensorInfo] | None:
    """A shard's header by two range requests (length field, then JSON); None if absent."""
    url = hf_hub_url(repo_id, filename, revision=sha, endpoint=hub.endpoint)
    headers = build_hf_headers(token=hub.token, library_name=LIBRARY)
    first = _range_get(url, headers, 0, 7)
    if first.status_code == 404 and first.headers.get("X-Error-Code") == "EntryNotFound":
        return None
    hf_raise_for_status(first)
    total = first.headers.get("Content-Range", "").rpartition("/")[2]
    size = int(total) if total.isdigit() else len(first.content)  # 200: Range was ignored
    length = header_length(first.content[:8], file_size=size, shard=filename, label=repo_id)
    if first.status_code == 206:
        second = _range_get(url, headers, 8, 8 + length - 1)
        hf_raise_for_status(second)
        raw = second.content[:length]
    else:
        raw = first.content[8 : 8 + length]
    return parse_shard_header(raw, file_size=size, shard=filename, label=repo_id)


def _range_get(url: str, headers: dict[str, str], first: int, last: int) -> httpx2.Response:
    return get_session().get(
        url,
        headers={**headers, "Range": f"bytes={first}-{last}"},
        timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
    )


def _no_safetensors(repo_id: str, sha: str, hub: HubSettings) -> HfMergeError:
    pickles = [
        f
        for f in hub_api(hub).list_repo_files(repo_id, revision=sha)
        if f.endswith(PICKLE_SUFFIXES)
    ]
    if pickles:
        return ModelSourceError(
            repo_id,
            f"has only pickle checkpoints ({', '.join(pickles[:5])})"
            f" at commit {sha}, which hfmerge does not download because "
            "unpickling a file can run arbitrary code",
            CONVERT_FIX,
        )
    return ModelSourceError(
        repo_id,
        f"has no {SINGLE_FILE} or {INDEX_FILE} at commit {sha}",
        "name a repo or revision with safetensors weights",
    )


def _matches_pickle(pattern: str) -> bool:
    probes = [
        f"{stem}{suffix}"
        for suffix in PICKLE_SUFFIXES
        for stem in ("model", "pytorch_model", "pytorch_model-00001-of-00002")
    ]
    return pattern.endswith(PICKLE_SUFFIXES) or any(fnmatch.fnmatch(p, pattern) for p in probes)
