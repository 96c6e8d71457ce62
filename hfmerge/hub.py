"""All Hub I/O: pin revisions, read configs and safetensors headers remotely, download, push.

The only module that imports huggingface_hub; every client error is translated here into an
hfmerge error that names the repo and the fix.
"""

from __future__ import annotations

import os

# Before the client is imported: telemetry off unless the user asks for it. A merge tool has no
# reason to report usage, and the client's agent detection would add a request to every run.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import contextlib
import fnmatch
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_session,
    get_token,
    hf_hub_download,
    hf_hub_url,
    hf_raise_for_status,
    snapshot_download,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name

# The documented import path; utils re-exports these lazily, which mypy cannot follow.
from huggingface_hub.utils import build_hf_headers, validate_repo_id  # type: ignore[attr-defined]

from hfmerge.errors import HfMergeError, HubError, ModelSourceError
from hfmerge.progress import stderr_console
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
    read_weight_map,
)

# The client read this constant at import time, which may have come before the line above.
constants.HF_HUB_DISABLE_TELEMETRY = (
    os.environ["HF_HUB_DISABLE_TELEMETRY"].upper() in constants.ENV_VARS_TRUE_VALUES
)

LIBRARY = "hfmerge"
PUSH_ATTEMPTS = 4  # one try and three retries
PUSH_BACKOFF_S = 2.0  # first retry delay; doubles each time
_SHA = re.compile(r"^[0-9a-f]{40}$")
_TRANSIENT = frozenset({"network", "server"})
_OFFLINE_FIX = (
    "run the same command once online (without --offline and HF_HUB_OFFLINE) to fill the cache, "
    "or copy a filled cache into HF_HOME"
)


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is and how to talk to it, read from the environment at call time."""

    endpoint: str
    token: str | None
    cache_dir: Path
    offline: bool


@dataclass(frozen=True)
class PinnedRepo:
    """A Hub model repo pinned to one commit."""

    repo_id: str
    sha: str
    license: str | None  # from the repo card's metadata, when it declares one


def settings(*, offline: bool = False) -> HubSettings:
    """`HF_ENDPOINT`, `HF_TOKEN` (or the saved token), `HF_HUB_CACHE`/`HF_HOME`, offline mode.

    `offline` (the `--offline` flag) adds to `HF_HUB_OFFLINE`; it never turns it off.
    """
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        cache = Path(env["HF_HUB_CACHE"])
    else:
        cache = Path(env["HF_HOME"]) / "hub" if env.get("HF_HOME") else Path(constants.HF_HUB_CACHE)
    env_offline = env.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return HubSettings(
        endpoint=(env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        token=env.get("HF_TOKEN") or get_token(),
        cache_dir=cache.expanduser(),
        offline=offline or env_offline or constants.HF_HUB_OFFLINE,
    )


def is_commit_sha(revision: str | None) -> bool:
    """Whether `revision` is a full 40-hex commit sha (a pin that cannot move)."""
    return bool(revision and _SHA.match(revision))


def snapshot_dir(repo_id: str, sha: str, *, hub: HubSettings | None = None) -> Path:
    """Where the cache keeps the files of `repo_id` at `sha` (it may not exist yet)."""
    return _repo_cache(repo_id, hub or settings()) / "snapshots" / sha


def pin(repo_id: str, revision: str | None, *, offline: bool = False) -> PinnedRepo:
    """Resolve `revision` (branch, tag, sha; None for main) of a model repo to its commit sha.

    Offline, the sha comes from the cache (`refs/<branch>`, or the snapshot folder of a sha).
    """
    hub = settings(offline=offline)
    check_repo_id(repo_id)
    with _translated(repo_id, revision, hub=hub, action="read"):
        if hub.offline:  # the snapshot folder of the cached commit is named by its sha
            return PinnedRepo(repo_id, Path(_snapshot(repo_id, revision, hub, patterns=[])).name,
                              license=None)
        info = _api(hub).model_info(repo_id, revision=revision)
        _remember_ref(repo_id, revision or "main", str(info.sha), hub)
    license = getattr(info.card_data, "license", None)
    return PinnedRepo(repo_id, str(info.sha), license=license if isinstance(license, str) else None)


def resolve_revision(repo_id: str, revision: str | None, *, offline: bool = False) -> str:
    """The commit sha that `revision` of `repo_id` points to now."""
    return pin(repo_id, revision, offline=offline).sha


def remote_config(repo_id: str, sha: str, *, offline: bool = False) -> dict[str, Any]:
    """The repo's config.json at `sha` (a few KB, through the cache; no weights)."""
    hub = settings(offline=offline)
    with _translated(repo_id, sha, hub=hub, action="read"):
        path = _hf_file(repo_id, sha, "config.json", hub)
    if path is None:
        raise ModelSourceError(repo_id, f"has no config.json at commit {sha}",
                               "name a transformers model repo (saved with `save_pretrained`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise ModelSourceError(repo_id, f"its config.json cannot be read ({exc})",
                               "fix config.json in the repo") from None
    return config


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
        raise HubError(repo_id, "its safetensors weights are not in the local cache "
                       f"({hub.cache_dir}) and offline mode is on", kind="offline",
                       revision=sha, fix=_OFFLINE_FIX)
    with _translated(repo_id, sha, hub=hub, action="read"):
        tensors = _remote_tensors(repo_id, sha, hub)
    if not tensors:
        raise ModelSourceError(repo_id, "its safetensors checkpoint holds no tensors",
                               "name a model with weights")
    return CheckpointIndex(folder, tensors, label=repo_id)


