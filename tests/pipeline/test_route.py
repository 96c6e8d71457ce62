"""`route:` recipes end to end: `hfmerge run` writes a routed repo, eval compares, push and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hfmerge import RoutedModel, hub
from hfmerge.cli.app import main
from tests.support.fakehub import FakeHub
from tests.support.routing import (
    LENGTH,
    NAMES,
    digit_texts,
    letter_texts,
    load_expert,
    mixed_batch,
    save_experts,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_experts(tmp_path_factory.mktemp("experts"))


def write_texts(folder: Path) -> dict[str, Path]:
    """Calibration (train) and evaluation (test) text files per domain."""
    files = {}
    for split, seed in (("train", 0), ("test", 50)):
        for name, texts in (("digits", digit_texts), ("letters", letter_texts)):
            path = folder / f"{name}-{split}.txt"
            path.write_text("\n".join(texts(20, seed=seed)) + "\n", encoding="utf-8")
            files[f"{name}-{split}"] = path
    return files


def route_recipe(
    path: Path, models: list[str], base: str, texts: dict[str, Path], **output: object
) -> Path:
    recipe = {
        "models": models,
        "base": base,
        "probe": {"samples": 24, "max_length": LENGTH},
        "route": {
            "method": "centroid",
            "experts": [{"data": str(texts[f"{n}-train"])} for n in NAMES],
        },
        "output": {"path": "routed", **output},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_route_recipe_writes_a_routed_repo_that_serves_and_evaluates(
    experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = write_texts(tmp_path)
    recipe = route_recipe(
        tmp_path / "r.yaml", [str(experts[n]) for n in NAMES], str(experts["backbone"]), texts
    )
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "route: centroid router over 2 experts (bundled)" in plan
    assert not out.exists()
    assert main(["validate", str(recipe)]) == 0
    assert "centroid router over 2 experts" in capsys.readouterr().out

    assert main(["run", str(recipe), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "RoutedModel.from_pretrained" in captured.err
    card = (out / "README.md").read_text()
    assert "- routing" in card
    assert "## Routing" in card
    assert "held-out routing accuracy" in card
    assert (out / "hfmerge_recipe.yaml").is_file()
    assert (out / "experts" / "digits").is_dir()
    assert main(["run", str(recipe), "--out", str(out)]) == 1  # exists: refused without --force
    assert "--force" in capsys.readouterr().err

    model = RoutedModel.from_pretrained(out, device_map=None)
    batch = mixed_batch(model.tokenizer)
    output = model(**batch)
    assert output.experts.tolist() == [0, 1, 1, 0]
    for row, name in enumerate(["digits", "letters", "letters", "digits"]):
        with torch.no_grad():
            alone = load_expert(experts[name])(**{k: v[row : row + 1] for k, v in batch.items()})
        assert torch.equal(output.logits[row : row + 1], alone.logits)

    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(out),
                str(experts["digits"]),
                str(experts["letters"]),
                "--data",
                str(texts["digits-test"]),
                "--data",
                str(texts["letters-test"]),
                "--max-length",
                str(LENGTH),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "mean token loss" in table
    assert str(out) in table
    loss = {
        (r["model"], Path(r["data"]).stem): r["loss"]
        for r in json.loads(report.read_text())["results"]
    }
    for name in NAMES:  # every test window goes to its own expert: the same loss
        assert loss[str(out), f"{name}-test"] == pytest.approx(
            loss[str(experts[name]), f"{name}-test"], abs=1e-5
        )


@pytest.mark.slow
def test_routed_repo_over_hub_experts_is_pushed_and_loads_back_by_id(
    fake_hub: FakeHub,
    experts: dict[str, Path],
    tmp_path: Path,
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub.push, "PUSH_BACKOFF_S", 0.01)
    shas = {n: fake_hub.add_model(f"org/{n}", experts[n]) for n in NAMES}
    texts = write_texts(tmp_path)
    recipe = route_recipe(
        chdir_tmp / "r.yaml", [f"org/{n}" for n in NAMES], "org/digits", texts, push="org/routed"
    )
    assert main(["run", str(recipe)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("org/routed")
    repo = fake_hub.repo("org/routed")
    files = repo.commits[repo.branches["main"]]
    assert "hfmerge_router.json" in files
    assert not any(p.startswith("experts/") for p in files)
    manifest = json.loads(files["hfmerge_router.json"].data)
    assert [e["revision"] for e in manifest["experts"]] == [shas[n] for n in NAMES]
    assert "base_model:\n- org/digits\n- org/letters" in files["README.md"].data.decode()

    model = RoutedModel.from_pretrained("org/routed", device_map=None)
    assert model.route(digit_texts(2, seed=9) + letter_texts(2, seed=9)) == [0, 0, 1, 1]
    assert main(["push", "routed", "org/routed-again"]) == 0  # a routed folder pushes as is


def test_push_refuses_a_routed_folder_with_a_missing_bundle(
    experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = write_texts(tmp_path)
    recipe = route_recipe(
        tmp_path / "r.yaml", [str(experts[n]) for n in NAMES], str(experts["digits"]), texts
    )
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for file in (out / "experts" / "letters").glob("*.safetensors"):
        file.unlink()
    assert main(["push", str(out), "org/x"]) == 1
    assert "is not a complete routed repo" in capsys.readouterr().err
