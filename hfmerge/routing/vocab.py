"""Routed experts read one token stream and return logits over one vocabulary: check that."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from hfmerge.arch.config import read_config
from hfmerge.errors import IncompatibleModelsError, ModelSourceError
from hfmerge.lm.load import load_tokenizer, position_limit

_WHY = "a routed model feeds every expert the same token ids and returns one logits tensor"


def config_vocab_size(path: Path, *, label: str) -> int:
    """`vocab_size` from config.json."""
    size = read_config(path, label=label).get("vocab_size")
    if not isinstance(size, int):
        raise ModelSourceError(
            label, "its config.json has no vocab_size", "route between transformers language models"
        )
    return size


def check_expert_vocabularies(experts: Mapping[str, Path]) -> int:
    """Every expert's config has the same vocab_size; returns it."""
    sizes = {name: config_vocab_size(path, label=name) for name, path in experts.items()}
    first, size = next(iter(sizes.items()))
    for name, other in sizes.items():
        if other != size:
            raise IncompatibleModelsError(
                first, name, [f"their vocabularies have {size} and {other} entries, and {_WHY}"]
            )
    return size


def check_tokenizer_fits(
    tokenizer: PreTrainedTokenizerBase, experts: Mapping[str, Path], *, tokenizer_label: str
) -> None:
    """Each expert's own tokenizer (when it has one) has the router tokenizer's vocabulary,
    and every expert's embedding covers it."""
    vocab = tokenizer.get_vocab()
    for name, path in experts.items():
        size = config_vocab_size(path, label=name)
        if len(tokenizer) > size:
            raise IncompatibleModelsError(
                tokenizer_label,
                name,
                [f"the tokenizer has {len(tokenizer)} tokens but {name} embeds only {size}"],
            )
        try:
            own: PreTrainedTokenizerBase | None = load_tokenizer(path, label=name)
        except ModelSourceError:
            own = None  # no tokenizer files: it reads the router tokenizer's ids (size checked)
        if own is not None and own.get_vocab() != vocab:
            raise IncompatibleModelsError(
                tokenizer_label,
                name,
                [
                    f"their tokenizers differ ({len(tokenizer)} vs {len(own)} tokens, or the same "
                    f"tokens with other ids), and {_WHY}"
                ],
            )


def common_usable_length(models: Iterable[Path], max_length: int) -> int:
    """`max_length`, capped at the shortest position limit among the models' configs."""
    limits = [position_limit(read_config(path, label=str(path))) for path in models]
    return min([max_length, *(limit for limit in limits if limit is not None)])


__all__ = [
    "check_expert_vocabularies",
    "check_tokenizer_fits",
    "common_usable_length",
    "config_vocab_size",
]
