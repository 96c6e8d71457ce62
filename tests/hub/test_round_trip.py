"""Hub round trip against the loopback Hub: pin, inspect remotely, merge, card, push, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hfmerge.cli.app import main
from tests.support.fakehub import FakeHub, card_metadata, use_cache
from tests.support.fakehub_models import (
    cached_weight_files,
    replace_weights,
    same_weights,
    seed_llama,
    write_recipe,
)

# The client's own LFS upload passes bytes as `data=`, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def two_models(fake_hub: FakeHub, tmp_path: Path) -> tuple[str, str]:
    """org/a and org/b: tiny Llamas from seeds 0 and 1, both Apache-2.0; their main shas."""
    return (
        seed_llama(fake_hub, tmp_path, "org/a", seed=0),
        seed_llama(fake_hub, tmp_path, "org/b", seed=1),
    )


def logits(model_ref: str | Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_ref)
    with torch.no_grad():
        out: torch.Tensor = model(torch.tensor([[1, 5, 9, 2]])).logits
    return out


def test_run_pins_merges_pushes_and_the_pushed_repo_loads(
    fake_hub: FakeHub,
    two_models: tuple[str, str],
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha_a, sha_b = two_models
    recipe = write_recipe(
        chdir_tmp / "r.yaml", ["org/a", {"model": "org/b", "revision": "main"}], push="org/merged"
    )
    assert main(["run", str(recipe)]) == 0
    out_lines = capsys.readouterr().out.split()
    assert out_lines == ["merged", f"{fake_hub.url}/org/merged"]
    local = chdir_tmp / "merged"

    repo = fake_hub.repo("org/merged")
    assert len(repo.history) == 2  # the repo's first commit, then the upload as ONE commit
    pushed = repo.commits[repo.history[-1]]
    assert {"config.json", "model.safetensors", "README.md", "hfmerge_recipe.yaml"} <= set(pushed)
    assert pushed["model.safetensors"].data == (local / "model.safetensors").read_bytes()
    card = (local / "README.md").read_text()
    assert pushed["README.md"].data.decode() == card

    meta = card_metadata(card)
    assert meta["base_model"] == ["org/a", "org/b"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    tags = meta["tags"]
    assert isinstance(tags, list)
    assert {"merge", "hfmerge"} <= set(tags)
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert f"{fake_hub.url}/org/a/tree/{sha_a}" in card
    assert f"{fake_hub.url}/org/b/tree/{sha_b}" in card
    assert "from_pretrained('org/merged')" in card

    pinned = yaml.safe_load((local / "hfmerge_recipe.yaml").read_text())
    assert pinned["models"] == [f"org/a@{sha_a}", {"model": "org/b", "revision": sha_b}]

    fresh = chdir_tmp / "fresh-cache"
    use_cache(monkeypatch, fresh)
    torch.testing.assert_close(logits("org/merged"), logits(local), rtol=0, atol=0)
    assert (fresh / "models--org--merged").is_dir()


def test_pinned_recipe_reproduces_the_inputs_after_the_hub_moves_on(
    fake_hub: FakeHub, two_models: tuple[str, str], chdir_tmp: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    assert main(["run", str(recipe), "--out", "first"]) == 0
    replace_weights(fake_hub, tmp_path, "org/a", seed=7)  # main of org/a now has other weights

    assert main(["run", "first/hfmerge_recipe.yaml", "--out", "again"]) == 0
    assert same_weights(chdir_tmp / "first", chdir_tmp / "again")
    assert main(["run", str(recipe), "--out", "moved"]) == 0  # unpinned: follows main
    assert not same_weights(chdir_tmp / "first", chdir_tmp / "moved")


def test_pinned_recipe_keeps_the_base_and_per_model_parameters(
    fake_hub: FakeHub, two_models: tuple[str, str], chdir_tmp: Path
) -> None:
    sha_a, sha_b = two_models
    models = ["org/a", {"model": "org/b@main", "weight": 0.5}]
    recipe = write_recipe(chdir_tmp / "r.yaml", models, method="task_arithmetic", base="org/a")
    assert main(["run", str(recipe), "--out", "first"]) == 0
    pinned = yaml.safe_load((chdir_tmp / "first" / "hfmerge_recipe.yaml").read_text())
    assert pinned["base"] == f"org/a@{sha_a}"
    assert pinned["models"] == [
        f"org/a@{sha_a}",
        {"model": "org/b", "weight": 0.5, "revision": sha_b},
    ]
    assert main(["run", "first/hfmerge_recipe.yaml", "--out", "again"]) == 0
    assert same_weights(chdir_tmp / "first", chdir_tmp / "again")
    card = (chdir_tmp / "again" / "README.md").read_text()
    assert card.count("| base |") == 1
    assert card.count("| input |") == 1  # base found again


@pytest.mark.slow
def test_dry_run_and_validate_read_headers_only(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0, max_shard_size="100KB")  # sharded + index
    seed_llama(fake_hub, tmp_path, "org/b", seed=1)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    cache = Path(fake_hub_cache())

    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert "model.layers.0.mlp.up_proj.weight" in capsys.readouterr().out
    assert main(["validate", str(recipe)]) == 0
    assert "OK" in capsys.readouterr().out
    header_reads = [
        r
        for r in fake_hub.requests("resolve")
        if r.path.endswith(".safetensors") and r.method == "GET"
    ]
    assert len(header_reads) >= 2 * 3  # (length, header) for org/b and each shard of org/a
    assert all(r.range for r in header_reads)
    assert fake_hub.weight_bytes_served == 0
    assert cached_weight_files(cache) == []
    assert not (chdir_tmp / "merged").exists()

    assert main(["run", str(recipe)]) == 0  # the counter does see a real download
    assert fake_hub.weight_bytes_served > 0
    assert cached_weight_files(cache)


def test_offline_with_a_filled_cache_makes_no_request(
    fake_hub: FakeHub,
    two_models: tuple[str, str],
    chdir_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b@main"])
    assert main(["run", str(recipe), "--out", "online"]) == 0
    before = len(fake_hub.log)
    assert main(["run", str(recipe), "--out", "offline", "--offline"]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", str(recipe), "--out", "env-offline"]) == 0
    assert len(fake_hub.log) == before
    for name in ("offline", "env-offline"):
        assert same_weights(chdir_tmp / "online", chdir_tmp / name)
        assert (chdir_tmp / name / "hfmerge_recipe.yaml").read_text() == (
            chdir_tmp / "online" / "hfmerge_recipe.yaml"
        ).read_text()


def test_offline_without_cache_names_the_model_and_the_fix(
    fake_hub: FakeHub,
    two_models: tuple[str, str],
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    assert main(["run", str(recipe), "--offline"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "org/a" in err
    assert "org/b" in err
    assert "offline mode is on" in err
    assert "run the same command once online" in err
    assert fake_hub.log == []
    assert not (chdir_tmp / "merged").exists()


def fake_hub_cache() -> str:
    import os

    return os.environ["HF_HUB_CACHE"]


@pytest.mark.parametrize(
    ("models", "base", "pinned_models", "pinned_base"),
    [
        (["org/a", "org/b"], "org/a", ["org/a@A", "org/b@B"], "org/a@A"),
        (
            [{"model": "org/a", "weight": 1}, "./local"],
            "org/a",
            [{"model": "org/a", "weight": 1, "revision": "A"}, "./local"],
            "org/a",
        ),
        (
            [{"model": "org/a", "revision": "v1"}, {"model": "org/a", "revision": "v2"}],
            "org/a@v2",
            [{"model": "org/a", "revision": "A"}, {"model": "org/a", "revision": "A2"}],
            "org/a@A2",
        ),
        (["org/b", "./local"], "org/base", ["org/b@B", "./local"], "org/base@C"),
    ],
)
def test_pinning_rewrites_entries_and_keeps_the_base_matching(
    models: list[object], base: str, pinned_models: list[object], pinned_base: str
) -> None:
    from hfmerge.pipeline.provenance import _pin_models
    from hfmerge.recipe.schema import Recipe, parse_recipe

    def base_position(recipe: Recipe) -> int | None:  # None: the base is not among the models
        entry = recipe.base_entry()
        return next((i for i, e in enumerate(recipe.models) if e is entry), None)

    pins = {
        "org/a": ("org/a", "A"),
        "org/a@v1": ("org/a", "A"),
        "org/a@v2": ("org/a", "A2"),
        "org/b": ("org/b", "B"),
        "org/base": ("org/base", "C"),
    }
    data = {"models": models, "base": base, "merge": {"method": "task_arithmetic"}}
    pinned = _pin_models(data, pins)
    assert pinned["models"] == pinned_models
    assert pinned["base"] == pinned_base
    assert base_position(parse_recipe(pinned)) == base_position(parse_recipe(data))
