"""A probing command's forward passes, timed before any model loads: the FLOP it counts are those
a real forward pass runs, offloaded layers add their reads, and the estimate is said with the
plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

from hfmerge.lm import probe_time
from hfmerge.lm.load import load_config
from hfmerge.lm.placement import Footprint, ProbePlacement
from hfmerge.lm.probe_time import ProbeSpeed, ProbeText, ProbeWork, probe_seconds
from tests.support.tiny_models import save_tiny_model

BATCHES = [
    {"input_ids": torch.randint(0, 97, (4, 32))},
    {"input_ids": torch.randint(0, 97, (3, 20))},
]


def test_probe_text_counts_tokens_length_and_batches() -> None:
    assert ProbeText.of(BATCHES) == ProbeText(tokens=4 * 32 + 3 * 20, length=32, batches=2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_counted_flop_are_a_forward_passes(kind: str, tmp_path: Path) -> None:
    width: dict[str, Any] = {"n_inner" if kind == "gpt2" else "intermediate_size": 256}
    path = save_tiny_model(kind, tmp_path / kind, **width)
    model = AutoModel.from_pretrained(path).eval()
    batch = {"input_ids": torch.randint(0, 97, (4, 32))}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**batch)
    text = ProbeText.of([batch])
    work = ProbeWork.of(
        path, load_config(path, label="m"), text, ProbePlacement("auto", None), label="m"
    )
    # The count leaves out norms and activations and counts the head, which a probe does not run.
    assert work.flop == pytest.approx(counter.get_total_flops(), rel=0.35)
    assert work.offloaded_bytes == 0


def test_offloaded_layers_are_read_again_for_every_batch(tmp_path: Path) -> None:
    path = save_tiny_model("llama", tmp_path / "m")
    weights = Footprint.of(path, label="m").weights
    offloaded = ProbePlacement("auto", {"cpu": "100KB"}, one_at_a_time=True, offload=True)
    config = load_config(path, label="m")
    work = ProbeWork.of(path, config, ProbeText.of(BATCHES), offloaded, label="m")
    assert work.offloaded_bytes == weights - 10**5
    speed = ProbeSpeed(flop_per_second=1e9, read_bytes_per_second=1e6)
    assert work.seconds(speed) == pytest.approx(work.flop / 1e9 + 2 * (weights - 10**5) / 1e6)


def test_speed_is_measured(tmp_path: Path) -> None:
    path = save_tiny_model("llama", tmp_path / "m")
    speed = ProbeSpeed.measure(path, label="m", rows=64, hidden=64, inner=128)
    assert speed.flop_per_second > 1e6
    assert speed.read_bytes_per_second > 1e3


def test_estimate_is_said_with_the_plan_only_when_worth_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_tiny_model("llama", tmp_path / "m")
    whole = ProbePlacement("auto", None, peak_bytes=10**9)
    text = ProbeText.of(BATCHES)
    assert probe_seconds(path, text, whole, label="m", passes=2) is None  # a tiny model
    monkeypatch.setattr(probe_time, "WORTH_ESTIMATING_SECONDS", 0.0)
    seconds = probe_seconds(path, text, whole, label="m", passes=2)
    assert seconds is not None
    assert seconds > 0
    whole.announce("cka", budget=2 * 10**9, seconds=60.0)
    said = capsys.readouterr().err
    assert "cka: models together; about 1.00 GB at peak" in said
    assert "the forward passes about 60 s" in said
