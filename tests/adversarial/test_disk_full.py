"""A full disk while the output is written is an error naming the file, and leaves nothing."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest

from hfmerge.cli.app import main
from tests.support.lm import save_lm
from tests.support.staging import staging_leftovers


def test_a_full_disk_while_copying_tokenizer_files_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = save_lm("llama", tmp_path / "a", seed=0)
    b = save_lm("llama", tmp_path / "b", seed=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: ['{a}', '{b}']\nmerge: {{method: linear}}\n")
    real = shutil.copyfile

    def full_for_tokenizers(source: Any, target: Any, **kwargs: Any) -> Any:
        if Path(source).name.startswith("tokenizer"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_for_tokenizers)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot copy tokenizer" in err
    assert "No space left on device" in err
    assert "free space" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert staging_leftovers(tmp_path) == []
