"""Within-head maps of attention keep a model's function (float64, 1e-10), as the permutation
specs do; maps that break RoPE (mixing pairs, the wrong pairing, a q/k norm) do not."""

from __future__ import annotations

import pytest
import torch

from hfmerge.arch.head_maps import (
    compose_head_maps,
    identity_head_map,
    permuted_head_maps,
    qk_maps_exact,
    rotary_pairs,
)
from hfmerge.arch.residual import BasisMap, map_state_dict
from tests.support.controls import CHANGED, KEPT, outputs_after, state_of, tiny
from tests.support.head_maps import mixing_head_maps, random_head_maps
from tests.support.tiny_models import nontrivial_permutations

# GQA with RoPE over the half-split pairs; Qwen2 with q/k/v biases; SmolLM3 with a RoPE-free
# layer; Helium and ERNIE 4.5 with interleaved pairs and biases (ERNIE's on o_proj too).
ROPE_KINDS = ("llama", "qwen2", "smollm3", "helium", "ernie4_5")
# ERNIE 4.5's modeling code applies RoPE in float32 whatever the model's dtype, so a rotated
# pair is rounded there: exact only to float32 precision.
FLOAT32_ROPE = {"ernie4_5": 1e-5}


def _mapped(kind: str, basis: BasisMap) -> dict[str, torch.Tensor]:
    state, spec = state_of(kind)
    return map_state_dict(state, spec, basis)


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_pair_rotations_and_invertible_vo_maps_keep_the_logits(kind: str) -> None:
    _, spec = tiny(kind)
    assert qk_maps_exact(spec)
    maps = random_head_maps(spec, seed=3, invertible=True)
    state = _mapped(kind, BasisMap(head_maps=maps))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(state[q], state_of(kind)[0][q])  # a real map
    assert outputs_after(kind, state) < FLOAT32_ROPE.get(kind, KEPT)


def test_scaled_pair_rotations_keep_the_logits() -> None:
    """q takes s·R and k takes (s·R)⁻ᵀ = R/s per pair: q·k and RoPE both commute with it."""
    _, spec = tiny("llama")
    maps = random_head_maps(spec, seed=4, scaled=True)
    assert outputs_after("llama", _mapped("llama", BasisMap(head_maps=maps))) < KEPT


def test_head_maps_compose_with_permutations_fold_and_rotation() -> None:
    from tests.support.rotation import random_orthogonal

    _, spec = tiny("llama")
    basis = BasisMap(
        nontrivial_permutations(spec, seed=5),
        fold=True,
        rotation=random_orthogonal(spec.groups["residual"].size, seed=6),
        head_maps=random_head_maps(spec, seed=7, invertible=True),
    )
    assert outputs_after("llama", _mapped("llama", basis)) < KEPT


def test_maps_that_mix_rope_pairs_change_the_logits() -> None:
    """Negative control: an orthogonal Q/K map keeps q·k but not RoPE's position rotation."""
    _, spec = tiny("llama")
    state = _mapped("llama", BasisMap(head_maps=mixing_head_maps(spec, seed=8)))
    assert outputs_after("llama", state) > CHANGED


def test_rotating_the_half_split_pairs_of_an_interleaved_model_changes_the_logits() -> None:
    """Negative control: Helium pairs (2i, 2i+1); maps built on (i, i + d/2) are not exact."""
    _, spec = tiny("helium")
    half_split = tiny("llama")[1]
    assert not torch.equal(rotary_pairs(spec, 8), rotary_pairs(half_split, 8))
    maps = random_head_maps(half_split, seed=9)  # llama's pairing, helium's shapes
    wrong = {name: maps[name] for name in spec.groups if name in maps}
    assert all(m.qk.shape[1] == spec.groups[n].head_dim for n, m in wrong.items())
    assert outputs_after("helium", _mapped("helium", BasisMap(head_maps=wrong))) > CHANGED


def test_a_per_head_qk_norm_keeps_vo_maps_but_not_pair_rotations() -> None:
    """Qwen3 normalises q and k per dim before RoPE: pair rotations are refused there."""
    _, spec = tiny("qwen3")
    assert not qk_maps_exact(spec)
    vo_only = random_head_maps(spec, seed=10, invertible=True, qk=False)
    assert outputs_after("qwen3", _mapped("qwen3", BasisMap(head_maps=vo_only))) < KEPT
    rotated = random_head_maps(spec, seed=10)
    assert outputs_after("qwen3", _mapped("qwen3", BasisMap(head_maps=rotated))) > CHANGED


def test_a_broken_vo_map_changes_the_logits() -> None:
    """Negative control: v takes M but o_proj keeps its columns (M⁻¹ left out)."""
    kind = "llama"
    _, spec = tiny(kind)
    maps = random_head_maps(spec, seed=11, invertible=True)
    state, _ = state_of(kind)
    mapped = _mapped(kind, BasisMap(head_maps=maps))
    for layer in range(2):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        mapped[name] = state[name]
    assert outputs_after(kind, mapped) > CHANGED


def test_identity_maps_leave_every_tensor_unchanged() -> None:
    state, spec = state_of("qwen2")
    eye = {n: identity_head_map(g) for n, g in spec.groups.items() if g.kind == "attention"}
    mapped = map_state_dict(state, spec, BasisMap(head_maps=eye))
    for name, value in state.items():
        assert torch.allclose(mapped[name], value, atol=1e-14, rtol=0), name


def test_maps_of_own_heads_move_with_the_permutations() -> None:
    """Maps of B's own heads then permutations equal the permutations then the moved maps;
    composing maps equals applying them one after the other."""
    state, spec = state_of("llama")
    perms = nontrivial_permutations(spec, seed=3)
    own = random_head_maps(spec, seed=5, invertible=True)
    first = map_state_dict(
        map_state_dict(state, spec, BasisMap(head_maps=own)), spec, BasisMap(perms)
    )
    moved = map_state_dict(
        state, spec, BasisMap(perms, head_maps=permuted_head_maps(spec, perms, own))
    )
    then = random_head_maps(spec, seed=6, invertible=True, scaled=True)
    twice = map_state_dict(
        map_state_dict(state, spec, BasisMap(head_maps=own)), spec, BasisMap(head_maps=then)
    )
    once = map_state_dict(state, spec, BasisMap(head_maps=compose_head_maps(own, then)))
    for name, value in first.items():
        assert torch.allclose(moved[name], value, atol=1e-12, rtol=0), name
        assert torch.allclose(once[name], twice[name], atol=1e-12, rtol=0), name
    assert not torch.allclose(
        moved["model.layers.0.self_attn.v_proj.weight"],
        state["model.layers.0.self_attn.v_proj.weight"],
    )
