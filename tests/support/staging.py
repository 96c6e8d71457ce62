"""What a run leaves beside its output: hidden `.NAME.hfmerge-*` staging folders."""

from __future__ import annotations

from pathlib import Path


def staging_leftovers(folder: Path) -> list[Path]:
    """Entries directly inside `folder` named like staging (`.NAME.hfmerge-tmp-*`, `-old-*`)."""
    return sorted(entry for entry in Path(folder).iterdir() if ".hfmerge-" in entry.name)
