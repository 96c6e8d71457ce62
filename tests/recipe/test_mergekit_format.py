"""mergekit's flat config read as a recipe: the translation, its refusals and notes, `convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hfmerge import api
from hfmerge.cli.app import main
from hfmerge.errors import RecipeError
from hfmerge.methods import METHODS, get_method
from hfmerge.methods.schedule import schedule_for
from hfmerge.recipe.schema import Recipe, load_recipe, parse_recipe, parse_recipe_text

PRUNED = {"weight": 0.5, "density": 0.6}
# One mergekit example per method hfmerge has: (global parameters, per-model parameters).
EXAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": False}, {"weight": 0.5}),
    "task_arithmetic": ({"lambda": 0.8, "normalize": True}, {"weight": 0.7}),
    "ties": ({"normalize": True}, PRUNED),
    "dare_ties": ({"rescale": False}, PRUNED),
    "dare_linear": ({"lambda": 1.2}, PRUNED),
    "breadcrumbs": ({}, {**PRUNED, "gamma": 0.02}),
    "breadcrumbs_ties": ({"normalize": True}, {**PRUNED, "gamma": 0.02}),
    "della": ({"rescale": True}, {**PRUNED, "epsilon": 0.1}),
    "della_linear": ({}, {**PRUNED, "epsilon": 0.1}),
    "slerp": ({"t": 0.3}, {}),
    "model_stock": ({"filter_wise": True}, {}),
    "nearswap": ({"t": 0.01}, {}),
    "nuslerp": ({"nuslerp_flatten": False}, {"weight": 0.3}),
    "multislerp": ({"normalize_weights": False, "eps": 1e-7}, {"weight": 0.4}),
    "karcher": ({"max_iter": 5, "tol": 1e-4}, {}),
    "sce": ({"select_topk": 0.5}, {}),
    "arcee_fusion": ({}, {}),
    "passthrough": ({}, {"scale": 0.5}),
}

TWO_MODELS = {"slerp", "nearswap", "arcee_fusion"}  # a base and exactly one other model
NO_BASE = {"nuslerp"}  # two models, no base_model
ONE_MODEL = {"passthrough"}  # one model, no base_model (a copy, e.g. to change the dtype)


def base_and_models(method: str) -> tuple[str | None, list[str]]:
    """The example's base (org/base; org/a in TWO_MODELS; none in NO_BASE) and its models."""
    if method in ONE_MODEL:
        return None, ["org/a"]
    if method in NO_BASE:
        return None, ["org/a", "org/b"]
    if method in TWO_MODELS:
        return "org/a", ["org/a", "org/b"]
    return "org/base", ["org/base", "org/a", "org/b"]


def mergekit_yaml(method: str, **extra: Any) -> str:
    """A mergekit config of `method` over org/a and org/b (`base_and_models`)."""
    globals_, per_model = EXAMPLES[method]
    base, models = base_and_models(method)
    config: dict[str, Any] = {
        "models": [
            {"model": m, **({"parameters": per_model} if per_model and m != base else {})}
            for m in models
        ],
        "merge_method": method,
        **({"base_model": base} if base else {}),
        **({"parameters": globals_} if globals_ else {}),
        "dtype": "bfloat16",
        **extra,
    }
    return yaml.safe_dump(config, sort_keys=False)


def problems_of(text: str) -> list[tuple[str, int | None]]:
    """(location, line) of every problem `text` is reported with."""
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text, source="config.yml")
    return [(p.location, p.line) for p in caught.value.problems]


