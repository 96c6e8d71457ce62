"""The public API on tiny models: every command as a function, real results, nothing on stdout."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hfmerge
from hfmerge import api
from hfmerge.errors import InputDataError, RecipeError, UnknownNameError
from hfmerge.methods import METHODS
from hfmerge.recipe.schema import parse_recipe
from tests.support.fakehub import FakeHub
from tests.support.fakehub_models import write_recipe
from tests.support.lm import save_lm, save_permuted_copy
from tests.support.weights import read_weights

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # see tests/support/fixtures.py one_thread
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

LENGTH = 32
SAMPLES = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a tokenizer, its permuted copy, and another random init."""
    root = tmp_path_factory.mktemp("api")
    a = save_lm("llama", root / "a", seed=0)
    return {
        "a": a,
        "permuted": save_permuted_copy(a, root / "permuted", seed=3),
        "other": save_lm("llama", root / "other", seed=1),
    }


def test_run_merge_of_a_model_with_itself_is_the_model(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(models["a"])
    recipe = write_recipe(tmp_path / "r.yaml", [a, a], out=str(tmp_path / "unused"))
    out = tmp_path / "merged"
    result = api.run(recipe, api.RunOptions(out=out, progress=False))
    assert result.out_dir == out
    assert not result.routed
    assert result.url is None
    original, merged = read_weights(models["a"]), read_weights(out)
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)
    saved = yaml.safe_load((out / "hfmerge_recipe.yaml").read_text(encoding="utf-8"))
    assert saved["models"] == [a, a]  # the file's own text (a dumped `Recipe` has mappings)
    assert capsys.readouterr().out == ""


