"""engine/vocab.py: each output row of a token-indexed tensor, per model, by mergekit's rules."""

from __future__ import annotations

import pytest
import torch

from hfmerge.engine.vocab import TokenRule, plan_vocab, vocab_tensors

OUT = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
# Reader 0 is the base; 1 and 2 are fine-tunes with their own row orders.
VOCABS = {
    0: {"a": 0, "b": 1, "c": 2},
    1: {"b": 0, "a": 1, "d": 2, "c": 3},
    2: {"a": 0, "b": 1, "d": 2},
}


def tables() -> dict[int, torch.Tensor]:
    """Each model's rows: row i of reader r is [10 r + i] (so every row is recognisable)."""
    return {r: torch.tensor([[10.0 * r + i] for i in range(len(v))]) for r, v in VOCABS.items()}


def test_each_model_keeps_its_own_rows_and_lacking_ones_come_from_donors() -> None:
    plan = plan_vocab(OUT, VOCABS, base=0)
    out = plan.remap(tables())
    assert out[0][:, 0].tolist() == [0, 1, 2, 17, 0]  # d: average of readers 1 and 2 (12, 22)
    assert out[1][:, 0].tolist() == [11, 10, 13, 12, 0]  # own rows, reordered by token
    assert out[2][:, 0].tolist() == [20, 21, 2, 22, 0]  # c: the base has it, so its row
    assert plan.rows == plan.tokens == 5


def test_a_token_one_model_has_is_copied_from_it_and_the_base_is_preferred() -> None:
    vocabs = {0: {"a": 0}, 1: {"a": 0, "b": 1}, 2: {"a": 0, "b": 1, "c": 2}}
    out = plan_vocab({"a": 0, "b": 1, "c": 2}, vocabs, base=None).remap(
        {r: torch.tensor([[10.0 * r + i] for i in range(len(v))]) for r, v in vocabs.items()}
    )
    assert [out[r][2, 0].item() for r in range(3)] == [22, 22, 22]  # only reader 2 has c
    assert [out[r][1, 0].item() for r in range(3)] == [16, 11, 21]  # b: the average of 1 and 2


def test_padding_rows_are_the_mean_of_each_models_token_rows() -> None:
    plan = plan_vocab(OUT, VOCABS, base=0, pad_to_multiple_of=4)
    assert (plan.rows, plan.tokens) == (8, 5)
    out = plan.remap(tables())
    for tensor in out.values():
        assert torch.equal(tensor[5:], tensor[:5].mean(dim=0).expand(3, -1))
    assert plan_vocab(OUT, VOCABS, base=0, min_rows=7).rows == 7


def test_rules_name_donors_and_force_overrides_present_rows() -> None:
    rules = {
        "a": TokenRule(None, force=True),  # zeros everywhere
        "b": TokenRule(2, token="d"),  # where lacking only: nobody lacks b
        "c": TokenRule(1, force=True),  # reader 1's own c row everywhere
        "d": TokenRule(0, token_id=2, force=True),  # the base's row 2
    }
    out = plan_vocab(OUT, VOCABS, base=0, rules=rules).remap(tables())
    assert [out[r][0, 0].item() for r in range(3)] == [0, 0, 0]
    assert [out[r][1, 0].item() for r in range(3)] == [1, 10, 21]
    assert [out[r][2, 0].item() for r in range(3)] == [13, 13, 13]
    assert [out[r][3, 0].item() for r in range(3)] == [2, 2, 2]


def test_a_rule_naming_a_token_its_donor_lacks_is_an_error() -> None:
    with pytest.raises(ValueError, match="has no token"):
        plan_vocab(OUT, VOCABS, base=0, rules={"e": TokenRule(0, token="zzz")})


def test_token_indexed_tensors_are_found_outside_the_blocks() -> None:
    shapes = {
        "model.embed_tokens.weight": (99, 8),
        "lm_head.weight": (99, 8),
        "model.layers.0.mlp.up_proj.weight": (99, 8),
        "model.norm.weight": (8,),
    }
    assert vocab_tensors(list(shapes), shapes, 99) == {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
