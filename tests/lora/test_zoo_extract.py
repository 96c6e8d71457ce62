"""Extraction on the zoo: the code specialist against its base (seed0), both trained models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hfmerge import api
from hfmerge.zoo import zoo_model
from tests.support.lora import merge_adapter

# one_thread: see tests/support/fixtures.py; slow: the module fixture trains two zoo members.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The tiny zoo's base and code specialist."""
    with pytest.MonkeyPatch.context() as patch:
        # The cache test_demo and the routing tests use too: one tiny zoo per worker.
        patch.setenv("HFMERGE_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))
        patch.setenv("HFMERGE_ZOO_SIZE", "tiny")
        yield {name: zoo_model(name, progress=False) for name in ("seed0", "code")}


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 60).reshape(3, 19)
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def test_full_rank_reproduces_the_code_specialist(zoo: dict[str, Path], tmp_path: Path) -> None:
    result = api.extract_lora(
        str(zoo["code"]),
        str(zoo["seed0"]),
        tmp_path / "a",
        rank=10_000,
        modules_to_save=True,
        progress=False,
    )
    base = AutoModelForCausalLM.from_pretrained(zoo["seed0"])  # eval mode
    adapted = PeftModel.from_pretrained(base, str(result.out_dir)).eval()
    specialist = AutoModelForCausalLM.from_pretrained(zoo["code"])
    assert torch.allclose(logits(adapted), logits(specialist), rtol=0, atol=1e-4)


def test_held_out_code_loss_falls_as_the_rank_rises(zoo: dict[str, Path], tmp_path: Path) -> None:
    losses = []
    for rank in (1, 4, 16, 10_000):
        adapter = api.extract_lora(
            str(zoo["code"]),
            str(zoo["seed0"]),
            tmp_path / f"a{rank}",
            rank=rank,
            modules_to_save=True,
            progress=False,
        )
        merged = tmp_path / f"m{rank}"
        merge_adapter(zoo["seed0"], adapter.out_dir, merged)
        report = api.evaluate(str(merged), data="builtin:code", samples=16, progress=False)
        losses.append(report.result(str(merged), "builtin:code").loss)
    specialist = api.evaluate(str(zoo["code"]), data="builtin:code", samples=16, progress=False)
    assert losses == sorted(losses, reverse=True)
    assert losses[0] > losses[-1] + 0.01
    assert losses[-1] == pytest.approx(specialist.cells[0].result.loss, abs=1e-4)