def download(repo_id: str, sha: str, *, allow_patterns: Sequence[str], offline: bool = False,
             allow_pickle: bool = False) -> Path:
    """Download the files of `repo_id` at `sha` matching `allow_patterns` into the HF cache.

    Returns the snapshot folder. Patterns that would fetch pickle checkpoints are refused
    unless `allow_pickle`: unpickling a file can run arbitrary code.
    """
    pickles = [p for p in allow_patterns if _matches_pickle(p)]
    if pickles and not allow_pickle:
        raise ModelSourceError(repo_id, f"downloading pickle checkpoints ({', '.join(pickles)}) "
                               "is refused, because unpickling a file can run arbitrary code",
                               CONVERT_FIX)
    hub = settings(offline=offline)
    with _translated(repo_id, sha, hub=hub, action="download"):
        return Path(_snapshot(repo_id, sha, hub, patterns=list(allow_patterns)))


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id before any request."""
    try:
        validate_repo_id(repo_id)
    except hf_errors.HFValidationError as exc:
        raise HubError(repo_id, f"is not a valid repo id ({exc})", kind="invalid",
                       fix="write it as `org/name` (letters, digits, '-', '_', '.')") from None


def check_push(repo_id: str, *, offline: bool = False) -> str:
    """Fail fast, before any long work, if `repo_id` cannot be pushed to; the full repo id.

    A repo id without a namespace gets the token owner's name.
    """
    hub = settings(offline=offline)
    if hub.offline:
        raise HubError(repo_id, "cannot be pushed to in offline mode", kind="offline",
                       fix="drop --offline and HF_HUB_OFFLINE, or push later with "
                       "`hfmerge push DIR REPO_ID`")
    if not hub.token:
        raise HubError(repo_id, "pushing needs a Hub token, and none is set", kind="unauthorized",
                       fix=f"set HF_TOKEN to a write token from {hub.endpoint}/settings/tokens "
                       "(or run `hf auth login`)")
    with _translated(repo_id, None, hub=hub, action="push to"):
        me = _api(hub).whoami()
    user = str(me.get("name", ""))
    orgs = {str(org.get("name")) for org in me.get("orgs", []) if isinstance(org, dict)}
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    check_repo_id(full_id)
    namespace = full_id.split("/")[0]
    if namespace != user and namespace not in orgs:
        raise HubError(full_id, f"your token belongs to {user!r}, who cannot write to "
                       f"{namespace!r}", kind="forbidden",
                       fix=f"push to `{user}/...` or to an organisation you belong to")
    return full_id


def push_folder(folder: Path, repo_id: str, *, private: bool, commit_message: str) -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; the repo's URL.

    Network and server errors are retried with exponential backoff. The token travels in
    request headers only: it is never printed, logged or written.
    """
    hub = settings()
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            with _translated(repo_id, None, hub=hub, action="push to"):
                return _push_once(Path(folder), repo_id, hub, private=private,
                                  message=commit_message)
        except HubError as exc:
            if exc.kind not in _TRANSIENT or attempt == PUSH_ATTEMPTS:
                raise
            delay = PUSH_BACKOFF_S * 2 ** (attempt - 1)
            stderr_console.print(f"push to {repo_id} failed ({exc.problem}); retrying in "
                                 f"{delay:g} s (attempt {attempt + 1} of {PUSH_ATTEMPTS})",
                                 highlight=False, soft_wrap=True)
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _push_once(folder: Path, repo_id: str, hub: HubSettings, *, private: bool,
               message: str) -> str:
    api = _api(hub)
    # private=None leaves an existing repo as it is; a new one is public unless --private.
    url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    if private and not api.model_info(repo_id).private:
        raise HubError(repo_id, "exists and is public, so --private cannot keep this upload "
                       "private", kind="forbidden",
                       fix="make the repo private in its settings, or push to a new repo")
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    local = [name for name in local if not any(part.startswith(".") for part in name.split("/"))]
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local
    ]
    # Weights of an earlier push that this one does not overwrite would be stale shards.
    operations += [CommitOperationDelete(path_in_repo=name) for name in api.list_repo_files(repo_id)
                   if name not in local and name.endswith((".safetensors", INDEX_FILE))]
    api.create_commit(repo_id, operations=operations, commit_message=message)  # ONE commit
    return str(url)


