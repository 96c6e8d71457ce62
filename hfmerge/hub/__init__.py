"""All Hub I/O: pin revisions, read configs and safetensors headers remotely, download, push.

The only package that imports huggingface_hub; every client error is translated here into an
hfmerge error that names the repo and the fix (`translate`). `settings` reads the environment
(and `redact_url` is how an endpoint or URL is shown: never with its credentials),
`reads` pins and reads without downloading weights, `push` checks a target and uploads.
"""

from __future__ import annotations

import os

# Before the client is imported: telemetry off unless the user asks for it. A merge tool has no
# reason to report usage, and the client's agent detection would add a request to every run.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from huggingface_hub import constants

from hfmerge.hub.push import PUSH_ATTEMPTS, PUSH_BACKOFF_S, check_push, push_folder
from hfmerge.hub.reads import (
    PinnedRepo,
    download,
    pin,
    remote_config,
    remote_file,
    remote_file_header,
    remote_index,
    repo_files,
    resolve_revision,
)
from hfmerge.hub.settings import (
    LIBRARY,
    HubSettings,
    check_repo_id,
    is_commit_sha,
    redact_client_logs,
    redact_url,
    settings,
    snapshot_dir,
)

# The client read this constant at import time, which may have come before the line above.
constants.HF_HUB_DISABLE_TELEMETRY = (
    os.environ["HF_HUB_DISABLE_TELEMETRY"].upper() in constants.ENV_VARS_TRUE_VALUES
)
# The client's retry warnings print the URL they requested, credentials and all.
redact_client_logs()

__all__ = [
    "LIBRARY",
    "PUSH_ATTEMPTS",
    "PUSH_BACKOFF_S",
    "HubSettings",
    "PinnedRepo",
    "check_push",
    "check_repo_id",
    "download",
    "is_commit_sha",
    "pin",
    "push_folder",
    "redact_url",
    "remote_config",
    "remote_file",
    "remote_file_header",
    "remote_index",
    "repo_files",
    "resolve_revision",
    "settings",
    "snapshot_dir",
]
