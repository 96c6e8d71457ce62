"""Report and output paths that cannot be written fail at once, not after the work that fills them.

`eval`, `barrier`, `cka` and `units` can run for minutes before they write `--json` or `--plot`.
Each case names a model that does not exist: were the path checked only at the end, the error
would be about that model instead. `align --out` is checked before its models are resolved too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfmerge.analysis.reports import check_report_path
from hfmerge.errors import OutputError
from tests.adversarial.cli_failures import fails

MISSING_MODEL = "./no-such-model"
COMMANDS = {
    "eval --json": ["eval", MISSING_MODEL, "--json"],
    "barrier --json": ["barrier", MISSING_MODEL, MISSING_MODEL, "--json"],
    "barrier --plot": ["barrier", MISSING_MODEL, MISSING_MODEL, "--plot"],
    "cka --json": ["cka", MISSING_MODEL, MISSING_MODEL, "--json"],
    "cka --plot": ["cka", MISSING_MODEL, MISSING_MODEL, "--plot"],
    "cka --units --json": ["cka", MISSING_MODEL, MISSING_MODEL, "--units", "--json"],
    "units --json": ["units", MISSING_MODEL, MISSING_MODEL, "--json"],
    "units --plot": ["units", MISSING_MODEL, MISSING_MODEL, "--plot"],
}


def what(command: str) -> str:
    return "the plot" if command.endswith("--plot") else "the JSON report"


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_report_in_a_missing_folder_fails_first(
    command: str, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails([*COMMANDS[command], "no-such-folder/report.out"], capsys)
    assert (
        f"Output no-such-folder/report.out: cannot write {what(command)}: its folder "
        f"{chdir_tmp / 'no-such-folder'} does not exist" in err
    )
    assert "create the folder first" in err
    assert MISSING_MODEL not in err  # the models were never looked at
    assert listing(chdir_tmp) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_a_report_path_that_is_a_folder_fails_first(
    command: str, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "reports").mkdir()
    err = fails([*COMMANDS[command], "reports"], capsys)
    assert f"Output reports: is a directory, so {what(command)} cannot be written there" in err
    assert "name a file" in err
    assert MISSING_MODEL not in err
    assert listing(chdir_tmp) == ["reports"]


def test_a_report_under_a_file_fails_first(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "notes.txt").write_text("mine")
    err = fails([*COMMANDS["eval --json"], "notes.txt/report.json"], capsys)
    assert f"its folder {chdir_tmp / 'notes.txt'} is a file" in err
    assert (chdir_tmp / "notes.txt").read_text() == "mine"


def test_a_report_in_an_unwritable_folder_fails_first(
    chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = chdir_tmp / "locked"
    locked.mkdir(mode=0o500)
    access = os.access  # root may write anywhere, so the folder's answer is given here

    def locked_access(path: str | os.PathLike[str], mode: int, **kw: bool) -> bool:
        return not (Path(path) == locked and mode & os.W_OK) and access(path, mode, **kw)

    monkeypatch.setattr(os, "access", locked_access)
    err = fails([*COMMANDS["cka --plot"], "locked/cka.png"], capsys)
    locked.chmod(0o700)
    assert f"its folder {locked} is not writable" in err
    assert listing(chdir_tmp) == ["locked"]


def test_a_writable_report_path_passes_and_an_existing_file_may_be_replaced(
    tmp_path: Path,
) -> None:
    assert check_report_path(tmp_path / "new.json", "the JSON report") == tmp_path / "new.json"
    (tmp_path / "old.json").write_text("{}")
    check_report_path(tmp_path / "old.json", "the JSON report")  # replaced atomically later
    with pytest.raises(OutputError, match="is a directory"):
        check_report_path(tmp_path, "the plot")


def test_align_refuses_its_output_before_resolving_models(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "aligned").write_text("a file in the way")
    err = fails(["align", MISSING_MODEL, MISSING_MODEL, "--out", "aligned"], capsys)
    assert f"Output {chdir_tmp / 'aligned'}: exists and is not a directory" in err
    assert MISSING_MODEL not in err
    assert (chdir_tmp / "aligned").read_text() == "a file in the way"
