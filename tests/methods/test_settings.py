"""Settings that vary per tensor: gradients over the layers and tensor-name filters."""

from __future__ import annotations

from typing import Any

import pytest

from hfmerge.arch.layers import layer_index, layer_of
from hfmerge.methods.settings import (
    UNSET,
    layer_positions,
    leaves,
    resolve,
    shape_problems,
    varies,
)


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.75), (1.0, 0.5)],
)
def test_a_gradient_interpolates_between_its_two_nearest_entries(t: float, expected: float) -> None:
    # Three entries at t = 0, 0.5 and 1.
    assert resolve([0.0, 1.0, 0.5], "any", t) == pytest.approx(expected)


def test_numeric_strings_interpolate_as_yaml_reads_1e_minus_5_as_a_string() -> None:
    assert resolve(["0", "1e-0"], "x", 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize(("t", "expected"), [(0.0, True), (0.5, True), (0.99, True), (1.0, False)])
def test_booleans_are_picked_not_blended(t: float, expected: bool) -> None:
    assert resolve([True, False], "x", t) is expected


def test_a_gradient_of_one_entry_is_that_entry_everywhere() -> None:
    assert [resolve([0.3], "x", t) for t in (0.0, 0.5, 1.0)] == [0.3, 0.3, 0.3]


def test_the_first_matching_filter_wins_and_an_entry_without_filter_matches_all() -> None:
    setting = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "attn", "value": 0.2},
        {"value": 0.9},
    ]
    assert resolve(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert resolve(setting, "transformer.h.0.attn.c_attn.weight", 0) == 0.2
    assert resolve(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.9
    assert resolve([{"filter": "*", "value": 4}], "anything", 0) == 4


def test_no_matching_filter_leaves_the_parameter_unset() -> None:
    assert resolve([{"filter": "mlp", "value": 0.5}], "lm_head.weight", 0) is UNSET
    assert resolve({"filter": "mlp", "value": 0.5}, "lm_head.weight", 0) is UNSET
    assert resolve([], "lm_head.weight", 0) is UNSET


def test_a_gradient_inside_a_filter_is_read_at_the_tensors_depth() -> None:
    setting = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert resolve(setting, "layers.3.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert resolve(setting, "layers.3.self_attn.q_proj.weight", 0.25) == 0.5


def test_single_values_do_not_vary_and_lists_and_filter_entries_do() -> None:
    assert not varies(0.5)
    assert not varies(True)
    assert not varies("0.5")
    assert varies([0.1, 0.2])
    assert varies({"filter": "mlp", "value": 0.2})


def test_leaves_name_every_single_value_with_its_path() -> None:
    setting = [{"filter": "mlp", "value": [0.1, 0.2]}, {"value": 0.9}]
    assert list(leaves(setting)) == [
        ((0, "value", 0), 0.1),
        ((0, "value", 1), 0.2),
        ((1, "value"), 0.9),
    ]
    assert list(leaves([0.4, 0.6])) == [((0,), 0.4), ((1,), 0.6)]
    assert list(leaves(0.3)) == [((), 0.3)]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ([0.1, {"filter": "mlp", "value": 0.2}], [((), "mixes")]),
        ([{"filter": "mlp"}], [((0,), "needs a `value:`")]),
        ([0.1, [0.2, 0.3]], [((1,), "single values")]),
        ([{"filter": "mlp", "value": [0.1, [0.2]]}], [((0, "value", 1), "single values")]),
        ([0.1, 0.2], []),
        (0.5, []),
    ],
)
def test_shape_problems_are_found_at_their_entry(setting: Any, expected: list[Any]) -> None:
    found = shape_problems(setting)
    assert [path for path, _ in found] == [path for path, _ in expected]
    for (_, message), (_, part) in zip(found, expected, strict=True):
        assert part in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.11.mlp.up_proj.weight", ("model.layers", 11)),
        ("transformer.h.2.attn.c_attn.weight", ("transformer.h", 2)),
        ("encoder.layer.5.attention.self.query.weight", ("encoder.layer", 5)),
        ("encoder.block.2.layer.0.SelfAttention.q.weight", ("encoder.block", 2)),
        ("decoder.block.0.layer.1.EncDecAttention.k.weight", ("decoder.block", 0)),
        ("blocks.7.norm1.weight", ("blocks", 7)),
        ("gpt_neox.layers.0.attention.dense.weight", ("gpt_neox.layers", 0)),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
        ("model.layers_norm.weight", None),
    ],
)
def test_the_block_of_a_tensor_is_read_from_its_name(
    name: str, expected: tuple[str, int] | None
) -> None:
    assert layer_of(name) == expected
    assert layer_index(name) == (None if expected is None else expected[1])


def test_depth_runs_from_0_to_1_per_stack_and_is_0_outside_the_blocks() -> None:
    names = [
        "embed.weight",
        *(f"encoder.block.{i}.w" for i in range(5)),
        *(f"decoder.block.{i}.w" for i in range(3)),
        "only.layers.0.w",
    ]
    depth = layer_positions({name: layer_of(name) for name in names})
    assert depth["embed.weight"] == 0.0
    assert [depth[f"encoder.block.{i}.w"] for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [depth[f"decoder.block.{i}.w"] for i in range(3)] == [0.0, 0.5, 1.0]
    assert depth["only.layers.0.w"] == 1.0  # mergekit's t for a stack of one layer
