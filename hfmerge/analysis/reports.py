"""Report files (`--json OUT.json`, `--plot OUT.png`): checked before the work that fills them,
then written atomically, so a failed write leaves no half file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hfmerge.errors import OutputError


def _finite(value: Any) -> Any:
    """NaN and ±inf become None: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def check_report_path(path: Path, what: str) -> Path:
    """Fail now, before the long work that fills it, if `what` cannot be written at `path`.

    `replace_atomically` writes a temp file beside `path` and renames it over `path`: so the
    folder must exist (it is not created) and be writable, and `path` must not be a directory.

    Raises:
        OutputError: naming the path, the problem and the fix.
    """
    path = Path(path)
    folder = path.absolute().parent
    if path.is_dir():
        raise OutputError(
            str(path),
            f"is a directory, so {what} cannot be written there",
            "name a file (one inside that folder, say), not the folder itself",
        )
    if not folder.is_dir():
        problem = "is a file" if folder.exists() else "does not exist"
        raise OutputError(
            str(path),
            f"cannot write {what}: its folder {folder} {problem}",
            "create the folder first, or name a file in an existing folder",
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            str(path),
            f"cannot write {what}: its folder {folder} is not writable",
            "name a file in a folder you can write to",
        )
    return path


def write_json(path: Path, document: Mapping[str, Any]) -> Path:
    """Write `document` as indented JSON to `path` (temp file, then rename).

    Raises:
        OutputError: the file cannot be written.
    """
    text = json.dumps(_finite(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return replace_atomically(
        Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), what="the JSON report"
    )


def replace_atomically(path: Path, write: Callable[[Path], object], *, what: str) -> Path:
    """Run `write` on a temp file beside `path`, then rename it: a failure leaves no half file.

    Raises:
        OutputError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C or a signal too: no temp file is left behind
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise OutputError(
            str(path),
            f"cannot write {what}: {exc.strerror}",
            "check that its directory exists and is writable",
        ) from None
    return path


__all__ = ["check_report_path", "replace_atomically", "write_json"]
