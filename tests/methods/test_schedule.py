"""A merge's settings resolved per tensor: precedence, per-value checks and per-tensor errors."""

from __future__ import annotations

import pytest

from hfmerge.errors import MethodParameterError, RecipeError
from hfmerge.methods import get_method
from hfmerge.methods.params import WeightedModelParams, as_params
from hfmerge.methods.schedule import schedule_for
from hfmerge.recipe.schema import parse_recipe_text

ATTN = "model.layers.1.self_attn.q_proj.weight"
MLP = "model.layers.1.mlp.up_proj.weight"


def weights(params: tuple[object, ...]) -> list[float]:
    return [float(as_params(p, WeightedModelParams).weight) for p in params]


def test_a_models_own_setting_beats_the_default_and_falls_through_where_no_filter_matches() -> None:
    schedule = schedule_for(
        get_method("linear"),
        {"weight": [{"filter": "mlp", "value": 0.25}]},
        [{"weight": [{"filter": "self_attn", "value": 3.0}]}, {}],
    )
    assert weights(schedule.at(ATTN, 0.5).models) == [3.0, 1.0]  # the method's default: 1
    assert weights(schedule.at(MLP, 0.5).models) == [0.25, 0.25]
    assert weights(schedule.at("lm_head.weight", 0.0).models) == [1.0, 1.0]


def test_equal_settings_share_one_typed_object() -> None:
    schedule = schedule_for(get_method("slerp"), {"t": [0.0, 1.0]}, [{}])
    assert schedule.at(ATTN, 0.5) is schedule.at(MLP, 0.5)
    assert schedule.at(ATTN, 0.5) is not schedule.at(ATTN, 0.75)
    assert schedule.varies
    assert not schedule_for(get_method("slerp"), {"t": 0.5}, [{}]).varies


def test_each_value_of_a_gradient_is_checked_at_its_own_place() -> None:
    schedule = schedule_for(
        get_method("ties"),
        {"density": [0.5, 1.5]},
        [{"weight": 1.0}, {"density": [{"filter": "mlp", "value": -0.1}, {"value": 0.2}]}],
    )
    places = sorted(".".join(map(str, loc)) for loc, _ in schedule.problems())
    assert places == ["models.1.density.0.value", "parameters.density.1"]


def test_weights_that_cancel_in_some_tensor_name_that_tensor() -> None:
    schedule = schedule_for(
        get_method("linear"),
        {},
        [{"weight": [{"filter": "mlp", "value": -1.0}, {"value": 1.0}]}, {"weight": 1.0}],
    )
    assert schedule.problems() == []  # every value is fine alone
    assert weights(schedule.at(ATTN, 0.0).models) == [1.0, 1.0]
    with pytest.raises(MethodParameterError) as caught:
        schedule.at(MLP, 0.0)
    assert MLP in str(caught.value)


def test_repair_needs_one_weight_per_model() -> None:
    text = """\
models:
  - model: a
    weight: [0.2, 0.8]
  - b
align: {method: weight, repair: true}
merge: {method: linear}
"""
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    problems = {p.location: p for p in caught.value.problems}
    assert problems["models.0.weight"].line == 3
    assert "REPAIR" in problems["models.0.weight"].message
    schedule = schedule_for(get_method("linear"), {}, [{"weight": [0.2, 0.8]}, {}])
    with pytest.raises(MethodParameterError, match="one value per model"):
        schedule.constant_models()


def test_a_native_recipe_takes_gradients_and_filters_and_locates_bad_values() -> None:
    good = """\
models: [a, b]
base: a
merge:
  method: slerp
  parameters:
    t:
      - {filter: self_attn, value: [0, 0.5, 1]}
      - value: 0.5
"""
    assert parse_recipe_text(good).merge is not None
    bad = good.replace("value: 0.5", "value: yes")
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(bad)
    [problem] = caught.value.problems
    assert problem.location == "merge.parameters.t.1.value"
    assert problem.line == 8


def test_the_card_shows_a_varying_setting_as_given() -> None:
    setting = [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]
    schedule = schedule_for(get_method("ties"), {"density": setting}, [{"weight": 1.0}, {}])
    method, inputs = schedule.card_values()
    assert method["lambda"] == 1.0
    assert [one["density"] for one in inputs] == [setting, setting]
    assert [one["weight"] for one in inputs] == [1.0, 1.0]
