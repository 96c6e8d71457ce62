"""Mean token loss and perplexity of a causal or masked LM on token windows (token-weighted).

Masked LMs are scored on fixed masks: they depend only on the windows, the tokenizer and a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfmerge.errors import ModelSourceError
from hfmerge.lm.batches import model_inputs, pad, pad_id_of
from hfmerge.lm.load import Objective
from hfmerge.progress import track

MASK_FRACTION = 0.15
IGNORE = -100  # label value that cross_entropy skips (padding, unmasked MLM positions)


@dataclass(frozen=True)
class EvalResult:
    """Mean loss (nats per scored token), its perplexity, and what was scored."""

    loss: float
    perplexity: float
    tokens: int  # scored tokens: next-token targets (causal) or masked positions (masked)
    windows: int
    objective: Objective
    max_length: int | None = None  # window length used (after capping at the model's limit)
    data: str | None = None  # `builtin:prose` or the data file, where known

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (`loss`, `perplexity`, `tokens`, ...)."""
        return asdict(self)


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def objective_of(model: PreTrainedModel) -> Objective:
    """`masked` for `*ForMaskedLM` classes (BERT family), `causal` otherwise."""
    return "masked" if type(model).__name__.endswith("ForMaskedLM") else "causal"


@dataclass(frozen=True)
class Scored:
    """One window ready to score: model input ids and per-position labels (IGNORE: not scored)."""

    input_ids: torch.Tensor  # [t]
    labels: torch.Tensor  # [t], aligned with input_ids (causal shifting happens at scoring)


def causal_targets(windows: Sequence[torch.Tensor]) -> list[Scored]:
    """Every token is its own label; the model predicts each from the tokens before it."""
    return [Scored(w, w.clone()) for w in windows]


def mlm_masks(
    windows: Sequence[torch.Tensor], tokenizer: PreTrainedTokenizerBase, *, seed: int = 0
) -> list[Scored]:
    """Deterministic masks: in each window, round(15%) (at least 1) of its non-special tokens.

    Every chosen token becomes [MASK] (no 80/10/10 random or kept tokens: those add noise and, for
    kept tokens, free answers to an evaluation). One generator walks the windows in order, so the
    masks depend only on the windows, the special ids and `seed`, never on the model or batching.
    """
    mask_id = tokenizer.mask_token_id
    if not isinstance(mask_id, int):
        raise ModelSourceError(
            str(tokenizer.name_or_path),
            "its tokenizer has no mask token, which a masked-LM evaluation needs",
            "use the tokenizer the model was trained with",
        )
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    scored: list[Scored] = []
    for window in windows:
        candidates = torch.nonzero(~torch.isin(window, special)).flatten()  # [n] positions
        count = max(1, round(MASK_FRACTION * len(candidates))) if len(candidates) else 0
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        inputs, labels = window.clone(), torch.full_like(window, IGNORE)
        labels[chosen] = window[chosen]
        inputs[chosen] = mask_id
        scored.append(Scored(inputs, labels))
    return scored


def _batch_loss(
    model: PreTrainedModel, batch: Sequence[Scored], *, pad_id: int, causal: bool
) -> tuple[float, int]:
    """Summed cross-entropy (nats) and the number of scored tokens of one batch."""
    inputs = model_inputs([s.input_ids for s in batch], pad_id=pad_id)
    labels = pad([s.labels for s in batch], IGNORE)  # [b, t]; padding is never scored
    logits = model(**inputs).logits.float()  # [b, t, v]
    if causal:  # position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),  # [b, t, v] -> [b*t, v]
        labels.reshape(-1),  # [b, t] -> [b*t]
        ignore_index=IGNORE,
        reduction="sum",
    )
    return float(loss), int((labels != IGNORE).sum())


def score(
    model: PreTrainedModel,
    scored: Sequence[Scored],
    *,
    pad_id: int,
    objective: Objective,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalResult:
    """Token-weighted mean loss over prepared windows (see `causal_targets`, `mlm_masks`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches = [scored[i : i + batch_size] for i in range(0, len(scored), batch_size)]
    total, tokens = 0.0, 0
    model.train(False)  # eval mode (`eval` itself is untyped)
    with torch.no_grad():
        for batch in track(batches, description="evaluating", enabled=progress):
            loss, count = _batch_loss(model, batch, pad_id=pad_id, causal=objective == "causal")
            total, tokens = total + loss, tokens + count
    if tokens == 0:
        raise ValueError("the windows hold no token to score")
    mean = total / tokens
    return EvalResult(mean, perplexity(mean), tokens, len(scored), objective)


def prepare(
    windows: Sequence[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    *,
    objective: Objective,
    mlm_seed: int = 0,
) -> list[Scored]:
    """Inputs and labels for `objective`: next-token targets, or the fixed MLM masks."""
    if objective == "masked":
        return mlm_masks(windows, tokenizer, seed=mlm_seed)
    return causal_targets(windows)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: Sequence[torch.Tensor],
    *,
    batch_size: int = 8,
    mlm_seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Mean token loss of `model` on `windows` (from `textdata.token_windows`), token-weighted.

    Causal LMs are scored on every next token; masked LMs on `mlm_masks(windows, seed=mlm_seed)`.
    """
    objective = objective_of(model)
    scored = prepare(windows, tokenizer, objective=objective, mlm_seed=mlm_seed)
    return score(
        model,
        scored,
        pad_id=pad_id_of(tokenizer),
        objective=objective,
        batch_size=batch_size,
        progress=progress,
    )


__all__ = [
    "EvalResult",
    "Scored",
    "evaluate",
    "mlm_masks",
    "objective_of",
    "perplexity",
    "prepare",
    "score",
]
