"""Solving within-head maps: the 2-D Procrustes of a pair, planted maps recovered to 1e-8, B kept,
and `align --out` writing them beside the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.align import HEAD_MAPS_FILE, align_checkpoint, load_head_maps
from hfmerge.align.head_maps import (
    head_map_matching,
    pair_rotations,
    solve_head_maps,
    with_head_maps,
)
from hfmerge.align.orthogonal import orthogonal_matching
from hfmerge.align.weight_matching import MatchResult
from hfmerge.arch.head_maps import HeadMaps
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.residual import FOLDED, BasisMap, map_state_dict
from hfmerge.arch.spec import ArchSpec
from tests.support.controls import KEPT, tiny, tiny_params
from tests.support.head_maps import pair_blocks, random_head_maps
from tests.support.rotation import random_orthogonal
from tests.support.tiny_models import (
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    save_tiny_model,
    tiny_batch,
)


def _assert_close(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(found[name], value, atol=1e-8, rtol=0), name


def test_pair_procrustes_finds_the_rotation_that_maps_b_onto_a() -> None:
    pairs = torch.tensor([[0, 2], [1, 3]])  # half-split pairs of a 4-dim head
    planted = pair_rotations(pairs, torch.eye(4, dtype=torch.float64))  # identity: angle 0
    assert torch.allclose(planted, torch.eye(4, dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    from hfmerge.arch.head_maps import pair_map

    rotation = pair_map(pairs, pair_blocks(2, generator))
    rows_b = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    rows_a = rotation @ rows_b
    found = pair_rotations(pairs, rows_a @ rows_b.T)  # C = Σ a bᵀ
    assert torch.allclose(found, rotation, atol=1e-12)


def test_planted_head_maps_are_undone_to_1e_8() -> None:
    """B is A folded with random pair rotations and V/O maps: the solver brings it back to A."""
    _, spec = tiny("llama")
    folded_a = map_state_dict(tiny_params("llama"), spec, FOLDED)
    planted = BasisMap(fold=True, head_maps=random_head_maps(spec, seed=1))
    folded_b = map_state_dict(folded_a, spec, planted)
    assert not torch.allclose(
        folded_b["model.layers.0.self_attn.k_proj.weight"],
        folded_a["model.layers.0.self_attn.k_proj.weight"],
    )
    maps = solve_head_maps(spec, folded_a, folded_b, FOLDED)
    _assert_close(map_state_dict(folded_b, spec, BasisMap(fold=True, head_maps=maps)), folded_a)


def _planted(spec: ArchSpec, head_maps: HeadMaps) -> BasisMap:
    """Every group permuted, the stream rotated and the heads mapped within."""
    return BasisMap(
        nontrivial_permutations(spec, seed=4),
        fold=True,
        rotation=random_orthogonal(spec.groups["residual"].size, seed=6),
        head_maps=head_maps,
    )


def test_head_maps_added_to_the_inverse_rotation_undo_a_planted_map() -> None:
    """`with_head_maps` given the rotation that undoes B's finds the head maps that undo the
    planted ones, to 1e-8."""
    _, spec = tiny("llama")
    params = tiny_params("llama")
    rotation = random_orthogonal(spec.groups["residual"].size, seed=6)
    planted = BasisMap(fold=True, rotation=rotation, head_maps=random_head_maps(spec, seed=2))
    params_b = map_state_dict(params, spec, planted)
    undone = MatchResult(identity_permutations(spec), 0, [], rotation=rotation.T)
    result = with_head_maps(spec, params, params_b, undone)
    _assert_close(
        map_state_dict(params_b, spec, result.basis), map_state_dict(params, spec, FOLDED)
    )


@pytest.mark.slow
def test_weight_orthogonal_undoes_planted_permutations_rotation_and_head_maps() -> None:
    """The whole `weight+orthogonal` on B = A permuted, rotated and mapped within its heads: back
    to A to 1e-4 (the alternations converge linearly and stop at a relative gain of 1e-9)."""
    _, spec = tiny("llama")
    params = tiny_params("llama")
    params_b = map_state_dict(params, spec, _planted(spec, random_head_maps(spec, seed=2)))
    result = head_map_matching(spec, params, params_b, sweeps=6)
    aligned = map_state_dict(params_b, spec, result.basis)
    for name, value in map_state_dict(params, spec, FOLDED).items():
        assert torch.allclose(aligned[name], value, atol=1e-4, rtol=0), name


def test_head_maps_keep_b_and_bring_it_closer_to_a_than_procrustes_alone() -> None:
    """Two unrelated tiny Llamas: B read through the maps is still B, and nearer to A."""
    _, spec = tiny("llama")
    model_b = make_tiny_model("llama", seed=9, dtype=torch.float64)
    params_a = tiny_params("llama")
    params_b = {n: t for n, t in model_b.state_dict().items() if n in spec.tensors}
    plain = orthogonal_matching(spec, params_a, params_b)
    result = head_map_matching(spec, params_a, params_b)
    assert result.objective[-1] > plain.objective[-1]
    aligned = make_tiny_model("llama", seed=77, dtype=torch.float64)
    aligned.load_state_dict(map_state_dict(params_b, spec, result.basis), strict=True)
    inputs = tiny_batch("llama", seed=20)
    assert max_abs_diff(model_outputs(model_b, inputs), model_outputs(aligned, inputs)) < KEPT


def test_qwen3_gets_vo_maps_only() -> None:
    """Qwen3's per-head q/k norm does not commute with a pair rotation: Q/K maps stay I."""
    _, spec = tiny("qwen3")
    model_b = make_tiny_model("qwen3", seed=9, dtype=torch.float64)
    params_b = {n: t for n, t in model_b.state_dict().items() if n in spec.tensors}
    result = head_map_matching(spec, tiny_params("qwen3"), params_b)
    assert result.head_maps is not None
    for head_map in result.head_maps.values():
        assert torch.equal(head_map.qk, torch.eye(16, dtype=torch.float64).expand_as(head_map.qk))
        assert not torch.allclose(head_map.vo, torch.eye(16, dtype=torch.float64))


def test_align_out_writes_the_head_maps_beside_the_weights(tmp_path: Path) -> None:
    a = save_tiny_model("llama", tmp_path / "a", seed=1)
    b = save_tiny_model("llama", tmp_path / "b", seed=2)
    out = tmp_path / "out"
    result = align_checkpoint(a, b, out, method="weight+orthogonal", progress=False)
    assert result.head_maps is not None
    saved = load_head_maps(out / HEAD_MAPS_FILE)
    assert saved.keys() == result.head_maps.keys() == {"layers.0.attn", "layers.1.attn"}
    for group, head_map in result.head_maps.items():
        assert torch.equal(saved[group].qk, head_map.qk)
        assert torch.equal(saved[group].vo, head_map.vo)
    inputs = tiny_batch("llama", seed=20)
    original: PreTrainedModel = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    aligned: PreTrainedModel = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_abs_diff(model_outputs(original, inputs), model_outputs(aligned, inputs)) < 1e-4
