"""JSON report files (`--json OUT.json`), written atomically: a failed write leaves no half file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(_finite(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(str(path), f"cannot write the JSON report: {exc.strerror}",
                          "check that its directory exists and is writable") from None
    return path


__all__ = ["write_json"]
