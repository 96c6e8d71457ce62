"""Hidden states of two models on the same probe windows, as per-layer samples, padding masked.

Models load under an accelerate device map; together they run alternately batch by batch and nothing
is kept, one at a time the caller keeps the first model's samples until the second runs.
"""

# Which states: `hidden_states` = embeddings output, then every block's output. transformers 5 ties
# the last entry to `last_hidden_state`, which is after the final norm and so not comparable with
# the others (per-token RMS scaling changes CKA); `tie_last_hidden_states=False` keeps the block's
# own output. Position 0 of a causal LM sees only itself (BOS, attention sink, massive activations):
# it is the same for every window and would dominate, so it is dropped.
#
# Pooling. `tokens` (default): each window gives at most `tokens_per_window` of its kept tokens
# (default 16), a seeded random subsample, as samples. Tokens tell a trained model from a random
# init of the same shape: on the real MiniLM against a random init (64 windows of held-out prose),
# token CKA reads 0.55 at most (the shared token ids still lift the embeddings and first blocks)
# and 0.17 on the last two blocks, where `mean` reads 0.97 falling to 0.22 (benchmarks/NOTES.md).
# A window's mean is close to its bag of token embeddings, which any two embeddings of the same
# tokens share. The subsample keeps the cost near the forward passes: the exact estimator's cost
# grows with the samples it sees (n·d² per layer pair streamed, n²·d per layer through Grams), and
# 16 tokens per window read within about 0.03 of every token. The picks depend only on the
# window's index and its kept positions, so batching does not change them. `tokens_per_window`
# None: every kept token is one sample; unit matching (`--units`) needs those samples (n well
# above the width), so it defaults to that. `mean`: the masked mean per window is one sample (a
# per-input summary). Token pairing needs one tokenizer, which `cka` requires anyway.

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from hfmerge.errors import ModelSourceError
from hfmerge.lm.load import input_device
from hfmerge.progress import track

Pooling = Literal["tokens", "mean"]
POOLINGS: tuple[Pooling, ...] = ("mean", "tokens")
DEFAULT_POOLING: Pooling = "tokens"
TOKENS_PER_WINDOW = 16  # the default subsample under `tokens` pooling; see the note above
SAMPLE_SEED = 0  # window w's tokens are picked by a generator seeded SAMPLE_SEED + w


def default_tokens_per_window(*, units: bool) -> int | None:
    """`TOKENS_PER_WINDOW`, or every token (None) when unit correspondence is asked for (it
    needs many samples)."""
    return None if units else TOKENS_PER_WINDOW


