"""mergekit itself, run beside hfmerge on one config, for the parity tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hfmerge import api
from hfmerge.pipeline.run import RunResult
from tests.support.weights import read_weights

TOLERANCE = 1e-5  # float32: both sum the same terms, in orders that may differ


def run_mergekit(text: str, out: Path, *, copy_tokenizer: bool = False) -> None:
    """Merge the mergekit config `text` into `out` with mergekit (skipped where it is missing)."""
    merge = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(copy_tokenizer=copy_tokenizer, quiet=True, write_model_card=False)
    merge.run_merge(config, str(out), options=options)


def run_both(
    text: str, tmp_path: Path, *, copy_tokenizer: bool = False
) -> tuple[RunResult, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The config `text` run by `hfmerge run` (into `tmp_path/ours`) and by mergekit (into
    `tmp_path/mergekit`): hfmerge's result and both outputs' tensors, which name the same tensors.
    """
    config = tmp_path / "config.yml"
    config.write_text(text)
    result = api.run(config, api.RunOptions(out=tmp_path / "ours", force=True, progress=False))
    run_mergekit(text, tmp_path / "mergekit", copy_tokenizer=copy_tokenizer)
    ours, theirs = read_weights(tmp_path / "ours"), read_weights(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    return result, ours, theirs
