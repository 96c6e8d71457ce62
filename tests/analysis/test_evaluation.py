"""Evaluation: token-weighted loss equal to the models' own `labels=` loss, fixed MLM masks, CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from hfmerge.analysis.evaluation import eval_model
from hfmerge.cli.app import main
from hfmerge.errors import ModelSourceError
from hfmerge.lm.scoring import MASK_FRACTION, Scored, evaluate, mlm_masks, perplexity
from hfmerge.lm.textdata import load_texts, token_windows
from tests.support.lm import char_tokenizer, save_lm, source_of
from tests.support.tiny_models import make_tiny_model, save_tiny_model

TEXT = (
    "The with statement is used to wrap the execution of a block with methods defined by a "
    "context manager. This allows common try, except, finally usage patterns to be "
    "encapsulated for convenient reuse. "
) * 3


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


def direct_loss(model: PreTrainedModel, rows: Sequence[Scored], *, causal: bool) -> float:
    """Token-weighted mean of the model's own `labels=` loss, one window at a time, no padding."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            labels = row.labels if not causal else row.input_ids
            loss = model(input_ids=row.input_ids[None], labels=labels[None]).loss
            scored = len(row.input_ids) - 1 if causal else int((row.labels != -100).sum())
            total, count = total + float(loss) * scored, count + scored
    return total / count


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_causal_loss_equals_the_models_own_loss_token_weighted(kind: str) -> None:
    model, tokenizer = (
        make_tiny_model(kind, seed=3),
        char_tokenizer("gpt2" if kind == "gpt2" else "llama"),
    )
    # 23-token windows and a short last one: batches mix lengths, so padding must be masked.
    windows = token_windows(tokenizer, [TEXT, "short doc"], max_length=23, samples=None)
    assert len({len(w) for w in windows}) > 1
    rows = [Scored(w, w) for w in windows]
    expected = direct_loss(model, rows, causal=True)
    for batch_size in (1, 3, 64):
        result = evaluate(model, tokenizer, windows, batch_size=batch_size)
        assert result.loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert result.tokens == sum(len(w) - 1 for w in windows)
        assert result.windows == len(windows)
        assert result.objective == "causal"
        assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)


def test_token_weighting_differs_from_averaging_batches() -> None:
    model, tokenizer = make_tiny_model("llama", seed=1), char_tokenizer("llama")
    windows = token_windows(tokenizer, [TEXT[:200], "ab"], max_length=64, samples=None)
    result = evaluate(model, tokenizer, windows, batch_size=1)
    per_window = [evaluate(model, tokenizer, [w]).loss for w in windows]
    assert result.loss != pytest.approx(sum(per_window) / len(per_window), rel=1e-4)


def test_mlm_masks_are_fixed_by_seed_and_follow_the_15_percent_rule() -> None:
    tokenizer = char_tokenizer("bert")
    windows = token_windows(tokenizer, [TEXT], max_length=40, samples=None)
    first, second = mlm_masks(windows, tokenizer, seed=0), mlm_masks(windows, tokenizer, seed=0)
    other = mlm_masks(windows, tokenizer, seed=1)
    assert all(
        torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        for a, b in zip(first, second, strict=True)
    )
    assert any(not torch.equal(a.labels, c.labels) for a, c in zip(first, other, strict=True))
    special = set(tokenizer.all_special_ids)
    for window, row in zip(windows, first, strict=True):
        chosen = row.labels != -100
        plain = sum(int(t) not in special for t in window)
        assert int(chosen.sum()) == max(1, round(MASK_FRACTION * plain))
        assert (row.input_ids[chosen] == tokenizer.mask_token_id).all()
        assert torch.equal(row.labels[chosen], window[chosen])
        assert torch.equal(row.input_ids[~chosen], window[~chosen])  # specials never masked
        assert not any(int(t) in special for t in window[chosen])


def test_mlm_loss_uses_the_same_masks_for_two_models_and_matches_their_own_loss() -> None:
    tokenizer = char_tokenizer("bert")
    windows = token_windows(tokenizer, [TEXT], max_length=40, samples=None)
    masks = mlm_masks(windows, tokenizer, seed=0)
    for seed in (0, 1):
        model = make_tiny_model("bert", seed=seed)
        result = evaluate(model, tokenizer, windows, batch_size=4)
        assert result.objective == "masked"
        assert result.tokens == sum(int((m.labels != -100).sum()) for m in masks)
        assert result.loss == pytest.approx(direct_loss(model, masks, causal=False), rel=1e-5)
        again = evaluate(model, tokenizer, windows, batch_size=1)
        assert again.loss == pytest.approx(result.loss, rel=1e-6)
        assert evaluate(model, tokenizer, windows, mlm_seed=7).loss != pytest.approx(
            result.loss, rel=1e-6
        )


def test_eval_model_loads_dir_caps_length_and_matches_evaluate(tmp_path: Path) -> None:
    path = save_lm("llama", tmp_path / "m", seed=2)
    result = eval_model(source_of(path), data=None, max_length=128, samples=6)
    assert result.max_length == 64  # the tiny model has 64 positions
    assert result.data == "builtin:prose"
    assert result.windows == 6
    model, tokenizer = make_tiny_model("llama", seed=2), char_tokenizer("llama")
    windows = token_windows(tokenizer, load_texts(None), max_length=64, samples=6)
    assert result.loss == pytest.approx(evaluate(model, tokenizer, windows).loss, rel=1e-6)
    assert perplexity(1e6) == math.inf


def test_eval_model_on_bert_uses_the_masked_objective(tmp_path: Path) -> None:
    path = save_lm("bert", tmp_path / "bert", seed=0)
    assert eval_model(source_of(path), data=None, max_length=32, samples=4).objective == "masked"


def test_model_without_tokenizer_or_lm_head_is_a_clear_error(tmp_path: Path) -> None:
    bare = save_tiny_model("llama", tmp_path / "bare")
    with pytest.raises(ModelSourceError, match="has no tokenizer") as info:
        eval_model(source_of(bare), data=None)
    assert "save_pretrained" in str(info.value)
    headless = save_lm("bert_base_model", tmp_path / "headless")
    with pytest.raises(ModelSourceError, match="no language-model head"):
        eval_model(source_of(headless), data=None)


def test_cli_eval_prints_a_line_and_writes_json(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_lm("gpt2", chdir_tmp / "m", seed=0)
    data = chdir_tmp / "data.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    argv = [
        "eval",
        str(path),
        "--data",
        str(data),
        "--json",
        "out.json",
        "--max-length",
        "32",
        "--samples",
        "3",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads((chdir_tmp / "out.json").read_text())
    assert len(out) == 1
    assert f"loss {report['loss']:.4f}" in out[0]
    assert {"loss", "perplexity", "tokens", "model", "windows", "max_length"} <= report.keys()
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    windows = token_windows(char_tokenizer("gpt2"), [TEXT], max_length=32, samples=3)
    assert report["windows"] == 3
    assert report["tokens"] == sum(len(w) - 1 for w in windows)


def test_cli_eval_missing_data_file_is_one_paragraph_and_exit_1(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_lm("llama", chdir_tmp / "m")
    assert main(["eval", str(path), "--data", "nope.txt", "--json", "out.json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "nope.txt" in err
    assert "no such file" in err
    assert "Fix:" in err
    assert "Traceback" not in err
    assert "\n\n" not in err
    assert not (chdir_tmp / "out.json").exists()
