"""Negative controls of the newer decoder families: each breaks one rule of its spec and must change
the outputs, next to a twin that keeps the rule and must not (see tests/support/controls.py).
"""

from __future__ import annotations

import pytest
import torch

from hfmerge.arch.permute import check_permutations, permute_state_dict
from tests.support.controls import (
    CHANGED,
    KEPT,
    attention_only,
    outputs_after,
    reversed_range,
    state_of,
)
from tests.support.tiny_models import nontrivial_permutations


def test_phi3_gate_and_up_halves_must_share_one_order() -> None:
    state, _ = state_of("phi3")  # intermediate 96: gate_up_proj rows are [gate 0..95 | up 96..191]
    gate_order = torch.randperm(96, generator=torch.Generator().manual_seed(3))
    up_order = torch.arange(95, -1, -1)
    base = "model.layers.1.mlp."

    def with_orders(gate: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(state)
        out[base + "gate_up_proj.weight"] = state[base + "gate_up_proj.weight"][
            torch.cat([gate, up + 96])
        ]
        out[base + "down_proj.weight"] = state[base + "down_proj.weight"][:, up]
        return out

    assert outputs_after("phi3", with_orders(gate_order, up_order)) > CHANGED
    assert outputs_after("phi3", with_orders(up_order, up_order)) < KEPT


def test_phi3_rotary_dims_are_pinned_and_the_pass_through_dims_are_free() -> None:
    state, spec = state_of("phi3")  # head_dim 8, partial_rotary_factor 0.5
    assert spec.groups["layers.0.attn"].qk_free_dims == (4, 8)
    rotary = attention_only(spec, 0, qk_dims=reversed_range(2, 8, 0, 4))
    with pytest.raises(ValueError, match="rotary"):
        check_permutations(spec, rotary)
    assert outputs_after("phi3", permute_state_dict(state, spec, rotary, check=False)) > CHANGED
    free = attention_only(spec, 0, qk_dims=reversed_range(2, 8, 4, 8))
    assert outputs_after("phi3", permute_state_dict(state, spec, free)) < KEPT


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "olmo2"])
def test_within_head_qk_permutation_breaks_rope(kind: str) -> None:
    state, spec = state_of(kind)
    group = spec.groups["layers.1.attn"]
    assert group.qk_free_dims == (0, 0)
    dims = reversed_range(group.num_kv_heads, group.head_dim, 0, group.head_dim)
    broken = attention_only(spec, 1, qk_dims=dims)
    assert outputs_after(kind, permute_state_dict(state, spec, broken, check=False)) > CHANGED
    kept = attention_only(spec, 1, vo_dims=dims)  # the same order on V/O is a symmetry
    assert outputs_after(kind, permute_state_dict(state, spec, kept)) < KEPT


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "exaone4"])
def test_per_head_qk_norm_stays_in_place_under_head_permutations(kind: str) -> None:
    state, spec = state_of(kind)
    name = "model.layers.0.self_attn.q_norm.weight"
    assert spec.tensors[name].axes == (None,)
    heads_moved = {"layers.0.attn": nontrivial_permutations(spec, seed=8)["layers.0.attn"]}
    permuted = permute_state_dict(state, spec, heads_moved)
    assert torch.equal(permuted[name], state[name])
    assert outputs_after(kind, permuted) < KEPT
    # Its entries are not interchangeable: reordering the shared gain changes the model.
    assert outputs_after(kind, {**permuted, name: state[name].flip(0)}) > CHANGED


@pytest.mark.parametrize("norm", ["q_norm", "k_norm"])
def test_olmo2_qk_norm_must_follow_the_projection_rows(norm: str) -> None:
    state, spec = state_of("olmo2")  # q_norm over all 64 query rows, k_norm over 16 key rows
    name = f"model.layers.1.self_attn.{norm}.weight"
    heads_moved = {"layers.1.attn": nontrivial_permutations(spec, seed=9)["layers.1.attn"]}
    permuted = permute_state_dict(state, spec, heads_moved)
    assert not torch.equal(permuted[name], state[name])
    assert outputs_after("olmo2", permuted) < KEPT
    assert outputs_after("olmo2", {**permuted, name: state[name]}) > CHANGED
