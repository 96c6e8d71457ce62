"""The shipped recipes that name zoo models run end to end (on the tiny zoo, for speed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfmerge import RoutedModel
from hfmerge.cli.app import main
from hfmerge.errors import UnknownNameError
from hfmerge.zoo import configured_zoo
from tests.support import REPO_ROOT

ROOT = REPO_ROOT
ZOO_RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if "zoo:" in p.read_text(encoding="utf-8")
)


@pytest.fixture
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))
    monkeypatch.setenv("HFMERGE_ZOO_SIZE", "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("path", ZOO_RECIPES, ids=lambda p: p.name)
def test_zoo_recipe_runs_and_loads(
    path: Path, tiny_zoo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    if "route:" in path.read_text(encoding="utf-8"):
        _check_routed(out)
        return
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer(["def merge(a, b):\n    return a"], return_tensors="pt")
    with torch.no_grad():
        output = model(**ids, labels=ids["input_ids"])
    assert torch.isfinite(output.logits).all()
    assert 0 < output.loss.item() < 20


def _check_routed(out: Path) -> None:
    model = RoutedModel.from_pretrained(out, device_map=None)
    assert len(model.route(["def merge(a, b):\n    return a", "The merge of two lists"])) == 2
    ids = model.tokenizer(["def merge(a, b):"], return_tensors="pt")
    output = model(**ids)
    assert torch.isfinite(output.logits).all()
    generated = model.generate(ids["input_ids"], max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_demo_is_among_them() -> None:
    assert ROOT / "recipes" / "demo.yaml" in ZOO_RECIPES


def test_zoo_size_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFMERGE_ZOO_SIZE", "huge")
    with pytest.raises(UnknownNameError, match="tiny"):
        configured_zoo()
