"""`learned`, which holds both models whole: its peak said, and refused under a budget or a machine
too small for it, before any weight is read or anything written; the other methods stream."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.align import align_checkpoint, apply, canonical, whole_memory
from hfmerge.align.whole_memory import LEARNED_BYTES_PER_PARAMETER, check_method_memory
from hfmerge.arch import spec_for
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import HfMergeError, OptionError
from tests.support.lm import save_permuted_copy
from tests.support.tiny_models import make_tiny_model, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a = save_tiny_model("llama", tmp_path / "a", dtype=torch.bfloat16)
    return a, save_permuted_copy(a, tmp_path / "b", seed=3)


def _spec(kind: str) -> ArchSpec:
    model = make_tiny_model(kind)
    return spec_for(model.config.to_dict(), model.state_dict().keys())


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("a weight was read")

    monkeypatch.setattr(apply, "_read_params", refuse)


@pytest.mark.parametrize("method", ["canonical", "learned"])
def test_a_budget_below_the_peak_is_refused_before_any_read(
    method: Any, pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_reads(monkeypatch)
    with pytest.raises(OptionError, match=re.escape(f"below what `{method}` needs")) as refused:
        align_checkpoint(*pair, tmp_path / "out", method=method, max_memory_bytes=10**6)
    assert "--method weight, activation or weight+orthogonal" in refused.value.fix
    assert not (tmp_path / "out").exists()


def test_a_machine_below_the_peak_is_refused(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_reads(monkeypatch)
    monkeypatch.setattr(whole_memory, "physical_memory", lambda: 10**6)
    with pytest.raises(HfMergeError, match="more memory than this machine has"):
        align_checkpoint(*pair, tmp_path / "out", method="learned")
    assert not (tmp_path / "out").exists()


def test_the_peak_is_said_and_streaming_methods_are_not_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(whole_memory, "current_rss", lambda: 10**9)
    spec = _spec("llama")
    check_method_memory("learned", spec, {"w": (10**7,)}, max_memory_bytes=None, progress=True)
    assert "learned: about 1.50 GB at peak" in capsys.readouterr().err
    assert LEARNED_BYTES_PER_PARAMETER * 10**7 == 5 * 10**8
    # bounded elsewhere: never refused here
    for streaming in ("weight", "activation", "weight+orthogonal", "activation+orthogonal"):
        check_method_memory(streaming, spec, {"w": (10**12,)}, max_memory_bytes=1, progress=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", ["canonical", "weight+orthogonal"])
def test_streaming_methods_read_no_model_whole(
    method: Any, pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_reads(monkeypatch)
    align_checkpoint(*pair, tmp_path / "out", method=method, max_memory_bytes=10**11)
    assert (tmp_path / "out" / "config.json").exists()


def test_weight_orthogonal_streams_within_weight_matchings_budget(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_reads(monkeypatch)  # no model is read whole: the checkpoints are streamed
    with pytest.raises(OptionError, match="below what weight matching needs"):
        align_checkpoint(
            *pair, tmp_path / "small", method="weight+orthogonal", max_memory_bytes=10**6
        )
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3"])
def test_canonical_peak_counts_the_keys_canonical_order_builds(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_model(kind)
    state = dict(model.state_dict())
    spec = spec_for(model.config.to_dict(), state.keys())
    built: list[int] = []
    real = canonical._fixed_slices

    def recorded(*args: Any) -> Any:
        slices = real(*args)
        built.append(sum(piece.rows.numel() * piece.rows.element_size() for piece in slices))
        return slices

    monkeypatch.setattr(canonical, "_fixed_slices", recorded)
    params = {n: t for n, t in state.items() if not spec.tensors[n].buffer}
    canonical.canonical_permutations(spec, params)
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    largest = max(t.numel() for t in params.values())
    expected = canonical.KEY_COPIES * max(built) + 8 * largest
    assert canonical.canonical_peak_bytes(spec, shapes) == expected
