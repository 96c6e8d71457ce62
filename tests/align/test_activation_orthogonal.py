"""`activation+orthogonal`: Q by Procrustes on residual activations, the units by activation
matching; a planted rotation and permutations undone, B kept, post-LN models refused."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from hfmerge.align import align_basis, align_checkpoint
from hfmerge.align.activation_matching import activation_matching
from hfmerge.arch.residual import FOLDED, BasisMap, map_state_dict
from hfmerge.errors import AlignmentError
from tests.support.align import padded_batches
from tests.support.controls import tiny
from tests.support.rotation import random_orthogonal
from tests.support.tiny_models import (
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    save_tiny_model,
    tiny_batch,
)


def _params(model: PreTrainedModel, names: Mapping[str, object]) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items() if n in names}


def _mapped_copy(basis: BasisMap) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """The tiny float64 Llama read through `basis`, loaded as a model, and its tensors."""
    model_a, spec = tiny("llama")
    params_b = map_state_dict(_params(model_a, spec.tensors), spec, basis)
    model_b = make_tiny_model("llama", seed=77, dtype=torch.float64)
    model_b.load_state_dict(params_b, strict=True)
    return model_b, params_b


def test_a_planted_rotation_and_permutations_are_undone_to_1e_6() -> None:
    """B is A folded, every group permuted and the stream rotated: aligning B gives back A."""
    model_a, spec = tiny("llama")
    planted = BasisMap(
        nontrivial_permutations(spec, seed=4),
        fold=True,
        rotation=random_orthogonal(spec.groups["residual"].size, seed=6),
    )
    model_b, params_b = _mapped_copy(planted)
    batches = padded_batches("llama", seed=3)
    result = activation_matching(spec, model_a, model_b, batches, residual="rotate")
    assert result.rotation is not None
    assert torch.allclose(result.rotation @ result.rotation.T, torch.eye(64, dtype=torch.float64))
    assert "residual" not in result.correlation
    assert min(result.correlation.values()) > 0.99  # the same units matched
    aligned = map_state_dict(params_b, spec, result.basis)
    folded_a = map_state_dict(_params(model_a, spec.tensors), spec, FOLDED)
    assert aligned.keys() == folded_a.keys()
    for name, value in folded_a.items():
        assert torch.allclose(aligned[name], value, atol=1e-6, rtol=0), name


def test_permute_mode_is_unchanged_and_rotates_nothing() -> None:
    model_a, spec = tiny("llama")
    model_b, _ = _mapped_copy(BasisMap(nontrivial_permutations(spec, seed=2)))
    batches = padded_batches("llama", seed=3)
    permuted = activation_matching(spec, model_a, model_b, batches)
    rotated = activation_matching(spec, model_a, model_b, batches, residual="rotate")
    assert permuted.rotation is None
    assert "residual" in permuted.correlation
    # The unit groups are read inside blocks: the same answer either way.
    for group in spec.groups:
        if group != "residual":
            assert permuted.correlation[group] == rotated.correlation[group], group
    assert rotated.rotation is not None
    # A pure permutation of the stream is found as that permutation's matrix.
    residual = permuted.perms["residual"]
    assert isinstance(residual, torch.Tensor)
    expected = torch.eye(residual.numel(), dtype=torch.float64)[residual]
    assert torch.allclose(rotated.rotation, expected, atol=1e-6)


def test_the_aligned_model_keeps_its_own_logits(tmp_path: Path) -> None:
    """Two unrelated tiny Llamas through `hfmerge align`: B written rotated is still B."""
    a = save_tiny_model("llama", tmp_path / "a", seed=1)
    b = save_tiny_model("llama", tmp_path / "b", seed=2)
    out = tmp_path / "out"
    batches = padded_batches("llama", seed=3)
    result = align_checkpoint(
        a, b, out, method="activation+orthogonal", batches=batches, progress=False
    )
    assert result.rotation is not None
    assert not torch.allclose(result.rotation.abs(), torch.eye(64, dtype=torch.float64))
    from transformers import AutoModelForCausalLM

    inputs = tiny_batch("llama", seed=20)
    original = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    aligned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_abs_diff(model_outputs(original, inputs), model_outputs(aligned, inputs)) < 1e-4


def test_a_post_layernorm_pair_is_refused(tmp_path: Path) -> None:
    a = save_tiny_model("bert", tmp_path / "a", seed=1)
    b = save_tiny_model("bert", tmp_path / "b", seed=2)
    with pytest.raises(AlignmentError, match="not exact") as info:
        align_basis("activation+orthogonal", a, b, batches=padded_batches("bert"))
    assert "post-LN" in info.value.why
