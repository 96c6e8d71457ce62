"""The norm-gain fold and the orthogonal residual map keep a model's function (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch

from hfmerge.arch import spec_for
from hfmerge.arch.residual import FOLDED, BasisMap, map_state_dict, require_foldable
from hfmerge.errors import AlignmentError
from tests.support.controls import KEPT, tiny
from tests.support.rotation import random_orthogonal
from tests.support.tiny_models import make_tiny_model, max_abs_diff, model_outputs, tiny_batch

FOLDABLE = ("llama", "llama_tied", "mistral", "qwen2", "qwen3")
NOT_FOLDABLE = ("gemma", "gemma2", "olmo2", "bert")


def _logits_change(kind: str, state: dict[str, torch.Tensor]) -> float:
    """Largest logit change after loading `state` into an untied float64 copy of `kind`."""
    model, _ = tiny(kind)
    untied = make_tiny_model(kind, seed=77, dtype=torch.float64, tie_word_embeddings=False)
    untied.load_state_dict(state, strict=True)
    inputs = tiny_batch(kind, seed=20)
    return max_abs_diff(model_outputs(model, inputs), model_outputs(untied, inputs))


@pytest.mark.parametrize("kind", FOLDABLE)
def test_every_pre_norm_and_the_final_norm_have_readers(kind: str) -> None:
    _, spec = tiny(kind)
    norms = {n for n in spec.tensors if n.endswith("norm.weight") and "_proj" not in n}
    norms -= {n for n in norms if ".q_norm." in n or ".k_norm." in n}  # per-head: not residual
    assert set(spec.norm_readers) == norms
    assert spec.norm_readers["model.norm.weight"] == ("lm_head.weight",)
    assert spec.norm_readers["model.layers.1.post_attention_layernorm.weight"] == (
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    )


@pytest.mark.parametrize("kind", NOT_FOLDABLE)
def test_families_where_folding_is_not_exact_are_refused(kind: str) -> None:
    _, spec = tiny(kind)
    assert spec.norm_readers == {}
    with pytest.raises(AlignmentError, match="not exact") as info:
        require_foldable(spec, label="B", feature="weight+orthogonal")
    assert "`weight`" in info.value.fix


def test_bert_is_refused_because_its_norms_follow_each_block() -> None:
    _, spec = tiny("bert")
    with pytest.raises(AlignmentError) as info:
        require_foldable(spec, label="B", feature="weight+orthogonal")
    assert "post-LN" in info.value.why
    assert "residual sum after a block" in info.value.why


def test_a_bare_model_has_nothing_to_fold_its_final_norm_into() -> None:
    model, _ = tiny("llama")
    names = [n.removeprefix("model.") for n in model.state_dict() if n != "lm_head.weight"]
    config = {**model.config.to_dict(), "architectures": ["LlamaModel"]}
    assert not spec_for(config, names).foldable


@pytest.mark.parametrize("kind", FOLDABLE)
def test_folding_keeps_the_logits_and_sets_every_gain_to_one(kind: str) -> None:
    model, spec = tiny(kind)
    state = model.state_dict()
    folded = map_state_dict(state, spec, FOLDED)
    assert "lm_head.weight" in folded  # untied when it was tied
    for norm in spec.norm_readers:
        assert not torch.equal(state[norm], torch.ones_like(state[norm]))  # a real test
        assert torch.equal(folded[norm], torch.ones_like(state[norm]))
    assert _logits_change(kind, folded) < KEPT


@pytest.mark.parametrize("kind", FOLDABLE)
def test_a_rotated_residual_stream_keeps_the_logits(kind: str) -> None:
    model, spec = tiny(kind)
    hidden = spec.groups["residual"].size
    rotation = random_orthogonal(hidden, seed=3)
    rotated = map_state_dict(model.state_dict(), spec, BasisMap(fold=True, rotation=rotation))
    embed = "model.embed_tokens.weight"
    assert torch.allclose(rotated[embed], model.state_dict()[embed] @ rotation.T)  # E·Qᵀ
    assert _logits_change(kind, rotated) < KEPT


def test_a_rotation_without_the_fold_is_refused() -> None:
    with pytest.raises(ValueError, match="folded"):
        BasisMap(rotation=torch.eye(4, dtype=torch.float64))


def test_a_broken_rotation_changes_the_logits() -> None:
    """Negative control: a non-orthogonal map (or none of the fold) moves the logits."""
    model, spec = tiny("llama")
    hidden = spec.groups["residual"].size
    skewed = random_orthogonal(hidden, seed=3) * 1.1
    state = map_state_dict(model.state_dict(), spec, BasisMap(fold=True, rotation=skewed))
    assert _logits_change("llama", state) > 1e-3
