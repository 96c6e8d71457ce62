"""Loss barrier: streamed interpolation equals independent computations; alignment removes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel

from hfmerge import api
from hfmerge.analysis.barrier import (
    barrier_of,
    barrier_report,
    compare_barriers,
    lambda_grid,
    linear_baseline,
    loss_barrier,
    parse_align_modes,
)
from hfmerge.analysis.plotting import plot_barriers
from hfmerge.analysis.reports import write_json
from hfmerge.cli.app import main
from hfmerge.errors import IncompatibleModelsError, OutputError, UnknownNameError
from hfmerge.lm.scoring import evaluate
from hfmerge.lm.textdata import load_texts, token_windows
from tests.support.lm import (
    char_tokenizer,
    save_lm,
    save_permuted_copy,
    source_of,
    style_of,
    train_tiny_lm,
)

LENGTH, SAMPLES = 48, 8  # small, so every curve takes a fraction of a second


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A briefly trained tiny Llama (GQA, untied) and a randomly permuted copy of it."""
    root = tmp_path_factory.mktemp("pair")
    a = save_lm("llama", root / "a", model=train_tiny_lm("llama", seed=0))
    return a, save_permuted_copy(a, root / "b", seed=5)


def _load(path: Path, kind: str) -> PreTrainedModel:
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    model: PreTrainedModel = auto.from_pretrained(path, dtype=torch.float32)
    return model


def _windows(kind: str) -> list[torch.Tensor]:
    return token_windows(
        char_tokenizer(style_of(kind)), load_texts(None), max_length=LENGTH, samples=SAMPLES
    )


def test_lambda_grid_always_has_endpoints_and_midpoint() -> None:
    assert lambda_grid(11) == [i / 10 for i in range(11)]
    assert lambda_grid(4) == [0.0, 1 / 3, 0.5, 2 / 3, 1.0]
    assert lambda_grid(2) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="steps"):
        lambda_grid(1)


def test_barrier_is_the_largest_gap_above_the_endpoints_line() -> None:
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [2.0, 3.5, 3.0, 4.1, 4.0]  # line: 2.0, 2.5, 3.0, 3.5, 4.0 -> gaps 0, 1.0, 0, 0.6, 0
    assert barrier_of(lambdas, losses) == pytest.approx((1.0, 0.25))
    assert barrier_of(lambdas, [2.0, 1.0, 1.0, 1.0, 4.0]) == (0.0, 0.0)  # below the line
    assert linear_baseline([0.0, 1.0], 2.0, 4.0) == [2.0, 4.0]


@pytest.mark.parametrize("kind", ["llama_tied", "bert"])
def test_model_with_itself_has_zero_barrier_and_a_flat_curve(tmp_path: Path, kind: str) -> None:
    path = save_lm(kind, tmp_path / "m", seed=4)
    result = loss_barrier(
        source_of(path),
        source_of(path),
        steps=5,
        max_length=LENGTH,
        samples=SAMPLES,
        progress=False,
    )
    assert abs(result.barrier) <= 1e-6
    assert max(result.loss) - min(result.loss) <= 1e-6
    assert result.objective == ("masked" if kind == "bert" else "causal")


@pytest.mark.parametrize(
    "kind", ["llama", "llama_tied", "gpt2", "gpt_neox", "bert", "mixtral", "qwen3_moe"]
)
def test_curve_matches_evaluate_at_endpoints_and_an_averaged_model_at_the_midpoint(
    tmp_path: Path, kind: str
) -> None:
    a, b = save_lm(kind, tmp_path / "a", seed=0), save_lm(kind, tmp_path / "b", seed=1)
    result = loss_barrier(
        source_of(a), source_of(b), steps=3, max_length=LENGTH, samples=SAMPLES, progress=False
    )
    tokenizer, windows = char_tokenizer(style_of(kind)), _windows(kind)
    model_a, model_b = _load(a, kind), _load(b, kind)
    assert result.loss_a == pytest.approx(evaluate(model_a, tokenizer, windows).loss, abs=1e-6)
    assert result.loss_b == pytest.approx(evaluate(model_b, tokenizer, windows).loss, abs=1e-6)
    assert abs(result.loss_a - result.loss_b) > 1e-3  # the two models do differ
    # Independent midpoint: average every module tensor (tied ones included) by hand; an MoE's
    # module tensors are its fused experts, so this also checks the per-expert checkpoint views.
    state_b = model_b.state_dict()
    averaged = {
        n: (t + state_b[n]) / 2 if t.is_floating_point() else t
        for n, t in model_a.state_dict().items()
    }
    model_a.load_state_dict(averaged)
    assert result.loss_mid == pytest.approx(evaluate(model_a, tokenizer, windows).loss, abs=1e-5)


