"""Token windows -> padded model inputs: the one place that batches text for a model.

Every caller pads with `pad_id_of(tokenizer)`: padded positions are masked, so the id only has to be
a valid token, and 0 stands in where the tokenizer has no pad token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from hfmerge.lm.load import load_tokenizer
from hfmerge.lm.textdata import load_texts, token_windows


def pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D rows to one [b, t_max] tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def model_inputs(rows: Sequence[torch.Tensor], *, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` ([b, t_max]) of right-padded windows."""
    return {
        "input_ids": pad(rows, pad_id),
        "attention_mask": pad([torch.ones_like(r) for r in rows], 0),
    }


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, or 0 where the tokenizer has none (padded positions are masked anyway)."""
    pad = tokenizer.pad_token_id
    return pad if isinstance(pad, int) else 0


def window_batches(
    windows: Sequence[torch.Tensor], *, pad_id: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """`windows` in order, `batch_size` at a time, as right-padded model inputs."""
    return [
        model_inputs(windows[i : i + batch_size], pad_id=pad_id)
        for i in range(0, len(windows), batch_size)
    ]


def probe_batches(
    windows: Sequence[torch.Tensor], tokenizer: PreTrainedTokenizerBase, *, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded `input_ids` and `attention_mask` batches of `windows`."""
    return window_batches(windows, pad_id=pad_id_of(tokenizer), batch_size=batch_size)


def text_batches(
    model_dir: Path,
    *,
    label: str,
    data: str | None,
    max_length: int,
    samples: int | None,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Probe text (`data`, as `load_texts` reads it) tokenized by the tokenizer in `model_dir`."""
    tokenizer = load_tokenizer(model_dir, label=label)
    windows = token_windows(tokenizer, load_texts(data), max_length=max_length, samples=samples)
    return probe_batches(windows, tokenizer, batch_size=batch_size)
