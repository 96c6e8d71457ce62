"""JSON report files (`--json OUT.json`), written atomically: a failed write leaves no half file."""

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


__all__ = ["replace_atomically", "write_json"]
