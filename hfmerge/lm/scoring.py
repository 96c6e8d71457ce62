"""Mean token loss and perplexity of a causal or masked LM on token windows (token-weighted).

Masked LMs are scored on fixed masks: they depend only on the windows, the tokenizer and a seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfmerge.errors import ModelSourceError
from hfmerge.progress import track

Objective = Literal["causal", "masked"]
MASK_FRACTION = 0.15
IGNORE = -100  # label value that cross_entropy skips (padding, unmasked MLM positions)
# Any one of these files means the directory carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                   "vocab.json", "spiece.model")


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


def mlm_masks(windows: Sequence[torch.Tensor], tokenizer: PreTrainedTokenizerBase, *,
              seed: int = 0) -> list[Scored]:
    """Deterministic masks: in each window, round(15%) (at least 1) of its non-special tokens.

    Every chosen token becomes [MASK] (no 80/10/10 random or kept tokens: those add noise and, for
    kept tokens, free answers to an evaluation). One generator walks the windows in order, so the
    masks depend only on the windows, the special ids and `seed`, never on the model or batching.
    """
    mask_id = tokenizer.mask_token_id
    if not isinstance(mask_id, int):
        raise ModelSourceError(str(tokenizer.name_or_path), "its tokenizer has no mask token, "
                               "which a masked-LM evaluation needs",
                               "use the tokenizer the model was trained with")
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


def _pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D rows to one [b, t_max] tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def model_inputs(rows: Sequence[torch.Tensor], *, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` ([b, t_max]) of right-padded windows."""
    return {"input_ids": _pad(rows, pad_id),
            "attention_mask": _pad([torch.ones_like(r) for r in rows], 0)}


def _batch_loss(model: PreTrainedModel, batch: Sequence[Scored], *, pad_id: int, causal: bool
                ) -> tuple[float, int]:
    """Summed cross-entropy (nats) and the number of scored tokens of one batch."""
    inputs = model_inputs([s.input_ids for s in batch], pad_id=pad_id)
    labels = _pad([s.labels for s in batch], IGNORE)  # [b, t]; padding is never scored
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


def score(model: PreTrainedModel, scored: Sequence[Scored], *, pad_id: int, objective: Objective,
          batch_size: int = 8, progress: bool = False) -> EvalResult:
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


def prepare(windows: Sequence[torch.Tensor], tokenizer: PreTrainedTokenizerBase, *,
            objective: Objective, mlm_seed: int = 0) -> list[Scored]:
    """Inputs and labels for `objective`: next-token targets, or the fixed MLM masks."""
    if objective == "masked":
        return mlm_masks(windows, tokenizer, seed=mlm_seed)
    return causal_targets(windows)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, or 0 where the tokenizer has none (padded positions are masked anyway)."""
    pad = tokenizer.pad_token_id
    return pad if isinstance(pad, int) else 0


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             windows: Sequence[torch.Tensor], *, batch_size: int = 8, mlm_seed: int = 0,
             progress: bool = False) -> EvalResult:
    """Mean token loss of `model` on `windows` (from `textdata.token_windows`), token-weighted.

    Causal LMs are scored on every next token; masked LMs on `mlm_masks(windows, seed=mlm_seed)`.
    """
    objective = objective_of(model)
    scored = prepare(windows, tokenizer, objective=objective, mlm_seed=mlm_seed)
    return score(model, scored, pad_id=pad_id_of(tokenizer), objective=objective,
                 batch_size=batch_size, progress=progress)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load bars and reports while loading; problems are checked by hand."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_tokenizer(path: Path, *, label: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory; a clear error when there is none."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            label, "has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file)",
            "save the tokenizer the model was trained with into its directory, e.g. "
            f"`AutoTokenizer.from_pretrained(BASE).save_pretrained('{path}')`")
    with quiet_transformers():
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
    return tokenizer


def lm_objective(architectures: Sequence[str], *, label: str) -> Objective:
    """`masked` or `causal` from config.json's `architectures`; an error for headless models."""
    if any(name.endswith("ForMaskedLM") for name in architectures):
        return "masked"
    if not architectures or any("CausalLM" in n or "LMHead" in n for n in architectures):
        return "causal"
    raise ModelSourceError(
        label, f"is a {', '.join(architectures)}, which has no language-model head to score text",
        "evaluate a checkpoint with its LM head (…ForCausalLM or …ForMaskedLM)")


def load_lm(path: Path, *, label: str) -> PreTrainedModel:
    """The model in `path` with its LM head, float32, eval mode; missing weights are an error."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
        objective = lm_objective(list(config.architectures or []), label=label)
        auto = AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM
        loaded: Any = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    model, info = loaded  # (model, {"missing_keys": [...], ...})
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelSourceError(
            label, f"lacks weights its LM head needs ({', '.join(missing[:5])}); they would be "
            "random", "evaluate a checkpoint saved with its LM head")
    model.train(False)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{path} loaded as a {type(model).__name__}, not a transformers model")
    return model


def eval_model(model_ref: str, *, data: str | None, max_length: int = 128,
               samples: int | None = None, batch_size: int = 8, progress: bool = False
               ) -> EvalResult:
    """Load a model (local dir or `zoo:NAME`) with its tokenizer and evaluate it on `data`."""
    from hfmerge.lm.textdata import describe_data, load_texts, token_windows
    from hfmerge.sources.refs import resolve_model

    texts = load_texts(data)  # first: a bad data file should fail before any model loads
    source = resolve_model(model_ref, progress=progress)
    tokenizer = load_tokenizer(source.path, label=model_ref)
    model = load_lm(source.path, label=model_ref)
    length = usable_length(model, max_length)
    windows = token_windows(tokenizer, texts, max_length=length, samples=samples)
    result = evaluate(model, tokenizer, windows, batch_size=batch_size, progress=progress)
    return replace(result, max_length=length, data=describe_data(data))


def format_eval(model_ref: str, result: EvalResult) -> str:
    """One readable line: model, loss, perplexity and what was scored."""
    scored = "masked tokens" if result.objective == "masked" else "tokens"
    where = f", {result.data}" if result.data else ""
    size = f" of <= {result.max_length} tokens" if result.max_length else ""
    return (f"{model_ref}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
            f"({result.tokens} {scored} in {result.windows} windows{size}{where})")


def position_limit(config: Any) -> int | None:
    """The longest window a model config allows (absolute position embeddings), if any.

    `config` is a transformers config or a config.json mapping.
    """
    get = config.get if isinstance(config, Mapping) else partial(getattr, config)
    limits = [get(key, None) for key in ("max_position_embeddings", "n_positions")]
    known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(known) if known else None


def usable_length(model: PreTrainedModel, max_length: int) -> int:
    """`max_length`, capped at the model's position limit (absolute position embeddings)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    limit = position_limit(model.config)
    return max_length if limit is None else min(max_length, limit)


__all__ = [
    "EvalResult",
    "Objective",
    "Scored",
    "eval_model",
    "evaluate",
    "format_eval",
    "load_lm",
    "load_tokenizer",
    "mlm_masks",
    "model_inputs",
    "objective_of",
    "perplexity",
    "position_limit",
    "prepare",
    "score",
]
