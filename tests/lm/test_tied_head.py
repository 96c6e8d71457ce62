"""A loaded model's tied head untied in place (its own copy, the same function) and tied back."""

from __future__ import annotations

import torch

from hfmerge.lm.tied_head import head_is_tied, tie_head, untie_head
from tests.support.tiny_models import make_tiny_model, max_abs_diff, model_outputs, tiny_batch


def _head(model: torch.nn.Module) -> torch.Tensor:
    return dict(model.named_parameters(remove_duplicate=False))["lm_head.weight"]


def _embedding(model: torch.nn.Module) -> torch.Tensor:
    return dict(model.named_parameters(remove_duplicate=False))["model.embed_tokens.weight"]


def test_untie_gives_the_head_its_own_copy_and_tie_restores_the_embedding() -> None:
    model = make_tiny_model("llama_tied", seed=1)
    embedding = _embedding(model)
    inputs = tiny_batch("llama_tied")
    before = model_outputs(model, inputs)
    assert head_is_tied(model)
    untie_head(model)
    assert not head_is_tied(model)
    assert model.config.tie_word_embeddings is False
    assert _head(model) is not embedding
    assert torch.equal(_head(model), embedding)  # a copy: the same function
    assert max_abs_diff(before, model_outputs(model, inputs)) == 0.0
    with torch.no_grad():
        _head(model).mul_(2.0)  # its own storage: the embedding stays
    assert not torch.equal(_head(model), embedding)
    tie_head(model)
    assert head_is_tied(model)
    assert model.config.tie_word_embeddings is True
    assert max_abs_diff(before, model_outputs(model, inputs)) == 0.0


def test_an_untied_head_and_a_headless_model_are_left_as_they_are() -> None:
    untied = make_tiny_model("llama", seed=1)
    head = _head(untied)
    assert not head_is_tied(untied)
    untie_head(untied)
    assert _head(untied) is head
    assert untied.config.tie_word_embeddings is False
    bare = make_tiny_model("bert_base_model", seed=1)
    assert not head_is_tied(bare)
    untie_head(bare)
    tie_head(bare)  # no head to tie
    assert not head_is_tied(bare)
