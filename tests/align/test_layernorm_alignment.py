"""Orthogonal alignment of LayerNorm models (tiny GPT-2, float64): planted maps that fix the
all-ones direction come back with `weight+orthogonal` and `activation+orthogonal`, `hfmerge
align` writes a loadable model, and `learned` keeps its rotation fixing 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.align.activation_matching import activation_matching
from hfmerge.align.head_maps import with_head_maps
from hfmerge.align.learned import learned_matching
from hfmerge.align.orthogonal import orthogonal_matching
from hfmerge.align.weight_matching import MatchResult
from hfmerge.arch import spec_for
from hfmerge.arch.head_maps import HeadMap
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.residual import FOLDED, BasisMap, map_state_dict
from hfmerge.arch.spec import ArchSpec
from hfmerge.cli.app import main
from hfmerge.lm.batches import probe_batches
from hfmerge.lm.textdata import load_texts, token_windows
from tests.support.align import padded_batches
from tests.support.controls import KEPT
from tests.support.head_maps import mixing_head_maps, random_head_maps
from tests.support.lm import char_tokenizer, save_lm, style_of
from tests.support.rotation import allowed_rotation
from tests.support.tiny_models import (
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    tiny_batch,
)


def _gpt2(seed: int) -> tuple[PreTrainedModel, ArchSpec, dict[str, torch.Tensor]]:
    """An untied float64 tiny GPT-2, its spec and its checkpoint tensors."""
    model = make_tiny_model("gpt2", seed=seed, dtype=torch.float64, tie_word_embeddings=False)
    spec = spec_for(model.config.to_dict(), model.state_dict().keys())
    params = {n: t.clone() for n, t in model.state_dict().items() if n in spec.tensors}
    return model, spec, params


def _planted(spec: ArchSpec) -> BasisMap:
    """Every group permuted and the stream rotated by a Q fixing 1."""
    return BasisMap(
        nontrivial_permutations(spec, seed=4), fold=True, rotation=allowed_rotation(spec, seed=6)
    )


def _assert_back_to_a(
    spec: ArchSpec, params: dict[str, torch.Tensor], aligned: dict[str, torch.Tensor], atol: float
) -> None:
    folded_a = map_state_dict(params, spec, FOLDED)
    assert aligned.keys() == folded_a.keys()
    for name, value in folded_a.items():
        assert torch.allclose(aligned[name], value, atol=atol, rtol=0), name


def _fixes_ones(rotation: torch.Tensor) -> bool:
    ones = torch.ones(rotation.shape[0], dtype=torch.float64)
    return torch.allclose(rotation @ ones, ones, atol=1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_weight_orthogonal_undoes_a_planted_rotation_and_permutations_to_1e_8(kind: str) -> None:
    model = make_tiny_model(kind, dtype=torch.float64, tie_word_embeddings=False)
    spec = spec_for(model.config.to_dict(), model.state_dict().keys())
    params = {n: t for n, t in model.state_dict().items() if n in spec.tensors}
    params_b = map_state_dict(params, spec, _planted(spec))
    result = orthogonal_matching(spec, params, params_b)
    assert result.rotation is not None
    assert result.converged
    assert _fixes_ones(result.rotation)
    _assert_back_to_a(spec, params, map_state_dict(params_b, spec, result.basis), 1e-8)


def test_activation_orthogonal_undoes_a_planted_rotation_and_permutations_to_1e_6() -> None:
    model_a, spec, params = _gpt2(0)
    params_b = map_state_dict(params, spec, _planted(spec))
    model_b, _, _ = _gpt2(77)
    model_b.load_state_dict(params_b, strict=True)
    batches = padded_batches("gpt2", seed=3)
    result = activation_matching(spec, model_a, model_b, batches, residual="rotate")
    assert result.rotation is not None
    assert _fixes_ones(result.rotation)
    _assert_back_to_a(spec, params, map_state_dict(params_b, spec, result.basis), 1e-6)


def test_full_orthogonal_qk_maps_of_the_fused_projection_are_undone_to_1e_8() -> None:
    """No RoPE: the Q/K map solved for each head is a full orthogonal matrix (c_attn split)."""
    _, spec, params = _gpt2(0)
    vo = random_head_maps(spec, seed=2)
    mixing = mixing_head_maps(spec, seed=3)
    maps = {n: HeadMap(qk=mixing[n].qk, vo=vo[n].vo) for n in vo}
    rotation = allowed_rotation(spec, seed=6)
    params_b = map_state_dict(params, spec, BasisMap(fold=True, rotation=rotation, head_maps=maps))
    undone = MatchResult(identity_permutations(spec), 0, [], rotation=rotation.T)
    result = with_head_maps(spec, params, params_b, undone)
    _assert_back_to_a(spec, params, map_state_dict(params_b, spec, result.basis), 1e-8)


@pytest.mark.slow
def test_cli_align_writes_a_folded_rotated_gpt2_that_loads_and_is_still_b(
    chdir_tmp: Path,
) -> None:
    a = save_lm("gpt2", chdir_tmp / "a", seed=1)  # tied, as GPT-2 saves
    b = save_lm("gpt2", chdir_tmp / "b", seed=2)
    assert main(["align", str(a), str(b), "--out", "c", "--method", "weight+orthogonal"]) == 0
    original = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    aligned = AutoModelForCausalLM.from_pretrained(chdir_tmp / "c", dtype=torch.float32)
    assert not aligned.config.tie_word_embeddings
    ln_f = aligned.state_dict()["transformer.ln_f.weight"]
    assert torch.equal(ln_f, torch.ones_like(ln_f))
    inputs = tiny_batch("gpt2", seed=20)
    logits = model_outputs(aligned, inputs)["logits"]
    assert bool(torch.isfinite(logits).all())
    assert max_abs_diff(model_outputs(original, inputs), {"logits": logits}) < 1e-4


def test_learned_runs_on_a_gpt2_pair_and_keeps_b() -> None:
    _, spec, params_a = _gpt2(1)
    model_b, _, params_b = _gpt2(2)
    tokenizer = char_tokenizer(style_of("gpt2"))
    windows = token_windows(tokenizer, load_texts("builtin"), max_length=32, samples=8)
    batches = probe_batches(windows, tokenizer, batch_size=4)
    skeleton = make_tiny_model("gpt2", seed=1, tie_word_embeddings=False)  # float32, as loaded
    result = learned_matching(spec, skeleton, params_a, params_b, batches, label="A", steps=6)
    assert result.rotation is not None
    assert result.iterations == 6
    assert _fixes_ones(result.rotation)
    aligned, _, _ = _gpt2(77)
    aligned.load_state_dict(map_state_dict(params_b, spec, result.basis), strict=True)
    inputs = tiny_batch("gpt2", seed=20)
    assert max_abs_diff(model_outputs(model_b, inputs), model_outputs(aligned, inputs)) < KEPT
