"""Helpers shared by the tests: tiny models, a Hub-compatible server, fixtures."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: hfmerge/, recipes/, tests/