def test_run_output_dir_rule_and_dry_run(
    models: dict[str, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(models["a"])
    recipe = chdir_tmp / "named.yaml"
    recipe.write_text(f"models: [{a}, {a}]\nmerge:\n  method: linear\n", encoding="utf-8")
    plan = api.run(recipe, api.RunOptions(dry_run=True, progress=False))
    assert plan.out_dir is None
    assert "model.embed_tokens.weight" in plan.describe_plan()
    assert not (chdir_tmp / "out").exists()
    quiet = api.RunOptions(progress=False)
    assert api.run(recipe, quiet).out_dir == Path("out/named")  # no output.path: the file's stem
    in_memory = parse_recipe({"models": [a, a], "merge": {"method": "linear"}})
    assert api.run(in_memory, quiet).out_dir == Path("out/merged")  # no file: the kind
    assert (chdir_tmp / "out" / "named" / "config.json").is_file()
    assert (chdir_tmp / "out" / "merged" / "config.json").is_file()
    assert capsys.readouterr().out == ""


def test_validate_reports_every_problem_at_once_and_summarises_a_good_recipe(
    models: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modles: [a, b]\nmerge:\n  method: linaer\noutput:\n  dtype: int8\n")
    with pytest.raises(RecipeError) as info:
        api.validate(bad)
    message = info.value.message()
    assert "unknown key 'modles'" in message
    assert "'linaer'" in message
    assert "dtype" in message
    assert len(info.value.problems) >= 3
    a = str(models["a"])
    good = api.validate(write_recipe(tmp_path / "good.yaml", [a, a]))
    assert good.summary().startswith("linear over 2 models,")
    assert "MB of output" in good.summary()
    assert not (tmp_path / "merged").exists()


def test_cka_of_a_model_with_itself_is_one_on_the_diagonal(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(models["a"])
    report = api.cka(a, a, samples=SAMPLES, max_length=LENGTH, device_map="cpu", progress=False)
    assert report.diagonal == pytest.approx([1.0] * len(report.layers_a), abs=1e-5)
    document = report.to_json()
    fields = {"model_a", "model_b", "revisions", "layers_a", "layers_b", "matrix", "diagonal"}
    fields |= {"estimator", "pooling", "tokens_per_window", "samples", "tokens"}
    assert fields <= document.keys()
    assert document["model_a"] == a
    assert document["pooling"] == "tokens"
    assert document["tokens_per_window"] == 16
    assert document["samples"] == SAMPLES
    other = api.cka(
        a,
        str(models["other"]),
        samples=SAMPLES,
        max_length=LENGTH,
        device_map="cpu",
        progress=False,
    )
    assert max(other.diagonal[1:]) < 0.99  # and not for two unrelated inits
    assert capsys.readouterr().out == ""


def test_cka_checks_pooling_and_data_before_loading_any_model(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="pooling 'max'"):
        api.cka("zoo:nothing", "zoo:nothing", pooling="max")
    with pytest.raises(InputDataError, match=r"no\.txt"):
        api.cka("zoo:nothing", "zoo:nothing", data=str(tmp_path / "no.txt"))


def test_evaluate_gives_finite_losses_per_model_and_text(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, other = str(models["a"]), str(models["other"])
    single = api.evaluate(a, max_length=LENGTH, samples=SAMPLES, progress=False)
    (cell,) = single.cells
    assert math.isfinite(cell.result.loss)
    assert cell.result.loss > 0
    assert cell.result.perplexity == pytest.approx(math.exp(cell.result.loss))
    assert {"loss", "perplexity", "tokens"} <= single.to_json().keys()
    texts = ["builtin:code", "builtin:prose"]
    grid = api.evaluate([a, other], data=texts, max_length=LENGTH, samples=SAMPLES, progress=False)
    assert [(c.model, c.data) for c in grid.cells] == [(m, d) for m in (a, other) for d in texts]
    assert grid.result(a, "builtin:prose").loss == pytest.approx(cell.result.loss, abs=1e-6)
    assert len(grid.to_json()["results"]) == 4
    assert capsys.readouterr().out == ""


def test_evaluate_reads_every_text_before_resolving_a_model(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"missing\.txt"):
        api.evaluate("zoo:nothing", data=["builtin", str(tmp_path / "missing.txt")])


def test_evaluate_resolves_a_pinned_hub_reference(
    fake_hub: FakeHub, models: dict[str, Path]
) -> None:
    sha = fake_hub.add_model("org/lm", models["a"])
    report = api.evaluate(
        [f"org/lm@{sha}", str(models["a"])], max_length=LENGTH, samples=SAMPLES, progress=False
    )
    hub_loss, local_loss = (c.result.loss for c in report.cells)
    assert hub_loss == pytest.approx(local_loss, abs=1e-6)
    assert report.cells[0].model == f"org/lm@{sha}"


def test_barrier_of_a_permuted_copy_vanishes_once_aligned(models: dict[str, Path]) -> None:
    report = api.barrier(
        str(models["a"]),
        str(models["permuted"]),
        align="none,weight",
        steps=3,
        max_length=LENGTH,
        samples=SAMPLES,
        progress=False,
    )
    none, weight = report.results
    assert (none.align, weight.align) == ("none", "weight")
    assert none.loss_b == pytest.approx(none.loss_a, abs=1e-4)  # the same function
    assert abs(weight.barrier) < 1e-4
    assert max(weight.loss) - min(weight.loss) < 1e-4
    document = report.to_json()
    assert {"lambdas", "loss", "barrier", "align", "loss_a", "loss_b"} <= document.keys()
    assert document["align"] == "none"
    assert len(document["results"]) == 2
    with pytest.raises(UnknownNameError, match="'weigth'"):
        api.barrier(str(models["a"]), str(models["a"]), align=["weigth"])


def test_align_writes_the_permuted_copy_back_in_the_reference_basis(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "aligned"
    result = api.align(str(models["a"]), str(models["permuted"]), out, progress=False)
    assert result.out_dir == out
    assert result.method == "weight"
    assert result.iterations >= 1
    aligned = read_weights(out)
    for name, tensor in read_weights(models["a"]).items():
        torch.testing.assert_close(aligned[name], tensor, rtol=0, atol=1e-6)
    with pytest.raises(UnknownNameError, match="alignment method"):
        api.align(str(models["a"]), str(models["permuted"]), tmp_path / "x", method="nearest")  # type: ignore[arg-type]


def test_push_sends_a_run_output_to_the_hub(
    fake_hub: FakeHub, models: dict[str, Path], tmp_path: Path
) -> None:
    a = str(models["a"])
    out = api.run(
        write_recipe(tmp_path / "r.yaml", [a, a], out=str(tmp_path / "merged")),
        api.RunOptions(progress=False),
    ).out_dir
    assert out is not None
    pushed = api.push(out, "org/merged", private=True)
    assert pushed.url == f"{fake_hub.url}/org/merged"
    assert pushed.directory == out
    repo = fake_hub.repo("org/merged")
    assert repo.private
    assert "model.safetensors" in repo.commits[repo.branches["main"]]


def test_methods_and_archs_are_data() -> None:
    listed = {m.name: m for m in api.methods()}
    assert listed.keys() == METHODS.keys()
    linear = listed["linear"]
    assert not linear.needs_base
    assert linear.paper.startswith("https://")
    assert "weight" in {p.name for p in linear.parameters if p.scope == "model"}
    assert "density" in {p.name for p in listed["ties"].parameters}
    families = {f.name: f for f in api.archs()}
    assert {"bert", "gpt2", "gpt_neox", "llama"} <= families.keys()
    assert "mistral" in families["llama"].model_types
    assert all(families[name].capabilities["align"] for name in ("bert", "gpt2", "llama"))
    assert families["mixtral"].capabilities["align"]
    assert not families["qwen3_moe"].capabilities["repair"]
    generic = api.archs()[-1]
    assert (generic.name, generic.model_types) == ("generic", ())
    assert generic.capabilities == {
        "merge": True,
        "align": False,
        "repair": False,
        "cka": False,
        "route": False,
    }


def test_top_level_names_are_the_api_and_import_lightly() -> None:
    assert hfmerge.run is api.run
    assert hfmerge.cka is api.cka
    assert hfmerge.evaluate is api.evaluate
    assert hfmerge.RunOptions is api.RunOptions
    assert hfmerge.api is api
    probe = (
        "import sys, hfmerge; hfmerge.api; hfmerge.run; hfmerge.RunOptions; hfmerge.barrier; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
