"""Permutation engine: hand-computed gather indices, algebra, validation, and negative controls.

Each negative control breaks one rule of the symmetry and must change the outputs clearly, next to a
twin that keeps the rule and must not.
"""

from __future__ import annotations

import pytest
import torch

from hfmerge.arch.permute import (
    axis_index,
    check_permutations,
    compose,
    identity_permutations,
    invert,
    permute_state_dict,
    permute_tensor,
    random_permutations,
    unit_rows,
)
from hfmerge.arch.spec import ArchSpec, AttentionPerm, Layout, PermGroup, Permutations
from tests.support.controls import (
    CHANGED,
    KEPT,
    attention_only,
    attention_perm,
    outputs_after,
    reversed_range,
    state_of,
    tiny,
)
from tests.support.tiny_models import (
    nontrivial_permutations,
)

# 4 query heads over 2 KV heads, head_dim 2. New KV slot 0 holds old KV head 1 (old query heads 2,
# 3, taken in order 3, 2); slot 1 holds old KV head 0 (query heads 0, 1 in order).
GQA = PermGroup(
    "layers.0.attn", "attention", 8, num_heads=4, num_kv_heads=2, head_dim=2, qk_free_dims=(0, 2)
)
GQA_PERM = AttentionPerm(
    kv_heads=torch.tensor([1, 0]),
    q_in_group=torch.tensor([[1, 0], [0, 1]]),
    qk_dims=torch.tensor([[1, 0], [0, 1]]),
    vo_dims=torch.tensor([[0, 1], [1, 0]]),
)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (Layout.Q, [7, 6, 5, 4, 0, 1, 2, 3]),
        (Layout.K, [3, 2, 0, 1]),
        (Layout.V, [2, 3, 1, 0]),
        (Layout.O, [6, 7, 4, 5, 1, 0, 3, 2]),
        (Layout.QKV_CONCAT, [7, 6, 5, 4, 0, 1, 2, 3, 11, 10, 8, 9, 14, 15, 13, 12]),
    ],
)
def test_axis_index_by_hand_gqa(layout: Layout, expected: list[int]) -> None:
    assert axis_index(GQA, GQA_PERM, layout).tolist() == expected