def test_permuted_copy_has_a_vanilla_barrier_that_alignment_removes(
    trained_pair: tuple[Path, Path],
) -> None:
    a, b = trained_pair
    none, weight, activation, repaired, canonical = compare_barriers(
        source_of(a),
        source_of(b),
        aligns=["none", "weight", "activation", "weight+repair", "canonical"],
        steps=5,
        max_length=LENGTH,
        samples=SAMPLES,
        progress=False,
    )
    assert none.loss_b == pytest.approx(none.loss_a, abs=1e-4)  # same function, new basis
    assert none.barrier > 0.1
    assert none.loss_mid > none.loss_a + 0.1
    assert repaired.align == "weight+repair"  # A and π(B) agree: every REPAIR factor is 1
    assert canonical.align == "canonical"
    for aligned in (weight, activation, repaired, canonical):
        assert aligned.loss_a == none.loss_a
        assert aligned.barrier < 1e-4
        assert max(aligned.loss) - min(aligned.loss) < 1e-4


@pytest.fixture(scope="module")
def seed_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Llamas trained from different seeds: a barrier that alignment only lowers."""
    root = tmp_path_factory.mktemp("seeds")
    return (
        save_lm("llama", root / "a", model=train_tiny_lm("llama", seed=0, steps=200)),
        save_lm("llama", root / "b", model=train_tiny_lm("llama", seed=1, steps=200)),
    )


@pytest.mark.slow
def test_repair_curve_keeps_the_endpoints_and_reads_its_probe_text(
    seed_pair: tuple[Path, Path],
) -> None:
    a, b = seed_pair
    weight, repaired, held_out = compare_barriers(
        source_of(a),
        source_of(b),
        aligns=["weight", "weight+repair"],
        steps=3,
        max_length=LENGTH,
        samples=SAMPLES,
        progress=False,
    ) + compare_barriers(
        source_of(a),
        source_of(b),
        aligns=["weight+repair"],
        steps=3,
        max_length=LENGTH,
        samples=SAMPLES,
        probe_data="builtin:code",
        progress=False,
    )
    for curve in (repaired, held_out):  # endpoints are the models themselves
        assert (curve.loss_a, curve.loss_b) == (weight.loss_a, weight.loss_b)
    # Whether REPAIR helps depends on the pair (these tiny models are far from connected, and
    # scaling up their averaged noise hurts; benchmarks/bench_align.py measures the zoo seeds).
    assert abs(repaired.loss_mid - weight.loss_mid) > 1e-3
    assert abs(held_out.loss_mid - repaired.loss_mid) > 1e-3  # statistics from the other text


def test_incompatible_models_and_unknown_modes_are_refused(tmp_path: Path) -> None:
    llama, gpt2 = save_lm("llama", tmp_path / "l"), save_lm("gpt2", tmp_path / "g")
    with pytest.raises(IncompatibleModelsError, match="only in"):
        loss_barrier(source_of(llama), source_of(gpt2), progress=False)
    with pytest.raises(UnknownNameError, match="'weigth'"):
        compare_barriers(source_of(llama), source_of(llama), aligns=["weigth"], progress=False)
    assert parse_align_modes(["none,weight", " activation", "none", "weight+repair"]) == [
        "none",
        "weight",
        "activation",
        "weight+repair",
    ]
    with pytest.raises(UnknownNameError, match="activation\\+repair"):
        parse_align_modes(["weight+rescale"])
    assert parse_align_modes([]) == ["none"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_cli_barrier_of_an_moe_and_its_permuted_copy_vanishes_once_aligned(
    kind: str, chdir_tmp: Path
) -> None:
    """Expert order, per-expert FF orders and the residual planted: the loaded model holds each
    block's experts fused, and every per-expert checkpoint tensor is written into its slice."""
    a = save_lm(kind, chdir_tmp / "a", seed=2)
    b = save_permuted_copy(a, chdir_tmp / "b", seed=7)
    aligns = ["--align", "none", "--align", "weight", "--align", "canonical"]
    size = ["--max-length", str(LENGTH), "--samples", str(SAMPLES), "--json", "barrier.json"]
    assert main(["barrier", str(a), str(b), *aligns, "--steps", "3", *size]) == 0
    none, *aligned = json.loads((chdir_tmp / "barrier.json").read_text())["results"]
    assert none["loss_b"] == pytest.approx(none["loss_a"], abs=1e-5)  # same function, new basis
    assert max(none["loss"]) - min(none["loss"]) > 1e-2  # unaligned midpoints differ
    for curve in aligned:
        assert curve["loss_a"] == none["loss_a"]
        assert curve["loss_b"] == pytest.approx(curve["loss_a"], abs=1e-5)
        assert abs(curve["barrier"]) < 1e-5
        assert max(curve["loss"]) - min(curve["loss"]) < 1e-5


