"""Every huggingface_hub and transport error, turned into a HubError that names the repo and fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx2
from huggingface_hub import errors as hf_errors

from hfmerge.errors import HfMergeError, HubError
from hfmerge.hub.settings import HubSettings

TRANSIENT = frozenset({"network", "server"})  # error kinds worth retrying
OFFLINE_FIX = (
    "run the same command once online (without --offline and HF_HUB_OFFLINE) to fill the cache, "
    "or copy a filled cache into HF_HOME"
)


@contextlib.contextmanager
def translated(
    repo_id: str, revision: str | None, *, hub: HubSettings, action: str
) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into HubError naming the repo and the fix."""
    try:
        yield
    except HfMergeError:
        raise
    # HfHubHTTPError is an httpx2.HTTPError; OfflineModeIsEnabled is a ConnectionError.
    except (
        httpx2.HTTPError,
        hf_errors.LocalEntryNotFoundError,
        ConnectionError,
        TimeoutError,
        hf_errors.HFValidationError,
    ) as exc:
        raise translate(exc, repo_id, revision, hub=hub, action=action) from None
    except OSError as exc:  # the cache itself: disk full, permissions
        raise HubError(
            repo_id,
            f"cannot use the cache at {hub.cache_dir} ({exc})",
            kind="cache",
            revision=revision,
            fix="free disk space, fix permissions, or set HF_HOME elsewhere",
        ) from None


def translate(
    exc: Exception, repo_id: str, revision: str | None, *, hub: HubSettings, action: str
) -> HubError:
    """The HubError for one huggingface_hub or transport error met while trying to `action`
    (e.g. `download`, `push to`) `repo_id`: its kind (gated, not found, offline, 401, 403, server,
    network, ...), the problem in words and the fix."""

    def error(problem: str, kind: str, fix: str) -> HubError:
        return HubError(repo_id, problem, kind=kind, revision=revision, fix=fix)

    token_note = "no token is set" if not hub.token else "your token has no access to it"
    token_fix = f"set HF_TOKEN to a token from {hub.shown_endpoint}/settings/tokens"
    if isinstance(exc, hf_errors.GatedRepoError):  # before its base class, RepositoryNotFound
        return error(
            f"is gated and {token_note}",
            "gated",
            f"open {hub.shown_endpoint}/{repo_id}, "
            f"accept its conditions, and {token_fix} of the account granted access",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return error(
            f"does not exist on {hub.shown_endpoint}, or it is private and {token_note}",
            "not_found",
            f"check the repo id's spelling; for a private repo, {token_fix}",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return error(
            f"has no revision {revision!r}",
            "revision_not_found",
            f"name a branch, tag or commit sha of {hub.shown_endpoint}/{repo_id} that exists",
        )
    if hub.offline and isinstance(exc, (ConnectionError, hf_errors.LocalEntryNotFoundError)):
        return error(
            f"it is not in the local cache ({hub.cache_dir}) and offline mode is on",
            "offline",
            OFFLINE_FIX,
        )
    if isinstance(exc, hf_errors.HFValidationError):
        return error(
            f"is not a valid repo id or revision ({exc})",
            "invalid",
            "write the model as `org/name[@revision]`",
        )
    cause = exc.__cause__ if isinstance(exc, hf_errors.LocalEntryNotFoundError) else exc
    status = cause.response.status_code if isinstance(cause, hf_errors.HfHubHTTPError) else None
    if status == 401:
        return error(
            "the Hub rejected the token (401 Unauthorized)",
            "unauthorized",
            f"{token_fix} (or run `hf auth login`); check that it has not expired",
        )
    if status == 403:
        return error(
            f"your token may not {action} this repo (403 Forbidden)",
            "forbidden",
            f"use a token with {'write' if action == 'push to' else 'read'} access to "
            "it, or a repo in your own namespace",
        )
    if status is not None:
        return error(
            f"the Hub answered {status} when asked to {action} it",
            "server",
            "try again later; if it persists, check the Hub's status page",
        )
    retry = "try again" if action == "push to" else "run with --offline if the models are cached"
    return error(
        f"cannot reach {hub.shown_endpoint} to {action} it ({type(cause).__name__})",
        "network",
        f"check the network connection and HF_ENDPOINT, or {retry}",
    )
