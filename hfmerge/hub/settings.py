"""Where the Hub is and how to reach it: settings read from the environment at call time."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name

# The documented import path; utils re-exports it lazily, which mypy cannot follow.
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

from hfmerge.errors import HubError

LIBRARY = "hfmerge"
_SHA = re.compile(r"^[0-9a-f]{40}$")
# `scheme://user:password@`: credentials written into an address (up to its last `@`).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
# `?token=...`, `&api_key=...`, `#access_token=...`: a parameter whose name says it is a secret.
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;#][\w.-]*(?:token|key|secret|passw|pwd|auth|sig|credential)[\w.-]*)=[^&;#\s]*",
    re.IGNORECASE,
)
REDACTED = "***"


def redact_url(text: str) -> str:
    """`text` (a URL, or a message holding URLs) fit to show: no credentials in it.

    Credentials in an address (`https://user:secret@host`) are dropped, which leaves the address
    a reader can open; the values of secret-looking parameters (`token=`, `api_key=`, `sig=`, ...)
    become `***`. Every endpoint or URL that hfmerge shows (errors, hints, cards, the client's
    log lines) goes through it; requests still use the address as configured.
    """
    text = _USERINFO.sub(r"\g<scheme>", text)
    return _SECRET_PARAM.sub(rf"\g<name>={REDACTED}", text)


class _RedactedRecords(logging.Filter):
    """Rewrites each log record's message through `redact_url` before a handler prints it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact_url(message)
        if shown != message:
            record.msg, record.args = shown, None
        return True


_REDACTED_RECORDS = _RedactedRecords()


def redact_client_logs() -> None:
    """Make the client's own log lines (its retry warnings name the URL) go through `redact_url`.

    The filter sits on the handlers of the client's root logger, which every record of its
    modules passes before it reaches any handler further up (the application's root logger).
    """
    client_logger = logging.getLogger("huggingface_hub")
    for handler in client_logger.handlers:
        handler.addFilter(_REDACTED_RECORDS)  # a filter already there is not added twice


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is and how to talk to it, read from the environment at call time."""

    endpoint: str
    token: str | None
    cache_dir: Path
    offline: bool

    @property
    def shown_endpoint(self) -> str:
        """The endpoint as messages and cards show it, without credentials (`redact_url`)."""
        return redact_url(self.endpoint)


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
    return repo_cache(repo_id, hub or settings()) / "snapshots" / sha


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id before any request."""
    try:
        validate_repo_id(repo_id)
    except hf_errors.HFValidationError as exc:
        raise HubError(
            repo_id,
            f"is not a valid repo id ({exc})",
            kind="invalid",
            fix="write it as `org/name` (letters, digits, '-', '_', '.')",
        ) from None


def repo_cache(repo_id: str, hub: HubSettings) -> Path:
    """The folder of model repo `repo_id` in the HF cache (`models--org--name`)."""
    return hub.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def remember_ref(repo_id: str, revision: str, sha: str, hub: HubSettings) -> None:
    """Record branch -> sha in the cache as the client does, so offline runs resolve it.

    Downloads go by sha, and the client writes `refs/<branch>` only for downloads by branch.
    """
    ref = repo_cache(repo_id, hub) / "refs" / revision
    if not is_commit_sha(revision) and (not ref.is_file() or ref.read_text() != sha):
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)


def hub_api(hub: HubSettings) -> HfApi:
    """An `HfApi` client for `hub`'s endpoint and token that names hfmerge and its version."""
    try:
        release = version(LIBRARY)
    except PackageNotFoundError:  # a source tree that was never installed
        release = "unknown"
    return HfApi(
        endpoint=hub.endpoint, token=hub.token, library_name=LIBRARY, library_version=release
    )
