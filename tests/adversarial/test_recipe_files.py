"""Hostile recipe files: alias bombs, duplicate keys, other encodings, deep nesting, fuzz.

Each must end in a `RecipeError` that names the file and the place, quickly and in bounded
memory, and never in a traceback of another kind.
"""

from __future__ import annotations

import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from hfmerge.errors import HfMergeError, RecipeError
from hfmerge.recipe.schema import load_recipe, parse_recipe_text
from hfmerge.recipe.yaml_locations import MAX_VALUES

VALID = """\
models:
  - model: org/a
    weight: 0.5
  - model: org/b
    weight: 0.5
base: org/a
merge:
  method: ties
  parameters: {density: 0.5}
output:
  path: out/x
"""


def alias_bomb(levels: int = 9) -> str:
    """`levels` anchors, each a list of nine aliases of the one before: 9**levels values."""
    lines = ['a0: &a0 ["lol"]']
    for level in range(1, levels):
        aliases = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{aliases}]")
    lines.append(f"models: [*a{levels - 1}]")
    return "\n".join(lines) + "\n"


def _limit_memory() -> None:
    limit = 2 << 30  # 2 GiB of address space: the old walk grew past 4.7 GB on this file
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.slow  # a second interpreter, under a memory limit
def test_an_alias_bomb_is_refused_by_validate_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    done = subprocess.run(
        [sys.executable, "-m", "hfmerge", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "YAML aliases" in done.stderr
    assert str(path) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("levels", [3, 5, 7])
def test_alias_expansion_is_counted_not_the_file_size(levels: int) -> None:
    text = alias_bomb(levels)
    if 9 ** (levels - 1) <= MAX_VALUES:  # small expansions are ordinary YAML
        with pytest.raises(RecipeError) as caught:
            parse_recipe_text(text)
        assert "alias" not in str(caught.value)
    else:
        with pytest.raises(RecipeError, match="YAML aliases"):
            parse_recipe_text(text)


def test_ordinary_aliases_still_work() -> None:
    text = VALID.replace(
        "  - model: org/a\n    weight: 0.5", "  - &first\n    model: org/a\n    weight: 0.5"
    )
    text += "extra_models_note: null\n"
    with pytest.raises(RecipeError, match="unknown key 'extra_models_note'"):
        parse_recipe_text(text)
    plain = VALID.replace("parameters: {density: 0.5}", "parameters: &p {density: 0.5}")
    assert parse_recipe_text(plain).merge is not None


@pytest.mark.parametrize(
    ("text", "where", "first_line"),
    [
        (VALID + "merge:\n  method: linear\n", "merge", 7),  # top level: the last would win
        (
            VALID.replace(
                "    weight: 0.5\n  - model: org/b",
                "    weight: 0.5\n    weight: 0.9\n  - model: org/b",
                1,
            ),
            "models.0.weight",
            3,
        ),
        (VALID.replace("  path: out/x", "  path: out/x\n  path: out/y"), "output.path", 11),
    ],
)
def test_a_duplicate_key_is_an_error_naming_both_lines(
    text: str, where: str, first_line: int
) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text, source="r.yaml")
    (problem,) = caught.value.problems
    assert problem.location == where
    assert f"also at line {first_line}" in problem.message
    assert problem.line is not None
    assert problem.line > first_line


def test_every_duplicate_is_reported_at_once() -> None:
    text = VALID + "base: org/b\nmerge: {method: linear}\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe_text(text)
    assert sorted(p.location for p in caught.value.problems) == ["base", "merge"]


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_recipe_in_another_encoding_names_the_file_and_the_fix(
    tmp_path: Path, encoding: str
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(("# café\n" + VALID).encode(encoding))
    with pytest.raises(RecipeError, match="not UTF-8 text") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(RecipeError, match="nested too deeply"):
        parse_recipe_text("models: " + "[" * 50_000 + "]" * 50_000 + "\n")


def test_two_documents_are_an_error() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe_text(VALID + "---\n" + VALID)


def _corrupt(text: str, rng: random.Random) -> str:
    """One random edit: delete, duplicate or replace a span, or insert YAML punctuation."""
    data = list(text)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(data) or 1)
        action = rng.randrange(4)
        if action == 0 and data:
            del data[pos : pos + rng.randint(1, 8)]
        elif action == 1:
            data[pos:pos] = data[pos : pos + rng.randint(1, 12)]
        elif action == 2:
            data[pos:pos] = rng.choice(
                [
                    "&x ",
                    "*x",
                    "!!python/object:os.system ",
                    "{",
                    "]",
                    ": ",
                    "\t",
                    "- ",
                    "\x00",
                    "'",
                    "%YAML 1.1\n",
                    "? ",
                    "<<: *x\n",
                    "\ufeff",
                ]
            )
        elif data:
            data[pos] = chr(rng.randrange(32, 0x250))
    return "".join(data)


def _parse_error(text: str) -> HfMergeError | None:
    """The error that parsing `text` as a recipe raises; None when it parses."""
    try:
        parse_recipe_text(text, source="fuzz.yaml")
    except HfMergeError as exc:
        return exc
    return None


def test_fuzzed_recipes_give_a_recipe_or_a_recipe_error() -> None:
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        text = _corrupt(VALID, rng)
        error = _parse_error(text)
        if error is None:
            outcomes["ok"] += 1
            continue
        assert str(error).strip(), text
        outcomes["error"] += 1
    assert outcomes["error"] > 300  # most corruptions break something; all of them cleanly