def _repo_cache(repo_id: str, hub: HubSettings) -> Path:
    return hub.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def _remember_ref(repo_id: str, revision: str, sha: str, hub: HubSettings) -> None:
    """Record branch -> sha in the cache as the client does, so offline runs resolve it.

    Downloads go by sha, and the client writes `refs/<branch>` only for downloads by branch.
    """
    ref = _repo_cache(repo_id, hub) / "refs" / revision
    if not is_commit_sha(revision) and (not ref.is_file() or ref.read_text() != sha):
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)


def _api(hub: HubSettings) -> HfApi:
    try:
        release = version(LIBRARY)
    except PackageNotFoundError:  # a source tree that was never installed
        release = "unknown"
    return HfApi(endpoint=hub.endpoint, token=hub.token, library_name=LIBRARY,
                 library_version=release)


def _snapshot(repo_id: str, revision: str | None, hub: HubSettings, *,
              patterns: list[str]) -> str:
    return str(snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns, cache_dir=hub.cache_dir,
        endpoint=hub.endpoint, token=hub.token, local_files_only=hub.offline,
        library_name=LIBRARY,
    ))


def _hf_file(repo_id: str, sha: str, filename: str, hub: HubSettings) -> Path | None:
    """One small file of the repo through the cache; None when the commit has no such file."""
    try:
        return Path(hf_hub_download(
            repo_id, filename, revision=sha, cache_dir=hub.cache_dir, endpoint=hub.endpoint,
            token=hub.token, local_files_only=hub.offline, library_name=LIBRARY,
        ))
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
            raise ModelSourceError(repo_id, f"{INDEX_FILE} names shard {shard}, which the "
                                   f"repo lacks at {sha}", "pin a revision with every shard")
        tensors.extend(found)
    check_weight_map(weight_map, tensors, repo_id)
    return tensors


