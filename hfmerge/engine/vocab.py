"""Token-indexed tensors (embeddings, LM heads) remapped onto the output vocabulary.

Models that added tokens, or padded their vocabularies, have embedding matrices of different
sizes, and the same token may sit at different rows. Before merging, each model's vocabulary
tensor is rebuilt with one row per output token (mergekit 0.1.5's rules, so a config gives the
same tensors in both tools):
- a token every model has keeps each model's own row;
- a token only some models have gets, in the models that lack it, a row from a donor: the one
  model that has it, else the base when the base has it, else the average over the models that
  have it (a token no model has gets zeros);
- a `tokens:` entry names a token's donor (a model's row of that token, a model's row of another
  token, or zeros); with `force` every model takes the donor row, present or not;
- rows past the vocabulary (padding to a multiple) are the mean of the vocabulary rows.
The plan is pure data made from the tokenizers' vocabularies; the rows move in `remap`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hfmerge.arch.layers import layer_of


@dataclass(frozen=True)
class Donor:
    """Where a token's row comes from when a model lacks it (or `force` is set).

    `rows` are (reader, row) pairs averaged together (one pair: a copy); empty: zeros.
    """

    rows: tuple[tuple[int, int], ...]
    force: bool = False


@dataclass(frozen=True)
class VocabPlan:
    """Each output row of every vocabulary tensor, per reader (`MergePlan.readers` index)."""

    rows: int  # output rows, padding included
    tokens: int  # rows that hold a token; the rest are padding
    sources: dict[int, torch.Tensor]  # reader -> [tokens] its row of each token, -1 if absent
    donors: dict[int, Donor] = field(default_factory=dict)  # output row -> its donor

    def remap(self, tensors: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each reader's tensor ([its rows, ...]) rebuilt as [self.rows, ...] (mergekit's rules).

        `tensors` holds every reader's whole tensor, float32.
        """
        donor_rows = {row: self._donor_row(donor, tensors) for row, donor in self.donors.items()}
        out = {}
        for reader, tensor in tensors.items():
            index = self.sources[reader]  # [tokens]
            new = tensor.new_zeros((self.rows, *tensor.shape[1:]))
            present = index >= 0
            new[: self.tokens][present] = tensor[index[present]]
            for row, donor in self.donors.items():
                if donor.force or not bool(present[row]):
                    new[row] = donor_rows[row]
            if self.rows > self.tokens:  # padding rows: the mean of the token rows
                new[self.tokens :] = new[: self.tokens].mean(dim=0)
            out[reader] = new
        return out

    @staticmethod
    def _donor_row(donor: Donor, tensors: Mapping[int, torch.Tensor]) -> torch.Tensor:
        first = next(iter(tensors.values()))
        if not donor.rows:
            return first.new_zeros(first.shape[1:])
        total = first.new_zeros(first.shape[1:])
        for reader, row in donor.rows:
            total = total + tensors[reader][row]
        return total / len(donor.rows)


@dataclass(frozen=True)
class TokenRule:
    """A `tokens:` entry, resolved to readers: where the token's row comes from."""

    reader: int | None  # None: zeros
    token: str | None = None  # the donor's token (None: the same token)
    token_id: int | None = None  # or its row
    force: bool = False


def plan_vocab(
    out_vocab: Mapping[str, int],
    vocabs: Mapping[int, Mapping[str, int]],
    *,
    base: int | None,
    rules: Mapping[str, TokenRule] | None = None,
    pad_to_multiple_of: int | None = None,
    min_rows: int = 0,
) -> VocabPlan:
    """The plan that maps every reader's rows onto `out_vocab` (token -> output row).

    Args:
        out_vocab: the output tokenizer's vocabulary.
        vocabs: each reader's vocabulary, limited to the rows its embedding has.
        base: the base's reader, preferred as donor; None without a base.
        rules: `tokens:` entries by token.
        pad_to_multiple_of: round the output rows up to a multiple of this.
        min_rows: pad to at least this many rows (the base's, when the recipe names no
            tokenizer: its padded vocabulary keeps its size).

    Raises:
        ValueError: a rule names a token its donor model lacks (the recipe checks name it first).
    """
    tokens = len(out_vocab)
    rows = tokens
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows = (rows // pad_to_multiple_of + 1) * pad_to_multiple_of
    rows = max(rows, min_rows)
    sources = {}
    for reader, vocab in vocabs.items():
        index = torch.full((tokens,), -1, dtype=torch.long)
        for token, row in out_vocab.items():
            if token in vocab:
                index[row] = vocab[token]
        sources[reader] = index
    donors = {}
    for token, row in out_vocab.items():
        donor = _donor(token, row, sources, vocabs, base, (rules or {}).get(token))
        if donor is not None:
            donors[row] = donor
    return VocabPlan(rows=rows, tokens=tokens, sources=sources, donors=donors)


def _donor(
    token: str,
    row: int,
    sources: Mapping[int, torch.Tensor],
    vocabs: Mapping[int, Mapping[str, int]],
    base: int | None,
    rule: TokenRule | None,
) -> Donor | None:
    having = [reader for reader, index in sources.items() if int(index[row]) >= 0]
    if rule is not None:
        return _rule_donor(token, row, sources, vocabs, rule)
    if len(having) == len(sources):
        return None  # every model has it: each keeps its own row
    if len(having) == 1 or (having and base in having):
        donor = having[0] if len(having) == 1 else base
        assert donor is not None
        return Donor(((donor, int(sources[donor][row])),))
    return Donor(tuple((reader, int(sources[reader][row])) for reader in having))


def _rule_donor(
    token: str,
    row: int,
    sources: Mapping[int, torch.Tensor],
    vocabs: Mapping[int, Mapping[str, int]],
    rule: TokenRule,
) -> Donor:
    if rule.reader is None:
        return Donor((), force=rule.force)
    if rule.token_id is not None:
        source_row = rule.token_id
    elif rule.token is not None:
        if rule.token not in vocabs[rule.reader]:
            raise ValueError(f"the donor of {token!r} has no token {rule.token!r}")
        source_row = vocabs[rule.reader][rule.token]
    else:
        source_row = int(sources[rule.reader][row])
        if source_row < 0:
            raise ValueError(f"the donor of {token!r} does not have it")
    return Donor(((rule.reader, source_row),), force=rule.force)


def vocab_tensors(names: Sequence[str], shapes: Mapping[str, Sequence[int]], size: int) -> set[str]:
    """The tensors indexed by token: outside the blocks, with `size` (the model's vocabulary
    size) rows."""
    return {
        name
        for name in names
        if layer_of(name) is None and len(shapes[name]) >= 1 and shapes[name][0] == size
    }
