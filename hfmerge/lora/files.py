"""A local PEFT adapter folder: its config and the header of its safetensors weights.

Only `adapter_model.safetensors` is read; a folder with only `adapter_model.bin` is refused,
because unpickling a file can run arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmerge.lora.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from hfmerge.tensors import PICKLE_SUFFIXES, TensorInfo, read_shard_header

PICKLE_WEIGHTS = "adapter_model.bin"
NOT_AN_ADAPTER_FIX = (
    "name a PEFT LoRA adapter: a folder or Hub repo with adapter_config.json and "
    "adapter_model.safetensors (as `PeftModel.save_pretrained` writes)"
)
PICKLE_FIX = (
    "convert it once, in an environment you trust: load it with "
    "`PeftModel.from_pretrained(base, DIR)` and save it with "
    "`model.save_pretrained(OUT, safe_serialization=True)`; then use OUT"
)


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter's files say before any weight is read: its config JSON and its header."""

    config: Any  # the parsed adapter_config.json, checked by `parse_adapter_config`
    tensors: tuple[TensorInfo, ...]


def read_local_adapter(folder: Path, *, label: str) -> tuple[AdapterFiles | None, list[str]]:
    """The config and weights header of the adapter in `folder`, or None and its problems.

    Raises:
        ModelSourceError: the weights file is corrupt (its header cannot be parsed).
    """
    problems = []
    config_path = folder / ADAPTER_CONFIG
    config: Any = None
    if not config_path.is_file():
        problems.append(f"it has no {ADAPTER_CONFIG} ({folder})")
    else:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"its {ADAPTER_CONFIG} cannot be read ({exc})")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        problems.append(missing_weights(others))
    if problems:
        return None, problems
    return AdapterFiles(config, tuple(read_shard_header(weights, ADAPTER_WEIGHTS, label=label))), []


def missing_weights(pickles: list[str]) -> str:
    """The problem of an adapter without `adapter_model.safetensors`, given its pickle files."""
    if pickles:
        return (
            f"it has only pickle weights ({', '.join(pickles[:5])}), which hfmerge does not load "
            "because unpickling a file can run arbitrary code"
        )
    return f"it has no {ADAPTER_WEIGHTS}"
