"""Pushing to the Hub: check the target before long work, then upload one commit with retries."""

from __future__ import annotations

import time
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from hfmerge.errors import HubError
from hfmerge.hub.settings import HubSettings, check_repo_id, hub_api, redact_url, settings
from hfmerge.hub.translate import TRANSIENT, translated
from hfmerge.progress import say
from hfmerge.tensors import INDEX_FILE

PUSH_ATTEMPTS = 4  # one try and three retries
PUSH_BACKOFF_S = 2.0  # first retry delay; doubles each time


def check_push(repo_id: str, *, offline: bool = False) -> str:
    """Fail fast, before any long work, if `repo_id` cannot be pushed to; the full repo id.

    A repo id without a namespace gets the token owner's name.
    """
    hub = settings(offline=offline)
    if hub.offline:
        raise HubError(
            repo_id,
            "cannot be pushed to in offline mode",
            kind="offline",
            fix="drop --offline and HF_HUB_OFFLINE, or push later with `hfmerge push DIR REPO_ID`",
        )
    if not hub.token:
        raise HubError(
            repo_id,
            "pushing needs a Hub token, and none is set",
            kind="unauthorized",
            fix=f"set HF_TOKEN to a write token from {hub.shown_endpoint}/settings/tokens "
            "(or run `hf auth login`)",
        )
    with translated(repo_id, None, hub=hub, action="push to"):
        me = hub_api(hub).whoami()
    user = str(me.get("name", ""))
    orgs = {str(org.get("name")) for org in me.get("orgs", []) if isinstance(org, dict)}
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    check_repo_id(full_id)
    namespace = full_id.split("/")[0]
    if namespace != user and namespace not in orgs:
        raise HubError(
            full_id,
            f"your token belongs to {user!r}, who cannot write to {namespace!r}",
            kind="forbidden",
            fix=f"push to `{user}/...` or to an organisation you belong to",
        )
    return full_id


def push_folder(folder: Path, repo_id: str, *, private: bool, commit_message: str) -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; the repo's URL.

    Network and server errors are retried with exponential backoff. The token travels in
    request headers only: it is never printed, logged or written; nor are credentials in
    `HF_ENDPOINT` (the URL returned is `redact_url`'s).
    """
    hub = settings()
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            with translated(repo_id, None, hub=hub, action="push to"):
                return _push_once(
                    Path(folder), repo_id, hub, private=private, message=commit_message
                )
        except HubError as exc:
            if exc.kind not in TRANSIENT or attempt == PUSH_ATTEMPTS:
                raise
            delay = PUSH_BACKOFF_S * 2 ** (attempt - 1)
            say(
                f"push to {repo_id} failed ({exc.problem}); retrying in "
                f"{delay:g} s (attempt {attempt + 1} of {PUSH_ATTEMPTS})"
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _push_once(folder: Path, repo_id: str, hub: HubSettings, *, private: bool, message: str) -> str:
    api = hub_api(hub)
    # private=None leaves an existing repo as it is; a new one is public unless --private.
    url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    if private and not api.model_info(repo_id).private:
        raise HubError(
            repo_id,
            "exists and is public, so --private cannot keep this upload private",
            kind="forbidden",
            fix="make the repo private in its settings, or push to a new repo",
        )
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    local = [name for name in local if not any(part.startswith(".") for part in name.split("/"))]
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local
    ]
    # Weights of an earlier push that this one does not overwrite would be stale shards.
    operations += [
        CommitOperationDelete(path_in_repo=name)
        for name in api.list_repo_files(repo_id)
        if name not in local and name.endswith((".safetensors", INDEX_FILE))
    ]
    api.create_commit(repo_id, operations=operations, commit_message=message)  # ONE commit
    return redact_url(str(url))
