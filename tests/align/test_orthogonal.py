"""Orthogonal residual alignment: Procrustes orientation, a planted map recovered, B kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.align import ROTATION_FILE, align_checkpoint, align_permutations
from hfmerge.align.orthogonal import orthogonal_matching, procrustes
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.residual import FOLDED, BasisMap, map_state_dict
from hfmerge.errors import AlignmentError
from tests.support.controls import KEPT, tiny, tiny_params
from tests.support.rotation import random_orthogonal
from tests.support.tiny_models import (
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    save_tiny_model,
    tiny_batch,
)


def test_procrustes_recovers_a_planted_rotation_in_the_right_orientation() -> None:
    _, spec = tiny("llama")
    folded_a = map_state_dict(tiny_params("llama"), spec, FOLDED)
    planted = random_orthogonal(spec.groups["residual"].size, seed=5)
    # B's stream is h_B = Qᵀ h_A, so reading B into A's basis needs Q.
    folded_b = map_state_dict(folded_a, spec, BasisMap(fold=True, rotation=planted.T))
    found = procrustes(spec, folded_a, folded_b, identity_permutations(spec))
    assert torch.allclose(found, planted, atol=1e-10)
    assert torch.allclose(found @ found.T, torch.eye(found.shape[0], dtype=torch.float64))


def test_a_planted_rotation_and_permutations_are_undone_to_1e_8() -> None:
    """B is A folded, every group permuted and the stream rotated: aligning B gives back A."""
    _, spec = tiny("llama")
    params = tiny_params("llama")
    perms = nontrivial_permutations(spec, seed=4)
    rotation = random_orthogonal(spec.groups["residual"].size, seed=6)
    params_b = map_state_dict(params, spec, BasisMap(perms, fold=True, rotation=rotation))
    result = orthogonal_matching(spec, params, params_b)
    assert result.rotation is not None
    assert result.converged
    aligned = map_state_dict(params_b, spec, result.basis)
    folded_a = map_state_dict(params, spec, FOLDED)
    assert aligned.keys() == folded_a.keys()
    for name, value in folded_a.items():
        assert torch.allclose(aligned[name], value, atol=1e-8, rtol=0), name
    assert result.objective[-1] >= result.objective[0]


def test_the_aligned_model_keeps_its_own_logits() -> None:
    """Two unrelated tiny Llamas: whatever map is found, B read through it is still B."""
    _, spec = tiny("llama")
    model_b = make_tiny_model("llama", seed=9, dtype=torch.float64)
    params_b = {n: t for n, t in model_b.state_dict().items() if n in spec.tensors}
    result = orthogonal_matching(spec, tiny_params("llama"), params_b, max_rounds=3)
    assert result.rotation is not None
    assert not torch.allclose(result.rotation.abs(), torch.eye(result.rotation.shape[0]).double())
    aligned = make_tiny_model("llama", seed=77, dtype=torch.float64)
    aligned.load_state_dict(map_state_dict(params_b, spec, result.basis), strict=True)
    inputs = tiny_batch("llama", seed=20)
    assert max_abs_diff(model_outputs(model_b, inputs), model_outputs(aligned, inputs)) < KEPT


def test_align_out_writes_b_folded_untied_and_rotated_as_a_plain_checkpoint(
    tmp_path: Path,
) -> None:
    a = save_tiny_model("llama_tied", tmp_path / "a", seed=1)
    b = save_tiny_model("llama_tied", tmp_path / "b", seed=2)
    out = tmp_path / "out"
    align_checkpoint(a, b, out, method="weight+orthogonal", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert load_file(out / ROTATION_FILE)["rotation"].shape == (64, 64)
    written = load_file(out / "model.safetensors")
    assert "lm_head.weight" in written
    assert torch.equal(written["model.norm.weight"], torch.ones(64))
    inputs = tiny_batch("llama_tied", seed=20)
    original: PreTrainedModel = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    aligned: PreTrainedModel = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not aligned.config.tie_word_embeddings
    assert max_abs_diff(model_outputs(original, inputs), model_outputs(aligned, inputs)) < 1e-4


def test_align_permutations_refuses_a_method_that_rotates(tmp_path: Path) -> None:
    with pytest.raises(AlignmentError, match="not a permutation"):
        align_permutations("weight+orthogonal", tmp_path / "a", tmp_path / "b")