def _remote_header(repo_id: str, sha: str, filename: str,
                   hub: HubSettings) -> list[TensorInfo] | None:
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
    return get_session().get(url, headers={**headers, "Range": f"bytes={first}-{last}"},
                             timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _no_safetensors(repo_id: str, sha: str, hub: HubSettings) -> HfMergeError:
    pickles = [f for f in _api(hub).list_repo_files(repo_id, revision=sha)
               if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return ModelSourceError(repo_id, f"has only pickle checkpoints ({', '.join(pickles[:5])})"
                                f" at commit {sha}, which hfmerge does not download because "
                                "unpickling a file can run arbitrary code", CONVERT_FIX)
    return ModelSourceError(repo_id, f"has no {SINGLE_FILE} or {INDEX_FILE} at commit "
                            f"{sha}", "name a repo or revision with safetensors weights")


def _matches_pickle(pattern: str) -> bool:
    probes = [f"{stem}{suffix}" for suffix in PICKLE_SUFFIXES
              for stem in ("model", "pytorch_model", "pytorch_model-00001-of-00002")]
    return pattern.endswith(PICKLE_SUFFIXES) or any(fnmatch.fnmatch(p, pattern) for p in probes)


@contextlib.contextmanager
def _translated(repo_id: str, revision: str | None, *, hub: HubSettings,
                action: str) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into HubError naming the repo and the fix."""
    try:
        yield
    except HfMergeError:
        raise
    # HfHubHTTPError is an httpx2.HTTPError; OfflineModeIsEnabled is a ConnectionError.
    except (httpx2.HTTPError, hf_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError,
            hf_errors.HFValidationError) as exc:
        raise _translate(exc, repo_id, revision, hub=hub, action=action) from None
    except OSError as exc:  # the cache itself: disk full, permissions
        raise HubError(repo_id, f"cannot use the cache at {hub.cache_dir} ({exc})", kind="cache",
                       revision=revision, fix="free disk space, fix permissions, or set HF_HOME "
                       "elsewhere") from None


def _translate(exc: Exception, repo_id: str, revision: str | None, *, hub: HubSettings,
               action: str) -> HubError:
    def error(problem: str, kind: str, fix: str) -> HubError:
        return HubError(repo_id, problem, kind=kind, revision=revision, fix=fix)

    token_note = "no token is set" if not hub.token else "your token has no access to it"
    token_fix = f"set HF_TOKEN to a token from {hub.endpoint}/settings/tokens"
    if isinstance(exc, hf_errors.GatedRepoError):  # before its base class, RepositoryNotFound
        return error(f"is gated and {token_note}", "gated", f"open {hub.endpoint}/{repo_id}, "
                     f"accept its conditions, and {token_fix} of the account granted access")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return error(f"does not exist on {hub.endpoint}, or it is private and {token_note}",
                     "not_found", f"check the repo id's spelling; for a private repo, {token_fix}")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return error(f"has no revision {revision!r}", "revision_not_found",
                     f"name a branch, tag or commit sha of {hub.endpoint}/{repo_id} that exists")
    if hub.offline and isinstance(exc, (ConnectionError, hf_errors.LocalEntryNotFoundError)):
        return error(f"it is not in the local cache ({hub.cache_dir}) and offline mode is on",
                     "offline", _OFFLINE_FIX)
    if isinstance(exc, hf_errors.HFValidationError):
        return error(f"is not a valid repo id or revision ({exc})", "invalid",
                     "write the model as `org/name[@revision]`")
    cause = exc.__cause__ if isinstance(exc, hf_errors.LocalEntryNotFoundError) else exc
    status = cause.response.status_code if isinstance(cause, hf_errors.HfHubHTTPError) else None
    if status == 401:
        return error("the Hub rejected the token (401 Unauthorized)", "unauthorized",
                     f"{token_fix} (or run `hf auth login`); check that it has not expired")
    if status == 403:
        return error(f"your token may not {action} this repo (403 Forbidden)", "forbidden",
                     f"use a token with {'write' if action == 'push to' else 'read'} access to "
                     "it, or a repo in your own namespace")
    if status is not None:
        return error(f"the Hub answered {status} when asked to {action} it", "server",
                     "try again later; if it persists, check the Hub's status page")
    retry = "try again" if action == "push to" else "run with --offline if the models are cached"
    return error(f"cannot reach {hub.endpoint} to {action} it ({type(cause).__name__})",
                 "network", f"check the network connection and HF_ENDPOINT, or {retry}")
