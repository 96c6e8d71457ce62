"""Messages are printed as text: brackets in paths and errors are neither markup nor lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.cli.app import main
from tests.support.tiny_models import save_tiny_model


@pytest.mark.parametrize("name", ["a[/]b", "[bold]x", "[red]y[/red]", "z[link=http://e]"])
def test_a_path_with_brackets_is_printed_as_written(
    name: str, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = chdir_tmp / name / "model"
    recipe = chdir_tmp / "r.yaml"
    recipe.write_text(f"models: ['{missing}', '{missing}']\nmerge: {{method: linear}}\n")
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "Traceback" not in err
    assert "MarkupError" not in err


def test_an_output_path_with_markup_is_named_exactly(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model("llama", chdir_tmp / "m")
    out = chdir_tmp / "[bold]out"
    out.write_text("a file where the output should go")
    recipe = chdir_tmp / "r.yaml"
    recipe.write_text(f"models: ['{model}', '{model}']\nmerge: {{method: linear}}\n")
    assert main(["run", str(recipe), "--out", str(out)]) == 1
    assert f"{out}: exists and is not a directory" in capsys.readouterr().err


def test_a_yaml_syntax_error_keeps_its_brackets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: [a, b\nmerge: {method: linear}\n")
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "not valid YAML" in err
    assert "[" in err.split("not valid YAML", 1)[1]
