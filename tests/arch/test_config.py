"""The one config.json reader: the parsed object, or one ModelSourceError naming the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.arch.config import read_config
from hfmerge.errors import ModelSourceError


def test_reads_the_config_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 97}')
    assert read_config(tmp_path, label="m") == {"model_type": "llama", "vocab_size": 97}


@pytest.mark.parametrize(
    ("content", "problem", "fix"),
    [
        (None, "has no config.json in", "save_pretrained"),
        (b"{oops", "config.json cannot be read", "re-download config.json"),
        (b"\xff\xfe", "config.json cannot be read", "re-download config.json"),
        (b"[1, 2]", "config.json is not a JSON object", "re-download config.json"),
    ],
)
def test_every_broken_config_is_one_model_source_error(
    tmp_path: Path, content: bytes | None, problem: str, fix: str
) -> None:
    if content is not None:
        (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelSourceError) as info:
        read_config(tmp_path, label="org/model")
    assert info.value.model == "org/model"
    assert info.value.what.startswith(f"Model org/model: {problem}")
    assert fix in info.value.fix
