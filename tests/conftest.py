"""Test isolation: no network, no real caches, deterministic torch.

Shared helpers live in the `tests.support` package; its fixtures load as plugins.
"""

from __future__ import annotations

import os

# Set before any test module imports huggingface_hub / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# fixtures: isolation, threads, working directory; fakehub: a Hub-compatible server on 127.0.0.1
pytest_plugins = ["tests.support.fixtures", "tests.support.fakehub"]
