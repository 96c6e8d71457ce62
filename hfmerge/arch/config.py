"""The one reader of a model directory's config.json.

Every layer that needs a model's config (Hub reads, inspection, tokenizer checks, routing,
interpolation) reads it here, so a missing or broken file gives the same error everywhere;
`config_field` reads one field that composite configs may nest. `mark_untied` is the one writer
of the head's tie flag: a written model whose LM head was given values of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hfmerge.errors import ModelSourceError

CONFIG_FILE = "config.json"
_REPAIR_FIX = "repair or re-download config.json"


def read_config(directory: Path, *, label: str) -> dict[str, Any]:
    """The parsed config.json in `directory`.

    Raises:
        ModelSourceError: naming `label`, when the file is missing, unreadable, not JSON or not a
            JSON object.
    """
    path = directory / CONFIG_FILE
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelSourceError(
            label,
            f"has no {CONFIG_FILE} in {directory}",
            "point at a directory saved with `save_pretrained`",
        ) from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise ModelSourceError(
            label, f"{CONFIG_FILE} cannot be read ({exc})", _REPAIR_FIX
        ) from None
    if not isinstance(config, dict):
        raise ModelSourceError(label, f"{CONFIG_FILE} is not a JSON object", _REPAIR_FIX)
    return config


# Where multimodal and composite configs keep their language model's fields.
_NESTED_CONFIGS = ("text_config", "language_config", "llm_config", "decoder")


def config_field(config: Mapping[str, Any], key: str) -> Any:
    """A config.json field, else the same field of its nested text config (None when neither).

    Multimodal configs (Gemma 3, LLaVA, ...) keep the language model's fields, such as
    `tie_word_embeddings`, under `text_config` rather than at the top level.
    """
    if config.get(key) is not None:
        return config[key]
    for nested in _NESTED_CONFIGS:
        inner = config.get(nested)
        if isinstance(inner, dict) and inner.get(key) is not None:
            return inner[key]
    return None


def mark_untied(path: Path) -> None:
    """Mark the config.json at `path` untied (`tie_word_embeddings: false`, in its nested text
    config too): a written model's `lm_head.weight` holds values of its own (the orthogonal
    alignments fold the final norm's gain into the head, not into the embedding)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tie_word_embeddings"] = False
    for nested in _NESTED_CONFIGS:
        inner = config.get(nested)
        if isinstance(inner, dict) and (nested == "text_config" or "tie_word_embeddings" in inner):
            inner["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
