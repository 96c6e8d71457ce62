"""`RunOptions`: where the options and the recipe both speak, the one rule that decides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfmerge.pipeline.options import RunOptions
from hfmerge.recipe.schema import Recipe, parse_recipe


def recipe(**sections: Any) -> Recipe:
    return parse_recipe({"models": ["a", "b"], "merge": {"method": "linear"}, **sections})


def routed(**sections: Any) -> Recipe:
    route = {"experts": [{"data": "builtin"}, {"data": "builtin"}]}
    return parse_recipe({"models": ["a", "b"], "route": route, **sections})


def test_output_dir_is_out_then_output_path_then_the_recipe_file_stem_then_the_kind() -> None:
    with_path = recipe(output={"path": "from/recipe"})
    assert RunOptions(out="given").output_dir(with_path) == Path("given")
    assert RunOptions(out=Path("given")).output_dir(with_path, recipe_file=Path("r.yaml")) == Path(
        "given"
    )
    assert RunOptions().output_dir(with_path, recipe_file=Path("r.yaml")) == Path("from/recipe")
    bare = recipe()
    assert RunOptions().output_dir(bare, recipe_file=Path("dir/ties.yaml")) == Path("out/ties")
    assert RunOptions().output_dir(bare) == Path("out/merged")
    assert RunOptions().output_dir(routed()) == Path("out/routed")
    assert RunOptions().output_dir(routed(), recipe_file=Path("r.yml")) == Path("out/r")


def test_push_and_privacy_come_from_the_options_else_the_recipe() -> None:
    pushing = recipe(output={"push": "org/from-recipe", "private": True})
    assert RunOptions().push_to(pushing) == "org/from-recipe"
    assert RunOptions(push="org/given").push_to(pushing) == "org/given"
    assert RunOptions().push_to(recipe()) is None
    assert RunOptions().keep_private(pushing) is True
    assert RunOptions(private=False).keep_private(pushing) is False
    assert RunOptions(private=True).keep_private(recipe()) is True
    assert RunOptions().keep_private(recipe()) is False
