"""Every shipped recipe is valid and documents the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.recipe.schema import load_recipe
from tests.support import REPO_ROOT

ROOT = REPO_ROOT
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.name))
def test_recipe_loads_and_names_its_command(path: Path) -> None:
    recipe = load_recipe(path)
    assert len(recipe.models) >= 2
    command = f"hfmerge run {path.relative_to(ROOT).as_posix()}"
    assert command in path.read_text(encoding="utf-8")