def test_the_methods_mergekit_shares_with_hfmerge_are_all_translated() -> None:
    assert set(EXAMPLES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_each_method_translates_to_the_recipe_written_by_hand(method: str) -> None:
    globals_, per_model = EXAMPLES[method]
    base, models = base_and_models(method)
    expected = parse_recipe(
        {
            "models": [{"model": m, **(per_model if m != base else {})} for m in models],
            **({"base": base} if base else {}),
            "merge": {"method": method, "parameters": globals_},
            "output": {"dtype": "bfloat16"},
        }
    )
    assert parse_recipe_text(mergekit_yaml(method)) == expected


def test_per_model_parameters_in_the_top_level_parameters_apply_to_every_non_base_model() -> None:
    text = """
models:
  - model: org/base
  - model: org/a
  - model: org/b
    parameters: {weight: 0.2}
merge_method: ties
base_model: org/base
parameters: {weight: 0.7, density: 0.4, normalize: false}
"""
    recipe = parse_recipe_text(text)
    assert [m.method_params for m in recipe.models] == [{}, {}, {"weight": 0.2}]
    assert recipe.merge is not None
    # Under `parameters`, a per-model parameter is every model's default, as in mergekit.
    assert recipe.merge.parameters == {"weight": 0.7, "density": 0.4, "normalize": False}
    method = get_method("ties")
    schedule = schedule_for(
        method, recipe.merge.parameters, [m.method_params for m in recipe.models[1:]]
    )
    typed = schedule.at("model.layers.0.mlp.up_proj.weight", 0.0)
    dumped = [p.model_dump() for p in typed.models]
    assert [(p["weight"], p["density"]) for p in dumped] == [(0.7, 0.4), (0.2, 0.4)]


def test_a_base_missing_from_models_is_merged_by_linear_as_mergekit_does() -> None:
    text = "models: [{model: a}, {model: b}]\nmerge_method: linear\nbase_model: c\n"
    assert [m.model for m in parse_recipe_text(text).models] == ["a", "b", "c"]
    # A task-vector method takes it as the base: not listed again unless a second model is needed.
    ties = "models: [{model: a}, {model: b}]\nmerge_method: ties\nbase_model: c\n"
    assert [m.model for m in parse_recipe_text(ties).models] == ["a", "b"]
    one = "models: [{model: a}]\nmerge_method: task_arithmetic\nbase_model: c\n"
    recipe = parse_recipe_text(one)
    assert [m.model for m in recipe.models] == ["a", "c"]
    assert recipe.base == "c"


def test_multislerp_takes_a_base_model_as_the_base_and_runs_without_one() -> None:
    # mergekit's multislerp has an optional base: with one it interpolates the task vectors.
    text = "models: [{model: a}, {model: b}]\nmerge_method: multislerp\nbase_model: c\n"
    recipe = parse_recipe_text(text)
    assert ([m.model for m in recipe.models], recipe.base) == (["a", "b"], "c")
    alone = parse_recipe_text("models: [{model: a}, {model: b}]\nmerge_method: multislerp\n")
    assert ([m.model for m in alone.models], alone.base) == (["a", "b"], None)


def test_a_revision_beside_a_model_is_kept_so_a_pinned_saved_config_runs_again() -> None:
    # A run saves the config with each Hub model pinned: `revision:` beside `model:`.
    text = """
models:
  - {model: org/a, revision: abc123, parameters: {weight: 0.4}}
  - {model: org/b}
merge_method: linear
"""
    first = parse_recipe_text(text).models[0]
    assert (first.ref, first.method_params) == ("org/a@abc123", {"weight": 0.4})


@pytest.mark.parametrize(
    ("keys", "written"),
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "float32", "out_dtype": "float16"}, "float16"),
        ({"dtype": "torch.float16"}, "float16"),
        ({}, None),
    ],
)
def test_the_written_dtype_is_out_dtype_else_dtype(keys: dict[str, str], written: str) -> None:
    text = "models: [{model: a}, {model: b}]\nmerge_method: linear\n" + "".join(
        f"{key}: {value}\n" for key, value in keys.items()
    )
    assert parse_recipe_text(text).output.dtype == written


def test_every_problem_of_a_config_is_reported_at_once_at_its_own_line() -> None:
    text = """\
models:
  - model: org/a
    parameters:
      density: [0.1, 1.5, 0.9]
  - model: org/b
    parameters:
      weight:
        - filter: mlp
        - value: 1.0
      desnity: 0.5
    extra: 1
merge_method: ties
base_model: org/base
modules: {}
parameters:
  t: 0.5
tokenizer_source: union
tokenizer: {source: union}
chat_template: chatml
nonsense: 1
"""
    assert sorted(problems_of(text), key=lambda p: p[1] or 0) == [
        ("models.0.parameters.density.1", 4),
        ("models.1.parameters.weight.0", 8),
        ("models.1.parameters.desnity", 10),
        ("models.1.extra", 11),
        ("modules", 14),
        ("parameters.t", 16),
        ("tokenizer_source", 17),  # given twice: as tokenizer_source and as tokenizer:
        ("nonsense", 20),
    ]


def test_the_refusals_say_what_is_not_supported_yet() -> None:
    text = "modules: {}\nmerge_method: slerp\nparameters: {t: [0, 1]}\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    messages = {p.location: p.message for p in caught.value.problems}
    assert "not supported yet" in messages["modules"]
    assert "parameters.t" not in messages  # a gradient is a setting like any other


