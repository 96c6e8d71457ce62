"""Hidden states of two models on the same probe windows, as per-layer samples, padding masked.

Models load under an accelerate device map; they run alternately batch by batch and nothing is kept.
"""

# Which states: `hidden_states` = embeddings output, then every block's output. transformers 5 ties
# the last entry to `last_hidden_state`, which is after the final norm and so not comparable with
# the others (per-token RMS scaling changes CKA); `tie_last_hidden_states=False` keeps the block's
# own output. Position 0 of a causal LM sees only itself (BOS, attention sink, massive activations):
# it is the same for every window and would dominate, so it is dropped.
#
# Pooling. `mean` (default): the masked mean per window is one sample. It compares per-input
# summaries, the view that routing and the merge gate care about; tokens of one window are not
# independent and both models see the same token ids, which lifts early layers under `tokens`. It
# also keeps the cost at the forward passes: the exact estimator's d×d cross sums cost n·d² per
# layer pair, which with every token a sample (~32k for 256 windows) outweighs the forward passes
# on a CPU. `tokens`: every kept token is one sample, so the debiased estimator's spread shrinks
# like 1/sqrt(n); unit matching (`--units`) needs those samples (n well above the width), so it
# defaults to `tokens`. Token pairing needs one tokenizer, which `cka` requires anyway.

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


def default_pooling(*, units: bool) -> Pooling:
    """`mean`, or `tokens` when unit correspondence is asked for (it needs many samples)."""
    return "tokens" if units else "mean"


def kept_positions(attention_mask: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """[b, t] bool: real tokens, minus position 0 for causal LMs."""
    keep = attention_mask.bool().clone()
    if causal:
        keep[:, 0] = False
    return keep


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
    model: PreTrainedModel, batch: Mapping[str, torch.Tensor], *, causal: bool, pooling: Pooling
) -> list[torch.Tensor]:
    """One [samples, d] tensor per hidden state (embeddings, then each block), float32, CPU."""
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
    keep = kept_positions(batch["attention_mask"], causal=causal)
    return [pool(h, keep, pooling=pooling).to(device="cpu", dtype=torch.float32) for h in states]


@dataclass(frozen=True)
class PairedStates:
    """One batch's per-layer samples from both models (row i of every tensor is one sample)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    tokens: int  # real tokens kept in this batch (before mean pooling)


def paired_states(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    causal: bool,
    pooling: Pooling = "tokens",
    progress: bool = False,
) -> Iterator[PairedStates]:
    """Run A, then B, on each batch and yield their states; the caller streams them away."""
    for batch in track(batches, description="probing both models", enabled=progress):
        kept = int(kept_positions(batch["attention_mask"], causal=causal).sum())
        yield PairedStates(
            layer_states(model_a, batch, causal=causal, pooling=pooling),
            layer_states(model_b, batch, causal=causal, pooling=pooling),
            kept,
        )


__all__ = [
    "POOLINGS",
    "PairedStates",
    "Pooling",
    "kept_positions",
    "layer_states",
    "paired_states",
    "pool",
]
