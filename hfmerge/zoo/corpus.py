"""Deterministic text that ships with every Python: stdlib source as code, `pydoc_data` as prose.

The zoo trains on the train split of both; the held-out split is the built-in probe data.
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import cache
from pathlib import Path
from typing import Literal

Domain = Literal["code", "prose", "mixed"]
DOMAINS: tuple[str, ...] = ("code", "prose")

CODE_CHAR_BUDGET = 1_000_000  # outlasts training, yet tokenizes in about a second
MAX_FILE_CHARS = 60_000  # skips the few giant modules so the selection spans many files
HELDOUT_FRACTION = 0.1
_BLOCK_CHARS = 8_000  # split granularity: held-out blocks interleave with train blocks
_PROBE_BLOCK_CHARS = 2_000  # "mixed" probe text alternates domains at this granularity
_DOC_SEPARATOR = "\n\n"


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _name_rank(name: str) -> str:
    # A hash of the file name scatters the pick over the alphabet, yet stays fixed across machines.
    return hashlib.sha256(name.encode()).hexdigest()


@cache
def code_files() -> tuple[Path, ...]:
    """The stdlib `.py` files that make up the code corpus, sorted by name."""
    candidates = sorted(_stdlib_dir().glob("*.py"))
    sized = [(p, p.stat().st_size) for p in candidates]
    picked: list[Path] = []
    total = 0
    for path, size in sorted(sized, key=lambda item: _name_rank(item[0].name)):
        if size > MAX_FILE_CHARS or total + size > CODE_CHAR_BUDGET:
            continue
        picked.append(path)
        total += size
    return tuple(sorted(picked, key=lambda p: p.name))


@cache
def code_text() -> str:
    """Python source: a fixed, sorted, size-capped selection of top-level stdlib modules."""
    docs = [p.read_text(encoding="utf-8", errors="replace").strip() for p in code_files()]
    return _DOC_SEPARATOR.join(docs) + "\n"


@cache
def prose_text() -> str:
    """English prose: every `pydoc_data.topics` entry, in sorted key order."""
    from pydoc_data.topics import topics

    docs = [str(topics[key]).strip() for key in sorted(topics)]
    return _DOC_SEPARATOR.join(docs) + "\n"


def _line_blocks(text: str, block_chars: int) -> list[str]:
    """Cut `text` into consecutive blocks of about `block_chars`, each ending at a newline."""
    blocks: list[str] = []
    start = 0
    while start < len(text):
        end = text.find("\n", start + block_chars)
        end = len(text) if end == -1 else end + 1
        blocks.append(text[start:end])
        start = end
    return blocks


def split(text: str, *, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """Split into (train, heldout): every k-th block of lines is held out (both span all topics)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    every = max(2, round(1.0 / heldout_fraction))
    blocks = _line_blocks(text, _BLOCK_CHARS)
    # Offset by every // 2 so the first held-out block is not the file's opening (licence headers).
    heldout = [b for i, b in enumerate(blocks) if i % every == every // 2]
    train = [b for i, b in enumerate(blocks) if i % every != every // 2]
    return "".join(train), "".join(heldout)


def domain_text(domain: str) -> str:
    """The full text of one domain, `code` or `prose`."""
    if domain == "code":
        return code_text()
    if domain == "prose":
        return prose_text()
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def train_text(domain: str) -> str:
    """The train split of one domain."""
    return split(domain_text(domain))[0]


def heldout_text(domain: str) -> str:
    """The held-out split of one domain: no zoo model trains on it."""
    return split(domain_text(domain))[1]


def builtin_probe_text(domain: Domain = "prose") -> str:
    """Held-out text for probing: `code`, `prose`, or `mixed` (the two alternating by block)."""
    if domain != "mixed":
        return heldout_text(domain)
    code_blocks = _line_blocks(heldout_text("code"), _PROBE_BLOCK_CHARS)
    prose_blocks = _line_blocks(heldout_text("prose"), _PROBE_BLOCK_CHARS)
    mixed: list[str] = []
    for i in range(max(len(code_blocks), len(prose_blocks))):
        mixed.extend(blocks[i] for blocks in (code_blocks, prose_blocks) if i < len(blocks))
    return "".join(mixed)


@cache
def corpus_hash() -> str:
    """SHA-256 of both domains' text: stdlib files differ between Python patch releases."""
    digest = hashlib.sha256()
    for domain in DOMAINS:
        data = domain_text(domain).encode("utf-8")
        digest.update(f"{domain}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()