def test_cli_barrier_table_json_and_plot(
    trained_pair: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = trained_pair
    argv = [
        "barrier",
        str(a),
        str(b),
        "--align",
        "none",
        "--align",
        "weight",
        "--steps",
        "3",
        "--json",
        "barrier.json",
        "--plot",
        "barrier.png",
        "--max-length",
        str(LENGTH),
        "--samples",
        str(SAMPLES),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((chdir_tmp / "barrier.json").read_text())
    assert {"lambdas", "loss", "barrier", "align", "loss_a", "loss_b"} <= report.keys()
    assert [r["align"] for r in report["results"]] == ["none", "weight"]
    assert report["align"] == "none"
    assert report["loss"] == report["results"][0]["loss"]
    for r in report["results"]:
        line = [(1 - x) * r["loss_a"] + x * r["loss_b"] for x in r["lambdas"]]
        assert r["barrier"] == max(loss - ln for loss, ln in zip(r["loss"], line, strict=True))
        assert r["loss"][0] == r["loss_a"]
        assert r["loss"][-1] == r["loss_b"]
        assert r["loss_mid"] == r["loss"][r["lambdas"].index(0.5)]
    assert report["barrier"] > 0.1 > report["results"][1]["barrier"]
    assert out.splitlines()[0].split() == ["λ", "none", "weight"]
    assert f"{report['barrier']:.4f}" in out
    assert (chdir_tmp / "barrier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unwritable_plot_and_json_are_output_errors(
    trained_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = trained_pair
    result = loss_barrier(
        source_of(a), source_of(b), steps=2, max_length=LENGTH, samples=2, progress=False
    )
    missing = tmp_path / "no_dir" / "out"
    with pytest.raises(OutputError, match="no_dir") as plot_error:
        plot_barriers([result], missing)
    with pytest.raises(OutputError, match="no_dir") as json_error:
        write_json(missing, barrier_report([result]))
    assert "Fix:" in str(plot_error.value)
    assert "Fix:" in str(json_error.value)
    assert plot_barriers([result], tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_barrier_missing_data_is_one_paragraph_and_writes_nothing(
    trained_pair: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = trained_pair
    argv = [
        "barrier",
        str(a),
        str(b),
        "--data",
        "missing.jsonl",
        "--json",
        "x.json",
        "--plot",
        "x.png",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert "missing.jsonl" in err
    assert "no such file" in err
    assert "Fix:" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in chdir_tmp.iterdir()) == []


@pytest.mark.slow
def test_cli_barrier_with_orthogonal_alignment_removes_a_rotation_that_weight_cannot(
    trained_pair: tuple[Path, Path], chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.rotation import save_mapped_copy

    a, _ = trained_pair
    b = save_mapped_copy(a, chdir_tmp / "rotated", seed=3)
    modes = "none,weight,weight+orthogonal,activation+orthogonal"
    argv = ["barrier", str(a), str(b), "--align", modes]
    argv += ["--steps", "3", "--json", "barrier.json", "--max-length", str(LENGTH)]
    assert main([*argv, "--samples", str(SAMPLES)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "λ",
        "none",
        "weight",
        "weight+orthogonal",
        "activation+orthogonal",
    ]
    none, weight, *orthogonals = json.loads((chdir_tmp / "barrier.json").read_text())["results"]
    assert none["loss_b"] == pytest.approx(none["loss_a"], abs=1e-4)  # same function
    assert weight["barrier"] > 0.1  # permutations cannot undo a rotation
    for orthogonal in orthogonals:
        assert orthogonal["loss_a"] == pytest.approx(none["loss_a"], abs=1e-5)  # A folded is A
        assert orthogonal["barrier"] < 1e-4
        assert max(orthogonal["loss"]) - min(orthogonal["loss"]) < 1e-4


@pytest.mark.parametrize("mode", ["weight+orthogonal", "activation+orthogonal", "learned"])
def test_orthogonal_barrier_refuses_a_post_layernorm_model_before_loading(
    tmp_path: Path, mode: str
) -> None:
    from hfmerge.errors import AlignmentError

    a = save_lm("bert", tmp_path / "a", seed=1)
    b = save_lm("bert", tmp_path / "b", seed=2)
    with pytest.raises(AlignmentError, match="not exact"):
        compare_barriers(source_of(a), source_of(b), aligns=[mode], progress=False)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_eval_and_cka_of_an_moe_and_its_permuted_copy_see_one_function(
    kind: str, tmp_path: Path
) -> None:
    """`hfmerge eval` and `hfmerge cka` load MoE models with their experts fused; a copy with
    planted expert-order, per-expert FF and residual permutations is the same function."""
    a = save_lm(kind, tmp_path / "a", seed=2)
    b = save_permuted_copy(a, tmp_path / "b", seed=7)
    size: dict[str, Any] = {"max_length": LENGTH, "samples": SAMPLES, "progress": False}
    report = api.evaluate([str(a), str(b)], **size)
    assert report.result(str(b)).loss == pytest.approx(report.result(str(a)).loss, abs=1e-5)
    cka = api.cka(str(a), str(b), device_map="cpu", **size)
    assert cka.diagonal == pytest.approx([1.0] * len(cka.diagonal), abs=1e-5)
    assert len(cka.diagonal) == 3  # embeddings and 2 blocks
