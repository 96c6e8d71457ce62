"""Probe and evaluation text (built-in probe, UTF-8 text or JSONL files) packed into token windows.

A plain text file is one document (blank lines in code and prose are content, not boundaries).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast, get_args

import torch
from transformers import PreTrainedTokenizerBase

from hfmerge.errors import InputDataError
from hfmerge.zoo.corpus import DOMAINS, Domain, builtin_probe_text, train_text

BUILTIN = "builtin"
BUILTIN_DOMAINS: tuple[str, ...] = get_args(Domain)  # ("code", "prose", "mixed"): held out
# The zoo's training split of a domain: calibration text for routing, kept apart from the held-out
# text that evaluation uses.
TRAIN_SUFFIX = "-train"
BUILTIN_TRAIN: tuple[str, ...] = tuple(d + TRAIN_SUFFIX for d in DOMAINS)
DEFAULT_DOMAIN = "prose"
_DATA_FIX = "give a UTF-8 text file, a .jsonl file with a `text` field per line, or `builtin`"
_AFFIX_PROBE = "hello world"  # any ordinary text: only the specials wrapped around it matter


def describe_data(data: str | None) -> str:
    """The canonical name of `data` for reports: `builtin:prose`, `builtin:code`, or the path."""
    if data is None or data == BUILTIN:
        return f"{BUILTIN}:{DEFAULT_DOMAIN}"
    return data


def load_texts(data: str | None) -> list[str]:
    """The documents in `data`.

    `None` or `builtin` is the built-in English probe (held-out pydoc prose, which no zoo model
    trained on); `builtin:code|prose|mixed` picks a held-out domain, and `builtin:code-train` or
    `builtin:prose-train` the zoo's training text of a domain (calibration for routing). A
    `.jsonl` path gives each line's `text` (one document per line, blank lines skipped); any other
    path is one UTF-8 document.

    Raises:
        InputDataError: a missing or unreadable file, a bad JSON line, or no text at all.
    """
    name = describe_data(data)
    if name.startswith(BUILTIN + ":"):
        return [_builtin_text(name)]
    path = Path(name).expanduser()
    text = _read_file(path, name)
    texts = _jsonl_texts(text, name) if path.suffix.lower() == ".jsonl" else [text]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputDataError(name, "holds no text", _DATA_FIX)
    return texts


def _builtin_text(name: str) -> str:
    domain = name.split(":", 1)[1]
    if domain in BUILTIN_TRAIN:
        return train_text(domain.removesuffix(TRAIN_SUFFIX))
    if domain not in BUILTIN_DOMAINS:
        choices = ", ".join(f"{BUILTIN}:{d}" for d in (*BUILTIN_DOMAINS, *BUILTIN_TRAIN))
        raise InputDataError(
            name,
            f"is not a built-in text; those are {BUILTIN}, {choices}",
            f"use one of them, or {_DATA_FIX}",
        )
    return builtin_probe_text(cast(Domain, domain))


def _read_file(path: Path, name: str) -> str:
    if not path.exists():
        # relative paths are read from the current directory, as model paths are: show where
        raise InputDataError(
            name, f"no such file ({path.absolute()})", "check the path; " + _DATA_FIX
        )
    if not path.is_file():
        raise InputDataError(name, "is not a file", _DATA_FIX)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            name,
            f"is not UTF-8 text ({exc.reason} at byte {exc.start})",
            "convert it to UTF-8, e.g. `iconv -t UTF-8 FILE > OUT`",
        ) from None
    except OSError as exc:
        raise InputDataError(
            name, f"cannot be read: {exc.strerror}", "check its permissions"
        ) from None


def _jsonl_texts(content: str, name: str) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            texts.append(_jsonl_text(line, number, name))
    return texts


def _jsonl_text(line: str, number: int, name: str) -> str:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputDataError(
            name,
            f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})",
            'write one JSON object per line: {"text": "..."}',
        ) from None
    if not isinstance(record, dict) or "text" not in record:
        raise InputDataError(
            name,
            f"line {number} has no `text` field",
            'give every line a string field `text`: {"text": "..."}',
        )
    text = record["text"]
    if not isinstance(text, str):
        raise InputDataError(
            name,
            f"line {number}: `text` is a {type(text).__name__}, not a string",
            'give every line a string field `text`: {"text": "..."}',
        )
    return text


def encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` without special tokens (no max-length warning for long texts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    # A tokenizer.json may carry its own padding and truncation (all-MiniLM-L6-v2 pads and
    # truncates to 128): off for this call, so a long document is tiled rather than cut.
    padding, truncation = backend.padding, backend.truncation
    backend.no_padding()
    backend.no_truncation()
    try:
        return list(backend.encode(text, add_special_tokens=False).ids)
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (`[BOS]`; `[CLS]`, `[SEP]`)."""
    plain = encode_plain(tokenizer, _AFFIX_PROBE)
    full = list(tokenizer.encode(_AFFIX_PROBE, add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("the tokenizer's special-token template changes the text's own tokens")


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    samples: int | None,
) -> list[torch.Tensor]:
    """Token-id windows of at most `max_length`, each wrapped in the tokenizer's special tokens.

    Each document is tiled into consecutive chunks (its last chunk may be shorter); windows never
    span two documents. With `samples`, that many windows are kept, evenly spread over the list.
    Deterministic: the same texts and tokenizer always give the same windows.
    """
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    prefix, suffix = special_affixes(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room beside the "
            f"{len(prefix) + len(suffix)} special tokens"
        )
    windows: list[torch.Tensor] = []
    for text in texts:
        ids = encode_plain(tokenizer, text)
        for start in range(0, len(ids), body):
            row = prefix + ids[start : start + body] + suffix
            if len(row) >= 2:  # a single token has nothing to predict
                windows.append(torch.tensor(row, dtype=torch.long))
    return _spread(windows, samples)


def _spread(windows: list[torch.Tensor], samples: int | None) -> list[torch.Tensor]:
    """`samples` windows evenly spaced over the list (first and last included), or all of them."""
    if samples is None or len(windows) <= samples:
        return windows
    # With samples <= n the step is >= 1, so rounding keeps the picks distinct and increasing.
    picks = torch.linspace(0, len(windows) - 1, samples).round().long().tolist()
    return [windows[i] for i in picks]


__all__ = [
    "BUILTIN",
    "BUILTIN_DOMAINS",
    "describe_data",
    "encode_plain",
    "load_texts",
    "special_affixes",
    "token_windows",
]
