"""`validate` checks the output path as `run` does, so an OK from it means `run` may start.

An existing file, and an output that is, holds or lies inside an input model, are errors (`run`
refuses them even with --force); an existing non-empty directory is a note saying that `run` will
need --force. Nothing is written either way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hfmerge import api
from hfmerge.cli.app import main
from tests.adversarial.cli_failures import fails, one_line
from tests.support.tiny_models import save_tiny_model


@pytest.fixture
def models(chdir_tmp: Path) -> tuple[Path, Path]:
    a = save_tiny_model("llama", chdir_tmp / "models" / "a", seed=0)
    b = save_tiny_model("llama", chdir_tmp / "models" / "b", seed=1)
    return a, b


def recipe(path: Path, models: tuple[Path, Path], out: str | None) -> Path:
    lines = ["models:", *(f"  - {m}" for m in models), "merge:", "  method: linear"]
    if out is not None:
        lines += ["output:", f"  path: '{out}'"]
    path.write_text("\n".join([*lines, ""]))
    return path


def fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_an_output_path_that_is_a_file_is_an_error_in_validate_as_in_run(
    models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "merged").write_text("not a model")
    path = recipe(chdir_tmp / "r.yaml", models, "merged")
    for command in (["validate", str(path)], ["run", str(path)], ["run", str(path), "--force"]):
        err = fails(command, capsys)
        assert f"Output {chdir_tmp / 'merged'}: exists and is not a directory" in err
        assert "remove it or choose another output path" in err
    assert (chdir_tmp / "merged").read_text() == "not a model"


def test_the_default_output_is_checked_too(
    models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "out").mkdir()
    (chdir_tmp / "out" / "r").write_text("in the way")  # where `run r.yaml` would write
    path = recipe(chdir_tmp / "r.yaml", models, None)
    err = fails(["validate", str(path)], capsys)
    assert f"Output {chdir_tmp / 'out' / 'r'}: exists and is not a directory" in err


@pytest.mark.parametrize("out", ["models/a", "models", "models/b/inner", "."])
def test_an_output_over_an_input_is_an_error_in_validate(
    out: str, models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(chdir_tmp / "models")
    path = recipe(chdir_tmp / "r.yaml", models, out)
    err = fails(["validate", str(path)], capsys)
    assert "input model" in err
    assert "writing it would replace or delete" in err
    assert "choose an output path outside every input model's folder" in err
    assert fingerprint(chdir_tmp / "models") == before


def test_an_existing_output_directory_is_a_note_that_run_needs_force(
    models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "merged").mkdir()
    (chdir_tmp / "merged" / "keep.txt").write_text("earlier output")
    path = recipe(chdir_tmp / "r.yaml", models, "merged")
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert (
        f"note: the output {chdir_tmp / 'merged'} exists and is not empty: `hfmerge run` will "
        "replace it only with --force" in one_line(err)
    )
    assert api.validate(path).notes == (
        f"the output {chdir_tmp / 'merged'} exists and is not empty: `hfmerge run` will replace "
        "it only with --force (or choose another output.path, or pass --out)",
    )
    assert "--force" in fails(["run", str(path)], capsys)  # what the note foretold
    assert (chdir_tmp / "merged" / "keep.txt").read_text() == "earlier output"


def test_a_free_or_empty_output_gets_no_note(
    models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = recipe(chdir_tmp / "r.yaml", models, "merged")
    assert api.validate(path).notes == ()
    (chdir_tmp / "merged").mkdir()
    assert api.validate(path).notes == ()
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().err == ""
    assert list((chdir_tmp / "merged").iterdir()) == []
