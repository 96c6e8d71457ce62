"""The output vocabulary of a merge: its tokenizer, and the embedding rows that follow it.

Used when the recipe has a `tokenizer:` section, or when the models' vocabulary sizes differ
(a fine-tune that added chat tokens, a padded vocabulary): then the output takes the base's
tokenizer unless the recipe says otherwise. The tokenizers are read before any weight is
downloaded (only their small files, for Hub models), and the plan's token-indexed tensors are
re-planned with one row per output token (`engine/vocab.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfmerge.arch.config import config_field
from hfmerge.engine.plan import MergePlan
from hfmerge.engine.vocab import TokenRule, plan_vocab, vocab_tensors
from hfmerge.errors import ModelSourceError, VocabularyError
from hfmerge.recipe.schema import ModelEntry, Recipe, TokenizerSpec, TokenSource
from hfmerge.sources.inspection import InspectedModel, vocab_size
from hfmerge.sources.refs import fetch_files
from hfmerge.tensors import has_tokenizer, plan_shards

if TYPE_CHECKING:  # transformers is imported only when a merge changes the vocabulary
    from transformers import PreTrainedTokenizerBase

_SHOWN = 12  # tokens listed by name in a note; the rest are counted


@dataclass(frozen=True)
class OutputVocabulary:
    """The tokenizer the output is saved with, and its number of embedding rows."""

    tokenizer: PreTrainedTokenizerBase
    rows: int


def plan_vocabulary(
    recipe: Recipe,
    plan: MergePlan,
    entries: Sequence[ModelEntry],
    *,
    max_shard_bytes: int,
    offline: bool,
) -> tuple[MergePlan, OutputVocabulary | None]:
    """The plan with its token-indexed tensors on the output vocabulary, and that vocabulary;
    the plan unchanged and None when the models share the base's vocabulary size and the recipe
    has no `tokenizer:`.

    `entries` are the recipe entries of `plan.readers`, in order.

    Raises:
        ModelSourceError: a model's tokenizer is missing or cannot be read.
        VocabularyError: `slices:` over vocabularies of different sizes.
    """
    readers = _vocab_readers(plan)
    sizes = {r: vocab_size(plan.readers[r]) for r in {0, *readers}}
    spec = recipe.tokenizer
    asked = spec is not None and spec.changes_vocabulary
    if not asked and len(set(sizes.values())) == 1:
        return plan, None
    if recipe.slices is not None:
        raise VocabularyError(
            "it does not combine with `slices:` yet",
            fix="stack models that share one vocabulary size, and remove `tokenizer:`",
        )
    # Without a `source`, the base's tokenizer, and its padded size kept.
    unnamed = spec is None or spec.source is None
    min_rows = (sizes[0] or 0) if unnamed else 0
    spec = TokenizerSpec(source="base") if spec is None else spec
    from hfmerge.lm.vocab import model_vocab

    tokenizers = _tokenizers(plan, readers, offline=offline)
    output = _output_tokenizer(spec, plan, entries, tokenizers, sizes)
    out_vocab: dict[str, int] = output.get_vocab()
    vocabs = {r: model_vocab(tokenizers[r], sizes[r]) for r in readers}
    base = 0 if 0 in readers else None
    rules = {t: _rule(s, entries) for t, s in spec.tokens.items()}
    vocab = plan_vocab(
        out_vocab,
        vocabs,
        base=base,
        rules=rules,
        pad_to_multiple_of=spec.pad_to_multiple_of,
        min_rows=min_rows,
    )
    names = _token_indexed(plan.readers[0], sizes[0])
    jobs = [
        replace(job, shape=(vocab.rows, *job.shape[1:]), vocab=True)
        if job.name in names and job.action == "merge"
        else job
        for job in plan.jobs
    ]
    notes = _notes(out_vocab, vocabs, plan, readers, spec)
    planned = replace(
        plan,
        jobs=jobs,
        shards=plan_shards(jobs, max_shard_bytes=max_shard_bytes),
        vocab=vocab,
        notes=(*plan.notes, *notes),
    )
    return planned, OutputVocabulary(output, vocab.rows)


def _vocab_readers(plan: MergePlan) -> list[int]:
    """The readers a token-indexed tensor is merged from: the method's inputs, and the base for
    task-vector methods."""
    readers = [read.model for read in plan.jobs[0].sources(len(plan.inputs))] if plan.jobs else []
    if plan.method.needs_base:
        readers.append(0)
    return sorted(set(readers))


def _token_indexed(base: InspectedModel, size: int | None) -> set[str]:
    if size is None:
        return set()
    shapes = {name: base.index.info(name).shape for name in base.index.names}
    return vocab_tensors(base.index.names, shapes, size)


def _tokenizers(
    plan: MergePlan, readers: Sequence[int], *, offline: bool
) -> dict[int, PreTrainedTokenizerBase]:
    """Each reader's tokenizer (the base's for a model saved without one, as mergekit assumes).

    Hub models' tokenizer files are downloaded here, before any weight.
    """
    paths = {}
    for r in {0, *readers}:
        model = plan.readers[r]
        source = fetch_files(model.source, (), side_files=True, offline=offline)
        paths[r] = source.path
    base = _load(plan.readers[0], paths[0])
    return {
        r: base if r == 0 or not has_tokenizer(paths[r]) else _load(plan.readers[r], paths[r])
        for r in {0, *readers}
    }


def _load(model: InspectedModel, path: Path) -> PreTrainedTokenizerBase:
    from hfmerge.lm.load import load_tokenizer

    try:
        return load_tokenizer(path, label=model.label)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            model.label,
            f"its tokenizer cannot be read ({exc})",
            "save the tokenizer it was trained with into its folder",
        ) from exc


def _output_tokenizer(
    spec: TokenizerSpec,
    plan: MergePlan,
    entries: Sequence[ModelEntry],
    tokenizers: Mapping[int, PreTrainedTokenizerBase],
    sizes: Mapping[int, int | None],
) -> PreTrainedTokenizerBase:
    """The tokenizer `spec.source` names, with every `tokens:` entry it lacks added (a new
    special token, say), as mergekit does."""
    from hfmerge.lm.vocab import union_tokenizer, with_tokens

    if spec.source in ("base", None):
        tokenizer = tokenizers[0]
    elif spec.source == "union":
        others = [(tokenizers[r], sizes[r]) for r in sorted(tokenizers) if r != 0]
        tokenizer = union_tokenizer(tokenizers[0], others)
    else:
        tokenizer = tokenizers[_reader_of(spec.source, entries)]
    return with_tokens(tokenizer, list(spec.tokens))


def _reader_of(name: str, entries: Sequence[ModelEntry]) -> int:
    """The reader a recipe name refers to (the recipe checks made sure one does)."""
    return next(i for i, entry in enumerate(entries) if name in entry.spellings)


def _rule(spec: Any, entries: Sequence[ModelEntry]) -> TokenRule:
    source = spec.source
    if isinstance(source, TokenSource):
        if source.kind == "zero" or source.model is None:
            return TokenRule(None, force=spec.force)
        reader = _reader_of(source.model, entries)
        return TokenRule(reader, source.token, source.token_id, force=spec.force)
    if source is None:
        return TokenRule(None, force=spec.force)
    return TokenRule(_reader_of(source, entries), force=spec.force)


def _notes(
    out_vocab: Mapping[str, int],
    vocabs: Mapping[int, Mapping[str, int]],
    plan: MergePlan,
    readers: Sequence[int],
    spec: TokenizerSpec,
) -> list[str]:
    """What happens to each token the models do not all share, in a few lines."""
    notes = [
        f"output vocabulary: {len(out_vocab)} tokens (tokenizer source: {spec.source or 'base'})"
    ]
    for r in readers:
        label = plan.readers[r].label
        # newest first: added tokens (chat markers) are the ones a user looks for
        dropped = sorted((t for t in vocabs[r] if t not in out_vocab), key=lambda t: -vocabs[r][t])
        if dropped:
            notes.append(
                f"{len(dropped)} token(s) of {label} are not in the output tokenizer and are "
                f"dropped: {_listing(dropped)}; `tokenizer: {{source: union}}` keeps them"
            )
        lacking = sorted((t for t in out_vocab if t not in vocabs[r]), key=lambda t: -out_vocab[t])
        if lacking:
            notes.append(
                f"{label} lacks {len(lacking)} output token(s): {_listing(lacking)}; their rows "
                "come from the models that have them (the base first), or the `tokens:` entries"
            )
    return notes


def _listing(tokens: Sequence[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_SHOWN])
    return shown + (f" and {len(tokens) - _SHOWN} more" if len(tokens) > _SHOWN else "")


def save_vocabulary(staging: Path, output: OutputVocabulary, plan: MergePlan) -> None:
    """Save the output tokenizer and set the config's vocabulary size, then check both against
    the written embedding rows.

    Raises:
        VocabularyError: the saved tokenizer has more tokens than the embedding has rows (a bug).
    """
    from hfmerge.lm.load import load_tokenizer

    output.tokenizer.save_pretrained(staging)
    path = staging / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    _set_vocab_size(config, output.rows)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    saved = load_tokenizer(staging, label="the output")
    rows = {job.shape[0] for job in plan.jobs if job.vocab}
    if len(saved) > output.rows or rows - {output.rows}:
        raise VocabularyError(
            f"the output's tokenizer ({len(saved)} tokens) does not fit its embedding rows "
            f"({sorted(rows)})",
            fix="report this with the recipe: it is a bug in hfmerge",
        )


def _set_vocab_size(config: dict[str, Any], rows: int) -> None:
    """`vocab_size` where the config keeps it: at the top, or in a nested text config."""
    if "vocab_size" in config or config_field(config, "vocab_size") is None:
        config["vocab_size"] = rows
        return
    for value in config.values():
        if isinstance(value, dict) and "vocab_size" in value:
            value["vocab_size"] = rows


def save_chat_template(staging: Path, plan: MergePlan, value: str) -> None:
    """Set the output tokenizer's chat template (`tokenizer.chat_template` of the recipe).

    `auto` takes the template most of the models' tokenizers carry (none: left as it is).
    """
    from hfmerge.recipe.chat_templates import chat_template

    models = []
    if value == "auto":
        for model in plan.readers:
            if has_tokenizer(model.source.path):
                models.append(_template_of(_load(model, model.source.path)))
    template = chat_template(value, models)
    if template is None:
        return
    from hfmerge.lm.load import load_tokenizer

    tokenizer = load_tokenizer(staging, label="the output")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(staging)


def _template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) else None