def kept_positions(attention_mask: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """[b, t] bool: real tokens, minus position 0 for causal LMs."""
    keep = attention_mask.bool().clone()
    if causal:
        keep[:, 0] = False
    return keep


def sample_positions(keep: torch.Tensor, per_window: int, *, first_window: int) -> torch.Tensor:
    """[b, t] bool: at most `per_window` of each row's kept positions, picked at random.

    Row r is window `first_window + r`; its picks come from a generator seeded with that index and
    depend only on its kept positions, so they are the same for any batching and padding.
    """
    sampled = torch.zeros_like(keep)
    for row, kept in enumerate(keep):
        positions = kept.nonzero().squeeze(1)  # [kept]
        if len(positions) > per_window:
            generator = torch.Generator().manual_seed(SAMPLE_SEED + first_window + row)
            positions = positions[torch.randperm(len(positions), generator=generator)[:per_window]]
        sampled[row, positions] = True
    return sampled


def pool(hidden: torch.Tensor, keep: torch.Tensor, *, pooling: Pooling) -> torch.Tensor:
    """[b, t, d] hidden states -> [samples, d]: kept tokens, or one masked mean per window."""
    keep = keep.to(hidden.device)
    if pooling == "tokens":
        return hidden[keep]  # [b, t, d] indexed by [b, t] mask -> [kept, d]
    counts = keep.sum(1)  # [b]
    sums = (hidden * keep.unsqueeze(-1)).sum(1)  # [b, t, d] * [b, t, 1] -> [b, d]
    rows = counts > 0  # a window with no kept token has no mean
    return sums[rows] / counts[rows].unsqueeze(-1).to(sums.dtype)  # [b', d] / [b', 1]


def layer_states(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor],
    *,
    causal: bool,
    pooling: Pooling,
    keep: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One [samples, d] tensor per hidden state (embeddings, then each block), float32, CPU.

    `keep` [b, t] picks the positions that enter (default: `kept_positions`)."""
    device = input_device(model)
    inputs = {key: value.to(device) for key, value in batch.items()}
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    states = out.hidden_states
    expected = getattr(model.config, "num_hidden_layers", None)
    if states is None or (isinstance(expected, int) and len(states) != expected + 1):
        raise ModelSourceError(
            str(model.config.name_or_path),
            f"returned {len(states or ())} hidden states for {expected} layers",
            "probe a model whose class returns the embeddings and every "
            "block output with output_hidden_states=True",
        )
    if keep is None:
        keep = kept_positions(batch["attention_mask"], causal=causal)
    return [pool(h, keep, pooling=pooling).to(device="cpu", dtype=torch.float32) for h in states]


@dataclass(frozen=True)
class PairedStates:
    """One batch's per-layer samples from both models (row i of every tensor is one sample)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    tokens: int  # real tokens kept in this batch (before mean pooling or the token subsample)


def batch_positions(
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    causal: bool,
    pooling: Pooling,
    tokens_per_window: int | None,
) -> Iterator[tuple[Mapping[str, torch.Tensor], torch.Tensor, int]]:
    """Each batch with the [b, t] positions that enter and its real tokens kept.

    Under `tokens` pooling, `tokens_per_window` keeps at most that many tokens of each window
    (`sample_positions`: the same for every model and every run); None keeps every one."""
    first_window = 0
    for batch in batches:
        keep = kept_positions(batch["attention_mask"], causal=causal)
        kept = int(keep.sum())
        if pooling == "tokens" and tokens_per_window is not None:
            keep = sample_positions(keep, tokens_per_window, first_window=first_window)
        first_window += keep.shape[0]
        yield batch, keep, kept


def model_states(
    model: PreTrainedModel,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    causal: bool,
    pooling: Pooling = "tokens",
    tokens_per_window: int | None = None,
    progress: bool = False,
    description: str = "probing",
) -> Iterator[tuple[list[torch.Tensor], int]]:
    """One model's states on each batch, with the batch's real tokens: what `paired_states`
    yields for one side, for models that run one at a time."""
    positions = batch_positions(
        batches, causal=causal, pooling=pooling, tokens_per_window=tokens_per_window
    )
    for batch, keep, kept in track(
        positions, description=description, enabled=progress, total=len(batches)
    ):
        yield layer_states(model, batch, causal=causal, pooling=pooling, keep=keep), kept


def paired_states(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    causal: bool,
    pooling: Pooling = "tokens",
    tokens_per_window: int | None = None,
    progress: bool = False,
) -> Iterator[PairedStates]:
    """Run A, then B, on each batch and yield their states; the caller streams them away."""
    positions = batch_positions(
        batches, causal=causal, pooling=pooling, tokens_per_window=tokens_per_window
    )
    for batch, keep, kept in track(
        positions, description="probing both models", enabled=progress, total=len(batches)
    ):
        yield PairedStates(
            layer_states(model_a, batch, causal=causal, pooling=pooling, keep=keep),
            layer_states(model_b, batch, causal=causal, pooling=pooling, keep=keep),
            kept,
        )


__all__ = [
    "DEFAULT_POOLING",
    "POOLINGS",
    "SAMPLE_SEED",
    "TOKENS_PER_WINDOW",
    "PairedStates",
    "Pooling",
    "batch_positions",
    "default_tokens_per_window",
    "kept_positions",
    "layer_states",
    "model_states",
    "paired_states",
    "pool",
    "sample_positions",
]
