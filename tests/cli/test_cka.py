"""`hfmerge cka`: table, JSON with the fixed fields, heatmap, --fail-under, --units, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.analysis.cka import CkaReport, compute_cka, diagonal_pairs, format_report
from hfmerge.analysis.probe_pair import open_pair, probe_windows
from hfmerge.analysis.similarity import CkaMatrix
from hfmerge.cli.app import main
from hfmerge.lm.placement import ProbePlacement
from tests.support.lm import save_lm, save_permuted_copy, source_of

FIELDS = {
    "model_a",
    "model_b",
    "revisions",
    "layers_a",
    "layers_b",
    "matrix",
    "diagonal",
    "estimator",
    "pooling",
    "samples",
    "tokens",
}
SMALL = ["--samples", "6", "--max-length", "32", "--batch-size", "4", "--device-map", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama, its permuted copy, another random init, and a deeper one."""
    root = tmp_path_factory.mktemp("cka")
    a = save_lm("llama", root / "a", seed=0)
    return {
        "a": a,
        "permuted": save_permuted_copy(a, root / "permuted", seed=4),
        "other": save_lm("llama", root / "other", seed=1),
        "deep": save_lm("llama", root / "deep", seed=2, num_hidden_layers=4),
    }


def test_json_has_the_fixed_fields_and_a_heatmap_is_written(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "cka.json", tmp_path / "cka.png"
    args = [
        "cka",
        str(models["a"]),
        str(models["permuted"]),
        *SMALL,
        "--json",
        str(out),
        "--plot",
        str(png),
        "--units",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "block.1" in captured.out
    assert "matrix" in captured.out
    assert "matched r" in captured.out
    assert "wrote" in captured.err
    assert "wrote" not in captured.out
    report = json.loads(out.read_text())
    assert report.keys() >= FIELDS
    assert report["layers_a"] == ["embeddings", "block.0", "block.1"] == report["layers_b"]
    assert len(report["matrix"]) == 3
    assert all(len(row) == 3 for row in report["matrix"])
    assert report["diagonal"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert report["estimator"] == "debiased"
    assert report["pooling"] == "tokens"
    assert report["samples"] == 6
    assert report["tokens"] == report["cka_samples"] > 6
    assert report["revisions"] == {"model_a": None, "model_b": None}
    assert report["settings"]["max_length"] == 32
    assert report["settings"]["bos_dropped"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_units_match_a_permuted_copy_and_not_another_init(models: dict[str, Path]) -> None:
    def run(b: str) -> CkaReport:
        return compute_cka(
            source_of(models["a"]),
            source_of(models[b]),
            samples=6,
            max_length=32,
            device_map="cpu",
            units=True,
        )

    permuted, other = run("permuted"), run("other")
    assert permuted.units is not None
    assert other.units is not None
    for unit in permuted.units:
        assert unit.matched_correlation > 0.999
        assert unit.predicted_share > 0.99
        assert unit.same_index_correlation is not None
        assert unit.same_index_correlation < 0.5
    # Embeddings are a lookup of ~40 distinct characters in 64 dims, so any two random tables are
    # partly linearly related (the token-identity effect); the blocks are not.
    assert other.units[0].matched_correlation < 0.6
    for unit in other.units[1:]:
        assert unit.matched_correlation < 0.4
        assert unit.predicted_share < 0.2
    assert max(other.diagonal) < 0.9  # and CKA itself sees two unrelated random models
    assert "matched r" in format_report(permuted)


def test_fail_under_exit_codes_name_the_layer(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["cka", str(models["a"]), str(models["permuted"]), *SMALL, "--fail-under", "0.99"])
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "low.json"
    code = main(
        [
            "cka",
            str(models["a"]),
            str(models["other"]),
            *SMALL,
            "--fail-under",
            "0.99",
            "--json",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(out.read_text())  # the report is still written before failing
    lowest = min(report["diagonal"])
    layer = report["layers_a"][report["diagonal"].index(lowest)]
    assert f"{lowest:.3f} at {layer}" in captured.err
    assert "falls below 0.99" in captured.err
    assert "Fix:" in captured.err
    assert "Traceback" not in captured.err
    assert "block.0" in captured.out


def test_models_of_different_depth_pair_by_relative_depth(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "depth.json"
    assert main(["cka", str(models["a"]), str(models["deep"]), *SMALL, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["layers_b"]) == 5
    assert len(report["matrix"][0]) == 5
    assert report["diagonal_pairs"] == [[0, 0], [1, 2], [2, 4]]
    assert report["diagonal"] == pytest.approx(
        [report["matrix"][i][j] for i, j in report["diagonal_pairs"]]
    )


def test_diagonal_pairs_rule() -> None:
    assert diagonal_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert diagonal_pairs(5, 3) == [(0, 0), (2, 1), (4, 2)]
    assert diagonal_pairs(3, 7) == [(0, 0), (1, 3), (2, 6)]


def test_a_token_subsample_is_the_default_and_mean_counts_windows(
    models: dict[str, Path], tmp_path: Path
) -> None:
    reports: list[dict[str, Any]] = []
    for flags in ([], ["--pooling", "mean"], ["--tokens-per-window", "0"]):
        out = tmp_path / f"{len(reports)}.json"
        assert (
            main(
                ["cka", str(models["a"]), str(models["other"]), *SMALL, *flags, "--json", str(out)]
            )
            == 0
        )
        reports.append(json.loads(out.read_text()))
    sampled, mean, every = reports
    assert sampled["pooling"] == "tokens"
    assert sampled["tokens_per_window"] == 16
    assert sampled["tokens"] > 6 * 16  # every window has more than 16 tokens to pick from
    assert sampled["cka_samples"] == 6 * 16
    assert mean["pooling"] == "mean"
    assert mean["tokens_per_window"] is None
    assert mean["cka_samples"] == mean["samples"] == 6
    assert every["pooling"] == "tokens"
    assert every["tokens_per_window"] is None
    assert every["cka_samples"] == every["tokens"] == sampled["tokens"]


def test_tokens_per_window_needs_token_pooling(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(models["a"])
    assert main(["cka", a, a, *SMALL, "--pooling", "mean", "--tokens-per-window", "8"]) == 1
    err = capsys.readouterr().err
    assert "--tokens-per-window '8': applies to --pooling tokens only" in err
    assert "Fix:" in err


def test_errors_are_one_paragraph(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["a"] / name, bare / name)
    assert main(["cka", str(bare), str(models["a"]), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "has no tokenizer" in err
    assert "Fix:" in err
    assert "Traceback" not in err
    assert main(["cka", str(models["a"]), str(models["a"]), "--pooling", "max"]) == 1
    assert "Unknown pooling 'max'" in capsys.readouterr().err
    assert (
        main(["cka", str(models["a"]), str(models["a"]), "--data", str(tmp_path / "no.txt")]) == 1
    )
    assert "no such file" in capsys.readouterr().err
    bert = save_lm("bert", tmp_path / "bert", seed=0)
    assert main(["cka", str(models["a"]), str(bert), *SMALL]) == 1
    assert "tokenizers differ" in capsys.readouterr().err


def test_route_block_suggests_calibration_text_per_model() -> None:
    from hfmerge.pipeline.gate import route_block
    from hfmerge.recipe.schema import parse_recipe

    recipe = parse_recipe(
        {"models": ["zoo:code", "zoo:prose", "org/other"], "merge": {"method": "linear"}}
    )
    block = route_block(recipe)
    assert block.splitlines()[:2] == ["route:", "  method: centroid"]
    assert "builtin:code-train" in block
    assert "builtin:prose-train" in block
    assert "text typical of org/other's inputs" in block


def test_wide_models_are_refused_only_where_the_statistics_cannot_fit() -> None:
    from hfmerge.analysis.cka_samples import check_memory
    from hfmerge.errors import HfMergeError

    check_memory([768] * 13, [768] * 13, samples=4096, streaming=True)  # BERT-base: fine
    with pytest.raises(HfMergeError, match="--pooling mean with at most 4096 windows"):
        check_memory([4096] * 33, [4096] * 33, samples=8192, streaming=True)  # 7B: 140+ GiB
    # Rows and Grams below the width: 256 windows, or 64 of them at 16 tokens each, fit a 7B;
    # 256 windows at 16 tokens each (8.3 GiB of rows and 8.3 GiB of Grams) do not.
    check_memory([4096] * 33, [4096] * 33, samples=256, streaming=False)
    check_memory([4096] * 33, [4096] * 33, samples=64 * 16, streaming=False)
    with pytest.raises(HfMergeError, match="Gram matrix per layer"):
        check_memory([4096] * 33, [4096] * 33, samples=256 * 16, streaming=False)


def pair_values(models: dict[str, Path], placement: ProbePlacement) -> torch.Tensor:
    """The CKA matrix of A and another init with the models placed as `placement` says."""
    from hfmerge.lm.batches import probe_batches
    from hfmerge.lm.textdata import load_texts

    pair = open_pair(
        source_of(models["a"]), source_of(models["other"]), device_map="cpu", max_memory=None
    )
    pair = dataclasses.replace(pair, placement=placement)
    windows, _ = probe_windows(pair, load_texts(None), max_length=32, samples=6)
    widths = [[w] * d for w, d in zip(pair.widths(), pair.depths(), strict=True)]
    matrix = CkaMatrix(*widths)
    for states in pair.states(
        probe_batches(windows, pair.tokenizer, batch_size=4),
        pooling="tokens",
        tokens_per_window=16,
        progress=False,
    ):
        matrix.update(states.a, states.b)
    return matrix.values("debiased")


def test_models_run_one_at_a_time_or_offloaded_give_the_same_cka(models: dict[str, Path]) -> None:
    together = pair_values(models, ProbePlacement("cpu", None))
    alone = pair_values(models, ProbePlacement("auto", None, one_at_a_time=True))
    offloaded = pair_values(
        models, ProbePlacement("auto", {"cpu": "1KiB"}, one_at_a_time=True, offload=True)
    )
    assert together.shape == (3, 3)
    assert torch.equal(alone, together)
    assert torch.allclose(offloaded, together, atol=1e-6)
    assert not torch.allclose(
        together, torch.ones(3, 3, dtype=torch.float64), atol=1e-2
    )  # another init: not all 1


def test_one_size_of_max_memory_plans_the_placement(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = SMALL[:-2]  # no --device-map: a budget plans it
    out = tmp_path / "cka.json"
    args = ["cka", str(models["a"]), str(models["permuted"]), *flags]
    assert main([*args, "--max-memory", "100GB", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["placement"] == "together"
    assert settings["max_memory"] == "100 GB"
    capsys.readouterr()
    assert main([*args, "--max-memory", "100MB"]) == 1
    err = capsys.readouterr().err
    assert "cannot hold the probe of even one model" in err
    assert "GB or more" in err
    assert main([*args, "--max-memory", "100GB", "--device-map", "cpu"]) == 1
    assert "cannot be combined with a single --max-memory size" in capsys.readouterr().err
