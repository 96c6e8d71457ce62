"""Loss and perplexity of a model on text, and the `hfmerge eval` grid of several models and texts.

One model on one text prints the single line of `format_eval`; more print a table with one row
per model and one loss column per text, which is how routed, expert and merged models compare
(`hfmerge.api.evaluate` fills the grid, routed repos through `hfmerge.routing.eval_routed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from hfmerge.lm.load import load_lm, load_tokenizer, usable_length
from hfmerge.lm.scoring import EvalResult, evaluate
from hfmerge.lm.textdata import describe_data, load_texts, token_windows
from hfmerge.sources.refs import ModelSource


@dataclass(frozen=True)
class EvalCell:
    """One model's result on one text."""

    model: str
    data: str
    result: EvalResult

    def to_json(self) -> dict[str, Any]:
        """`{"model", "data", "loss", "perplexity", "tokens", ...}`."""
        return {"model": self.model, "data": self.data, **self.result.to_json()}


def format_grid(cells: Sequence[EvalCell]) -> str:
    """One line for a single result; else a loss table, the best loss per text starred."""
    if len(cells) == 1:
        return format_eval(cells[0].model, cells[0].result)
    models = list(dict.fromkeys(c.model for c in cells))
    datas = list(dict.fromkeys(c.data for c in cells))
    loss = {(c.model, c.data): c.result.loss for c in cells}
    best = {d: min(loss[m, d] for m in models) for d in datas}
    width = max(len("model"), *map(len, models))
    header = f"{'model':<{width}}  " + "  ".join(f"{d:>16}" for d in datas)
    lines = ["mean token loss (nats/token; * = lowest per text)", header]
    for model in models:
        values = [f"{loss[model, d]:.4f}{'*' if loss[model, d] == best[d] else ' '}" for d in datas]
        lines.append(f"{model:<{width}}  " + "  ".join(f"{v:>16}" for v in values))
    return "\n".join(lines)


def grid_json(cells: Sequence[EvalCell]) -> dict[str, Any]:
    """The `--json` fields of one result; `{"results": [...]}` for several."""
    if len(cells) == 1:
        return cells[0].to_json()
    return {"results": [c.to_json() for c in cells]}


def eval_model(
    source: ModelSource,
    *,
    data: str | None,
    max_length: int = 128,
    samples: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalResult:
    """Load a resolved model (with its LoRA adapter, if any) and its tokenizer, and evaluate it
    on `data`."""
    texts = load_texts(data)  # first: a bad data file should fail before any model loads
    tokenizer = load_tokenizer(source.path, label=source.label)
    model = load_lm(source.path, label=source.label, adapter=source.adapter_path)
    length = usable_length(model, max_length)
    windows = token_windows(tokenizer, texts, max_length=length, samples=samples)
    result = evaluate(model, tokenizer, windows, batch_size=batch_size, progress=progress)
    return replace(result, max_length=length, data=describe_data(data))


def format_eval(model_ref: str, result: EvalResult) -> str:
    """One readable line: model, loss, perplexity and what was scored."""
    scored = "masked tokens" if result.objective == "masked" else "tokens"
    where = f", {result.data}" if result.data else ""
    size = f" of <= {result.max_length} tokens" if result.max_length else ""
    return (
        f"{model_ref}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
        f"({result.tokens} {scored} in {result.windows} windows{size}{where})"
    )


__all__ = ["EvalCell", "eval_model", "format_eval", "format_grid", "grid_json"]
