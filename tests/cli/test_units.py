"""`hfmerge units`: the three views on tiny models with known answers, JSON fields, plot, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfmerge.analysis.unit_report import UnitsReport, compute_units, format_units
from hfmerge.cli.app import main
from tests.support.lm import save_lm, save_permuted_copy, source_of
from tests.support.rotation import save_rotated_copy

SMALL = ["--samples", "12", "--max-length", "32", "--batch-size", "4", "--device-map", "cpu"]
LAYER_FIELDS = {"layer_a", "layer_b", "one_to_one", "one_to_many", "many_to_many"}

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama, its permuted copy, a block-rotated copy, another random init, a deeper one."""
    root = tmp_path_factory.mktemp("units")
    a = save_lm("llama", root / "a", seed=0)
    return {
        "a": a,
        "permuted": save_permuted_copy(a, root / "permuted", seed=4),
        "rotated": save_rotated_copy(a, root / "rotated", block=4, seed=5),
        "other": save_lm("llama", root / "other", seed=1),
        "deep": save_lm("llama", root / "deep", seed=2, num_hidden_layers=4),
    }


def _units(models: dict[str, Path], b: str) -> UnitsReport:
    return compute_units(
        source_of(models["a"]),
        source_of(models[b]),
        samples=12,
        max_length=32,
        batch_size=4,
        device_map="cpu",
    )


def test_json_has_the_fixed_fields_and_a_plot_is_written(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "units.json", tmp_path / "units.png"
    args = ["units", str(models["a"]), str(models["permuted"]), *SMALL]
    assert main([*args, "--json", str(out), "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert "block.1" in captured.out
    assert "matched r" in captured.out
    assert "wrote" in captured.err
    assert "wrote" not in captured.out
    report = json.loads(out.read_text())
    assert report.keys() >= {"model_a", "model_b", "samples", "tokens", "layers"}
    assert report["samples"] == 12
    assert report["tokens"] == report["fit_tokens"] + report["heldout_tokens"]
    assert 0 < report["heldout_tokens"] < report["fit_tokens"]
    assert report["settings"]["heldout_windows"] == 3
    assert [layer["layer_a"] for layer in report["layers"]] == ["embeddings", "block.0", "block.1"]
    for layer in report["layers"]:
        assert layer.keys() == LAYER_FIELDS
        assert layer["one_to_one"]["matched_correlation"] == pytest.approx(1.0, abs=1e-6)
        assert layer["many_to_many"]["sizes"] == [[1, 1]] * 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_a_permuted_copy_corresponds_one_to_one(models: dict[str, Path]) -> None:
    report = _units(models, "permuted")
    for layer in report.layers:
        assert layer.one_to_one.matched_correlation > 0.999999
        assert layer.one_to_one.same_index_correlation is not None
        assert layer.one_to_one.same_index_correlation < 0.5
        assert layer.one_to_many.mean_units_used == 1.0
        assert layer.one_to_many.heldout_r2 > 0.999999
        assert layer.one_to_many.single_unit_heldout_r2 > 0.999999
        groups = layer.many_to_many
        assert groups.groups == groups.one_to_one_groups == 64
        assert groups.within_abs_r > 0.999999
    assert "1+1" in format_units(report)


def test_a_block_rotated_copy_corresponds_by_blocks(models: dict[str, Path]) -> None:
    """Residual-stream units mixed within blocks of 4 by orthogonal maps: the same function."""
    report = _units(models, "rotated")
    for layer in report.layers:
        assert layer.one_to_one.matched_correlation < 0.8
        assert layer.one_to_many.single_unit_heldout_r2 < 0.6
        assert layer.one_to_many.heldout_r2 > 0.99
    # The embeddings of ~40 distinct characters span 40 of 64 dims, so other units' combinations
    # stand in for a block's; the blocks' outputs are full rank and recover the planted blocks.
    # (The lasso, fit on ~280 tokens, admits a few spurious units, hence R² just under 1.)
    for layer in report.layers[1:]:
        assert layer.one_to_many.heldout_r2 > 0.999
        assert 3.0 <= layer.one_to_many.mean_units_used <= 5.0
        assert layer.many_to_many.sizes == [(4, 4)] * 16
        assert layer.many_to_many.within_abs_r > 2 * layer.many_to_many.across_abs_r


def test_another_init_is_low_on_every_measure(models: dict[str, Path]) -> None:
    report = _units(models, "other")
    # Embeddings are a lookup of ~40 distinct characters in 64 dims, so two random tables are
    # linearly related through the token identity (see tests/cli/test_cka.py); blocks are not.
    for layer in report.layers[1:]:
        assert layer.one_to_one.matched_correlation < 0.4
        assert layer.one_to_many.heldout_r2 < 0.1
        assert layer.one_to_many.single_unit_heldout_r2 < 0.1
        assert layer.many_to_many.within_abs_r < 0.2


def test_models_of_different_depth_pair_by_relative_depth(models: dict[str, Path]) -> None:
    report = _units(models, "deep")
    pairs = [(layer.layer_a, layer.layer_b) for layer in report.layers]
    assert pairs == [("embeddings", "embeddings"), ("block.0", "block.1"), ("block.1", "block.3")]


def test_errors_are_one_paragraph(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.txt"
    assert main(["units", str(models["a"]), str(models["a"]), "--data", str(missing)]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["units", str(models["a"]), str(models["a"]), *SMALL, "--l1", "-1"]) == 2
