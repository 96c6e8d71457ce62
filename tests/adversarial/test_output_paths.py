"""An output path never touches an input: equal, ancestor or inside, however it is spelled.

Each case runs the real command with `--force`, the flag that deletes an existing output, and
checks the error names the output and that every input file is still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from hfmerge.cli.app import main
from hfmerge.errors import OutputError
from hfmerge.tensors import check_output_dir, output_path, refuse_overlap
from tests.support.tiny_models import save_tiny_model


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def models(chdir_tmp: Path) -> tuple[Path, Path]:
    """Two tiny Llamas under work/models/, the folder layout a user keeps next to outputs."""
    a = save_tiny_model("llama", chdir_tmp / "work" / "models" / "a", seed=0)
    b = save_tiny_model("llama", chdir_tmp / "work" / "models" / "b", seed=1)
    return a, b


def recipe(path: Path, models: tuple[Path, Path], out: str) -> Path:
    lines = ["models:", *(f"  - {m}" for m in models), "merge:", "  method: linear"]
    path.write_text("\n".join([*lines, "output:", f"  path: '{out}'", ""]))
    return path


# Output spellings relative to the working directory (tmp): each is an input's folder or holds one.
HOSTILE_OUTPUTS = [
    "work/models",  # parent of both inputs
    "work",  # grandparent
    "work/models/a",  # an input itself
    "work/models/a/../a",  # the same, through `..`
    "work/models/b/sub",  # inside an input
    "linked",  # a symlink to work/models
    "linked/a",  # an input through a symlinked ancestor
    ".",  # the working directory holds everything
]


@pytest.mark.parametrize("out", HOSTILE_OUTPUTS)
def test_run_with_force_refuses_an_output_over_an_input(
    out: str, models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "linked").symlink_to(chdir_tmp / "work" / "models")
    before = fingerprint(chdir_tmp / "work")
    path = recipe(chdir_tmp / "r.yaml", models, out)
    assert main(["run", str(path), "--force"]) == 1
    err = capsys.readouterr().err
    assert "input model" in err
    assert "outside every input" in err
    assert fingerprint(chdir_tmp / "work") == before
    assert not list(chdir_tmp.rglob(".*hfmerge-tmp-*"))


@pytest.mark.parametrize("out", ["work/models", "work/models/b", "work/models/a/inner"])
def test_run_refuses_an_output_over_an_input_given_with_out(
    out: str, models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(chdir_tmp / "work")
    path = recipe(chdir_tmp / "r.yaml", models, "merged")
    assert main(["run", str(path), "--force", "--out", out]) == 1
    assert "input model" in capsys.readouterr().err
    assert fingerprint(chdir_tmp / "work") == before


def test_align_with_force_refuses_an_ancestor_of_its_inputs(
    models: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(chdir_tmp / "work")
    a, b = models
    assert main(["align", str(a), str(b), "--out", "work", "--force"]) == 1
    assert "contains the input model" in capsys.readouterr().err
    assert fingerprint(chdir_tmp / "work") == before


def test_tilde_in_output_path_means_home(
    models: tuple[Path, Path], chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = chdir_tmp / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert output_path("~/merged") == home / "merged"
    path = recipe(chdir_tmp / "r.yaml", models, "~/merged")
    assert main(["run", str(path)]) == 0
    assert (home / "merged" / "config.json").is_file()
    assert not (chdir_tmp / "~").exists()


def test_a_tilde_output_over_an_input_is_refused(
    models: tuple[Path, Path], chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(chdir_tmp / "work"))
    with pytest.raises(OutputError, match="contains the input model"):
        check_output_dir(Path("~"), force=True, inputs=list(models))


def test_an_output_over_the_folder_that_symlinked_weights_point_into_is_refused(
    tmp_path: Path,
) -> None:
    # The Hub cache's layout: snapshots/<sha>/ holds symlinks into blobs/.
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc123").write_bytes(b"weights")
    snapshot = tmp_path / "cache" / "snapshots" / "sha"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(OutputError, match="where files of the input model"):
        refuse_overlap(blobs, [snapshot])
    refuse_overlap(tmp_path / "elsewhere", [snapshot])  # unrelated: fine
    refuse_overlap(blobs / "new", [snapshot])  # inside blobs deletes nothing: fine


def test_a_sibling_with_a_shared_name_prefix_is_not_an_ancestor(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    refuse_overlap(tmp_path / "model-merged", [model])  # "model" is a prefix, not a parent
    refuse_overlap(tmp_path / "mod", [model])


def test_inputs_reached_through_symlinks_are_compared_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real" / "model"
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "alias")
    with pytest.raises(OutputError, match="is the input model"):
        refuse_overlap(tmp_path / "real" / "model", [tmp_path / "alias"])
    with pytest.raises(OutputError, match="contains the input model"):
        refuse_overlap(tmp_path / "real", [tmp_path / "alias"])
