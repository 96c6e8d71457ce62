"""Tokenizers of merged models: each model's vocabulary, and the output's tokenizer.

The output tokenizer is the base's (`base`), one model's (a model reference), or the union of
every model's vocabulary (`union`: the base's tokenizer, then each other model's tokens it lacks,
then every added token with its settings), as mergekit 0.1.5 builds them, so the token ids agree.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from hfmerge.lm.load import load_tokenizer, quiet_transformers


def model_vocab(tokenizer: PreTrainedTokenizerBase, rows: int | None) -> dict[str, int]:
    """The tokenizer's vocabulary (token -> id), limited to the `rows` its embedding has."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    return {token: i for token, i in vocab.items() if rows is None or i < rows}


def union_tokenizer(
    base: PreTrainedTokenizerBase,
    others: Sequence[tuple[PreTrainedTokenizerBase, int | None]],
) -> PreTrainedTokenizerBase:
    """The base's tokenizer extended with every token of `others` (tokenizer, embedding rows)
    that it lacks: plain tokens first (in model order), then added tokens with their flags."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}  # token -> its AddedToken (flags kept)
    for tokenizer, rows in [(base, None), *others]:
        decoder = tokenizer.added_tokens_decoder
        names = {info.content for info in decoder.values()}
        for token in model_vocab(tokenizer, rows):
            if token not in names:
                plain.setdefault(token, None)
        for index, info in decoder.items():
            if rows is None or index < rows:
                added.setdefault(info.content, info)
    result = copied(base)
    known = base.get_vocab()
    for token in plain:
        if token not in known and token not in added:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def copied(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A separate copy (adding tokens changes a tokenizer in place)."""
    with tempfile.TemporaryDirectory() as folder, quiet_transformers():
        tokenizer.save_pretrained(folder)
        return load_tokenizer(Path(folder), label="the base's tokenizer")


def with_tokens(
    tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]
) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` with each of `tokens` it lacks added (in order), or `tokenizer`
    itself when it has them all."""
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    if not missing:
        return tokenizer
    result = copied(tokenizer)
    for token in missing:
        result.add_tokens(token)
    return result
