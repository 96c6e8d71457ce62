"""hfmerge.tensors output handling: atomic output directories and copied side files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfmerge.errors import OutputError
from hfmerge.tensors import atomic_output_dir, check_output_dir, copy_side_files
from tests.support.staging import staging_leftovers


def test_atomic_output_moves_result_into_place(tmp_path: Path) -> None:
    final = tmp_path / "nested" / "out"
    with atomic_output_dir(final, force=False) as work:
        assert work.parent == final.parent
        assert work.name.startswith(".out.hfmerge-tmp-")
        (work / "a.txt").write_text("new")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "new"
    assert staging_leftovers(final.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask


def _write_then_fail(final: Path, error: type[BaseException]) -> None:
    """Write a file into `final`'s staging folder (replacing `final`), then fail with `error`."""
    with atomic_output_dir(final, force=True) as work:
        (work / "a.txt").write_text("new")
        raise error()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_on_error_leaves_final_untouched(
    tmp_path: Path, error: type[BaseException]
) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(error):
        _write_then_fail(final, error)
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert staging_leftovers(tmp_path) == []
    with pytest.raises(error), atomic_output_dir(tmp_path / "fresh", force=False):
        raise error()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    ran = False
    with pytest.raises(OutputError, match="--force"), atomic_output_dir(final, force=False):
        ran = True
    assert not ran
    with pytest.raises(OutputError):
        check_output_dir(final, force=False)
    assert (final / "old.txt").read_text() == "old"
    assert staging_leftovers(tmp_path) == []


def test_force_replaces_existing_output(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    check_output_dir(final, force=True)
    with atomic_output_dir(final, force=True) as work:
        (work / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # the old output stays until the new one is complete
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert staging_leftovers(tmp_path) == []


def test_output_rules_for_files_and_empty_dirs(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(tmp_path / "file", force=True)
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty", force=False) as work:
        (work / "a.txt").write_text("a")
    assert (tmp_path / "empty" / "a.txt").exists()


def test_copy_side_files_copies_config_and_tokenizer_only(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    names = "config.json tokenizer.json merges.txt chat_template.jinja model.safetensors "
    names += "pytorch_model.bin model.safetensors.index.json README.md tf_model.h5"
    for name in names.split():
        (src / name).write_text(name)
    copied = copy_side_files(src, dst)
    assert sorted(copied) == ["chat_template.jinja", "config.json", "merges.txt", "tokenizer.json"]
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    assert (dst / "merges.txt").read_text() == "merges.txt"