def test_axis_index_by_hand_per_head_qkv() -> None:
    group = PermGroup(
        "layers.0.attn",
        "attention",
        4,
        num_heads=2,
        num_kv_heads=2,
        head_dim=2,
        qk_free_dims=(0, 2),
    )
    perm = AttentionPerm(
        kv_heads=torch.tensor([1, 0]),
        q_in_group=torch.zeros(2, 1, dtype=torch.long),
        qk_dims=torch.tensor([[1, 0], [0, 1]]),
        vo_dims=torch.tensor([[1, 0], [0, 1]]),
    )
    # New head 0 = old head 1 (rows 6..11: q 6,7 k 8,9 v 10,11); new head 1 = old head 0.
    assert axis_index(group, perm, Layout.QKV_PER_HEAD).tolist() == [
        7,
        6,
        9,
        8,
        11,
        10,
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    gqa_perm = identity_permutations(_spec_with(GQA))[GQA.name]
    with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
        axis_index(GQA, gqa_perm, Layout.QKV_PER_HEAD)


def test_axis_index_refuses_mismatched_layouts() -> None:
    residual = PermGroup("residual", "residual", 4)
    with pytest.raises(ValueError, match="units"):
        axis_index(residual, torch.arange(4), Layout.Q)
    with pytest.raises(ValueError, match="AttentionPerm"):
        axis_index(GQA, GQA_PERM, Layout.UNITS)
    assert axis_index(residual, torch.tensor([2, 0, 3, 1]), Layout.UNITS).tolist() == [2, 0, 3, 1]


def test_axis_index_by_hand_units_pair() -> None:
    ff = PermGroup("layers.0.mlp", "ff", 3)
    # [gate | up]: gate rows 0..2 and up rows 3..5 each follow the one FF order.
    assert axis_index(ff, torch.tensor([2, 0, 1]), Layout.UNITS_PAIR).tolist() == [2, 0, 1, 5, 3, 4]
    with pytest.raises(ValueError, match="units"):
        axis_index(GQA, GQA_PERM, Layout.UNITS_PAIR)
    rows = torch.arange(12.0).reshape(6, 2)  # [gate 0..2 | up 0..2] rows, 2 columns each
    # Unit u's row is its gate row then its up row, so one order moves both halves.
    assert unit_rows(rows, Layout.UNITS_PAIR).tolist() == [
        [0.0, 1.0, 6.0, 7.0],
        [2.0, 3.0, 8.0, 9.0],
        [4.0, 5.0, 10.0, 11.0],
    ]
    assert unit_rows(rows, Layout.UNITS) is rows


def _spec_with(*groups: PermGroup) -> ArchSpec:
    return ArchSpec("test", "test", {g.name: g for g in groups}, {})


def _assert_equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Every layout and bias pattern, and each kind of q/k norm.
FAMILY_KINDS = [
    "bert",
    "gpt2",
    "gpt_neox",
    "llama",
    "qwen2",
    "phi3",
    "qwen3",
    "olmo2",
    "gemma3_text",
]


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_inverse_undoes_and_compose_chains(kind: str) -> None:
    state, spec = state_of(kind)
    p = nontrivial_permutations(spec, seed=10)
    q = nontrivial_permutations(spec, seed=11)
    once = permute_state_dict(state, spec, p)
    _assert_equal_dicts(permute_state_dict(once, spec, invert(spec, p)), state)
    _assert_equal_dicts(
        permute_state_dict(once, spec, q), permute_state_dict(state, spec, compose(spec, p, q))
    )
    _assert_equal_dicts(permute_state_dict(state, spec, identity_permutations(spec)), state)
    for perms in (invert(spec, p), compose(spec, p, q), compose(spec, p, invert(spec, p))):
        check_permutations(spec, perms)
    round_trip = compose(spec, p, invert(spec, p))
    _assert_equal_dicts(permute_state_dict(state, spec, round_trip), state)


def test_compose_treats_missing_groups_as_identity() -> None:
    state, spec = state_of("llama")
    p = nontrivial_permutations(spec, seed=12)
    only_residual = {"residual": p["residual"]}
    composed = compose(spec, only_residual, p)
    assert set(composed) == set(p)
    twice = permute_state_dict(permute_state_dict(state, spec, only_residual), spec, p)
    _assert_equal_dicts(twice, permute_state_dict(state, spec, composed))


def test_groups_missing_from_perms_leave_their_axes_alone() -> None:
    state, spec = state_of("llama")
    residual = nontrivial_permutations(spec, seed=13)["residual"]
    assert isinstance(residual, torch.Tensor)
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = permute_tensor(state[name], spec.tensors[name], spec, {"residual": residual})
    assert torch.equal(moved, state[name][:, residual])


def test_permuting_keeps_dtype_and_values() -> None:
    state, spec = state_of("gpt2")
    halves = {name: t.to(torch.bfloat16) for name, t in state.items()}
    perms = nontrivial_permutations(spec, seed=14)
    out = permute_state_dict(halves, spec, perms)
    reference = permute_state_dict(state, spec, perms)
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_random_permutations_respect_rotary_and_are_seeded() -> None:
    _, neox = tiny("gpt_neox")
    perms = random_permutations(neox, torch.Generator().manual_seed(0))
    again = random_permutations(neox, torch.Generator().manual_seed(0))
    attn = perms["layers.0.attn"]
    assert isinstance(attn, AttentionPerm)
    start, end = neox.groups["layers.0.attn"].qk_free_dims
    assert torch.equal(attn.qk_dims[:, :start], torch.arange(start).repeat(4, 1))
    assert not torch.equal(attn.qk_dims[:, start:end], torch.arange(start, end).repeat(4, 1))
    assert torch.equal(attn.qk_dims, attention_perm(again, "layers.0.attn").qk_dims)
    _, llama = tiny("llama")
    for _ in range(5):
        rope = attention_perm(random_permutations(llama, torch.Generator()), "layers.1.attn")
        assert torch.equal(rope.qk_dims, torch.arange(8).repeat(2, 1))


def test_check_permutations_rejects_malformed_perms() -> None:
    _, spec = tiny("llama")
    good = identity_permutations(spec)
    check_permutations(spec, good)
    attn = attention_perm(good, "layers.0.attn")
    bad: list[tuple[Permutations, str]] = [
        ({"residual": torch.arange(63)}, "shape"),
        ({"residual": torch.zeros(64, dtype=torch.long)}, "not a permutation"),
        ({"residual": torch.arange(64.0)}, "dtype"),
        ({"layers.9.mlp": torch.arange(96)}, "not a permutation group"),
        ({"layers.0.mlp": attn}, "plain index"),
        ({"layers.0.attn": torch.arange(64)}, "AttentionPerm"),
        (
            {
                "layers.0.attn": AttentionPerm(
                    attn.kv_heads, attn.q_in_group[:, :2], attn.qk_dims, attn.vo_dims
                )
            },
            "q_in_group has shape",
        ),
        (
            {
                "layers.0.attn": AttentionPerm(
                    attn.kv_heads, attn.q_in_group, attn.qk_dims.flip(1), attn.vo_dims
                )
            },
            "rotary",
        ),
    ]
    for perms, message in bad:
        with pytest.raises(ValueError, match=message):
            check_permutations(spec, perms)
        with pytest.raises(ValueError, match=message):
            permute_state_dict({}, spec, perms)


def test_permute_state_dict_refuses_unknown_names_and_wrong_shapes() -> None:
    state, spec = state_of("llama")
    perms = identity_permutations(spec)
    with pytest.raises(ValueError, match=r"extra\.weight"):
        permute_state_dict({**state, "extra.weight": torch.zeros(2)}, spec, perms)
    name = "model.norm.weight"
    with pytest.raises(ValueError, match="axis 0 has 63"):
        permute_state_dict({name: state[name][:63]}, spec, perms)


# --- negative controls: each breaks one rule and must change the outputs -------------------------


def test_within_head_qk_permutation_breaks_rope() -> None:
    state, spec = state_of("llama")
    qk = reversed_range(2, 8, 0, 8)
    broken = attention_only(spec, 0, qk_dims=qk)
    with pytest.raises(ValueError, match="rotary"):
        check_permutations(spec, broken)
    assert outputs_after("llama", permute_state_dict(state, spec, broken, check=False)) > CHANGED
    # Twin: the same within-head order on V/O is a symmetry even with RoPE.
    kept = attention_only(spec, 0, vo_dims=qk)
    assert outputs_after("llama", permute_state_dict(state, spec, kept)) < KEPT


def test_rotary_dims_of_neox_are_pinned_but_the_rest_are_free() -> None:
    state, spec = state_of("gpt_neox")
    start, end = spec.groups["layers.1.attn"].qk_free_dims
    assert (start, end) == (4, 16)
    rotary = attention_only(spec, 1, qk_dims=reversed_range(4, 16, 0, start))
    assert outputs_after("gpt_neox", permute_state_dict(state, spec, rotary, check=False)) > CHANGED
    free = attention_only(spec, 1, qk_dims=reversed_range(4, 16, start, end))
    assert outputs_after("gpt_neox", permute_state_dict(state, spec, free)) < KEPT


def _swap_query_heads(state: dict[str, torch.Tensor], a: int, b: int) -> dict[str, torch.Tensor]:
    """Swap query heads a and b of layer 0 (q_proj rows, o_proj columns), keys/values untouched."""
    heads = torch.arange(8)
    heads[[a, b]] = heads[[b, a]]
    rows = (heads[:, None] * 8 + torch.arange(8)).reshape(-1)  # [heads, head_dim] -> [heads*8]
    out = dict(state)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    out[q] = state[q].index_select(0, rows)
    out[o] = state[o].index_select(1, rows)
    return out


def test_query_head_must_move_with_its_kv_group() -> None:
    state, _ = state_of("llama")  # 4 query heads per KV head: heads 0-3 read KV 0, heads 4-7 KV 1
    assert outputs_after("llama", _swap_query_heads(state, 0, 4)) > CHANGED
    assert outputs_after("llama", _swap_query_heads(state, 0, 3)) < KEPT  # same KV group


def test_gate_and_up_must_share_one_permutation() -> None:
    state, _ = state_of("llama")
    gate_order, up_order = (
        torch.randperm(96, generator=torch.Generator().manual_seed(3)),
        torch.arange(95, -1, -1),
    )
    base = "model.layers.1.mlp."

    def with_orders(gate: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(state)
        out[base + "gate_proj.weight"] = state[base + "gate_proj.weight"][gate]
        out[base + "up_proj.weight"] = state[base + "up_proj.weight"][up]
        out[base + "down_proj.weight"] = state[base + "down_proj.weight"][:, up]
        return out

    assert outputs_after("llama", with_orders(gate_order, up_order)) > CHANGED
    assert outputs_after("llama", with_orders(up_order, up_order)) < KEPT


@pytest.mark.parametrize(
    ("reads", "writes"),
    [
        (("query", "key"), ()),  # Q/K circuit
        (("value",), ("attention.output.dense",)),  # V/O circuit
    ],
)
def test_full_width_permutation_crosses_heads(
    reads: tuple[str, ...], writes: tuple[str, ...]
) -> None:
    state, _ = state_of("bert")  # 4 heads of 8 dims, no RoPE: within-head orders are free
    cross = torch.randperm(32, generator=torch.Generator().manual_seed(4))
    within = (torch.arange(4)[:, None] * 8 + torch.arange(7, -1, -1)).reshape(-1)  # [4, 8] -> [32]
    base = "bert.encoder.layer.0."

    def with_order(order: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(state)
        for proj in reads:
            for suffix in ("weight", "bias"):
                name = f"{base}attention.self.{proj}.{suffix}"
                out[name] = state[name][order]
        for proj in writes:
            out[f"{base}{proj}.weight"] = state[f"{base}{proj}.weight"][:, order]
        return out

    assert outputs_after("bert", with_order(cross)) > CHANGED
    assert outputs_after("bert", with_order(within)) < KEPT


@pytest.mark.parametrize(
    ("kind", "norm"),
    [
        ("llama", "model.layers.1.post_attention_layernorm.weight"),
        ("bert", "bert.encoder.layer.0.attention.output.LayerNorm.weight"),
        ("gpt_neox", "gpt_neox.final_layer_norm.bias"),
        ("gemma", "model.norm.weight"),  # offset gain: still one entry per channel
        ("gemma2", "model.layers.0.pre_feedforward_layernorm.weight"),
        ("gemma3_text", "model.layers.1.post_feedforward_layernorm.weight"),
        ("olmo2", "model.layers.0.post_attention_layernorm.weight"),
        ("phi3", "model.layers.1.input_layernorm.weight"),
    ],
)
def test_residual_permutation_must_reach_every_norm(kind: str, norm: str) -> None:
    state, spec = state_of(kind)
    residual = {"residual": nontrivial_permutations(spec, seed=5)["residual"]}
    permuted = permute_state_dict(state, spec, residual)
    assert outputs_after(kind, permuted) < KEPT
    skipped = {**permuted, norm: state[norm]}
    assert outputs_after(kind, skipped) > CHANGED