def test_nuslerp_with_a_base_model_is_refused_at_the_base_model() -> None:
    # mergekit's nuslerp with a base interpolates task vectors: refused, not merged otherwise.
    text = "models: [{model: a}, {model: b}]\nmerge_method: nuslerp\nbase_model: c\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    [problem] = caught.value.problems
    assert (problem.location, problem.line) == ("base_model", 3)
    assert "not supported yet" in problem.message


def test_a_method_hfmerge_lacks_is_named_with_every_method_hfmerge_has() -> None:
    text = "models: [{model: a}, {model: b}]\nmerge_method: ram\nbase_model: a\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    [problem] = caught.value.problems
    assert (problem.location, problem.line) == ("merge_method", 2)
    assert "'ram'" in problem.message
    assert all(name in problem.message for name in METHODS)


def test_a_missing_parameter_and_a_bad_value_point_at_the_config_keys() -> None:
    text = """\
models:
  - model: a
  - model: b
    parameters: {density: 1.5}
merge_method: ties
base_model: a
"""
    assert problems_of(text) == [("models.1.parameters.density", 4)]
    slerp = "models: [{model: a}, {model: b}]\nmerge_method: slerp\nbase_model: a\n"
    assert problems_of(slerp) == [("parameters.t", None)]


def test_switches_hfmerge_does_not_need_are_dropped_with_a_note_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = """\
models:
  - model: a
    parameters: {weight: 1.0, density: 0.5}
  - model: b
    parameters: {weight: 1.0}
merge_method: task_arithmetic
base_model: c
parameters: {int8_mask: true, rescale: true}
lazy_unpickle: true
allow_crimes: true
dtype: float16
"""
    recipe = parse_recipe_text(text)
    assert [m.method_params for m in recipe.models] == [{"weight": 1.0}, {"weight": 1.0}]
    assert recipe.merge is not None
    assert recipe.merge.parameters == {}
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 6
    assert all(line.startswith("note: ") for line in notes)
    for key in ("int8_mask", "rescale", "density", "lazy_unpickle", "allow_crimes", "dtype"):
        assert any(key in line for line in notes), key


def test_tokenizer_source_base_is_accepted_silently(capsys: pytest.CaptureFixture[str]) -> None:
    text = "models: [{model: a}, {model: b}]\nmerge_method: linear\ntokenizer_source: base\n"
    assert parse_recipe_text(text).merge is not None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_convert_prints_a_recipe_that_parses_to_the_same_recipe(
    method: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.yml"
    config.write_text(mergekit_yaml(method, parameters={**EXAMPLES[method][0], "int8_mask": True}))
    converted = api.convert(config)
    assert converted.startswith("# Converted by `hfmerge convert` from the mergekit config")
    assert "hfmerge run" in converted
    assert "# Note: parameters.int8_mask" in converted
    recipe: Recipe = parse_recipe_text(converted)
    assert "merge_method" not in yaml.safe_load(converted)  # a plain hfmerge recipe
    assert recipe == load_recipe(config)


def test_convert_refuses_what_is_not_a_mergekit_config(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("models: [a, b]\nmerge: {method: linear}\n")
    with pytest.raises(RecipeError, match="not a mergekit config"):
        api.convert(recipe)


def test_convert_reports_the_configs_problems_with_their_lines(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text("models: [{model: a}]\nmerge_method: ties\nslices: []\n")
    with pytest.raises(RecipeError) as caught:
        api.convert(config)
    assert ("slices", 3) in [(p.location, p.line) for p in caught.value.problems]


def test_the_convert_command_prints_the_recipe_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yml"
    config.write_text(mergekit_yaml("ties"))
    assert main(["convert", str(config)]) == 0
    out = capsys.readouterr().out
    assert parse_recipe_text(out) == load_recipe(config)


@pytest.mark.mergekit
@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_hfmerge_defaults_are_mergekits_for_every_shared_parameter(method: str) -> None:
    """The translation copies no default: it relies on hfmerge's being mergekit's."""
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    spec = registry.get(method).spec
    ours = {
        f.alias or name: f.default
        for cls in (METHODS[method].params, METHODS[method].model_params)
        for name, f in cls.model_fields.items()
    }
    for parameter in spec.parameters:
        if parameter.name in ours and not parameter.required:
            assert ours[parameter.name] == parameter.default, parameter.name
