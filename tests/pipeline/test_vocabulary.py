"""Merging models whose vocabularies differ: a fine-tune that added chat tokens.

Tiny Llama models in float32 with a character tokenizer of 75 tokens over 97 embedding rows (a
padded vocabulary): a base, a fine-tune of it, and a fine-tune that added 22 tokens and then
`<|im_start|>` and `<|im_end|>` (99 rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfmerge import api
from tests.support.lm import char_tokenizer, save_lm_with_tokens, style_of
from tests.support.mergekit import TOLERANCE, run_both
from tests.support.tiny_models import VOCAB
from tests.support.weights import read_weights

CHAT = ["<|im_start|>", "<|im_end|>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": save_lm_with_tokens(root / "base", seed=0, scale=0.0, added=[]),
        "chat": save_lm_with_tokens(root / "chat", seed=1, scale=0.02, added=CHAT),
        "plain": save_lm_with_tokens(root / "plain", seed=2, scale=0.04, added=[]),
    }


def _run(config: dict[str, Any], tmp_path: Path, name: str = "ours") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    api.run(path, api.RunOptions(out=tmp_path / name, force=True, progress=False))
    return tmp_path / name


def test_without_a_tokenizer_section_the_base_vocabulary_is_kept(
    models: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "models": [str(models["chat"]), str(models["plain"])],
        "base": str(models["base"]),
        "merge": {"method": "linear"},
    }
    out = read_weights(_run(config, tmp_path))
    chat, plain = read_weights(models["chat"]), read_weights(models["plain"])
    tokens = len(char_tokenizer(style_of("llama")))
    for name in (EMBED, HEAD):
        assert out[name].shape == (VOCAB, chat[name].shape[1])  # the base's padded size
        expected = (chat[name][:tokens] + plain[name][:tokens]) / 2
        assert torch.allclose(out[name][:tokens], expected, atol=1e-6)
        # Padding rows: the mean of the token rows.
        assert torch.allclose(out[name][tokens:], expected.mean(dim=0).expand(VOCAB - tokens, -1))


def test_validate_says_which_tokens_are_dropped(models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "r.yml"
    config = {
        "models": [str(models["chat"]), str(models["plain"])],
        "base": str(models["base"]),
        "merge": {"method": "linear"},
        "output": {"path": str(tmp_path / "never")},
    }
    path.write_text(yaml.safe_dump(config))
    notes = "\n".join(api.validate(path).notes)
    assert "dropped" in notes
    assert "'<|im_start|>'" in notes
    assert "source: union" in notes
    assert not (tmp_path / "never").exists()


CONFIGS: dict[str, dict[str, Any]] = {
    "union_linear": {"tokenizer_source": "union", "merge_method": "linear"},
    "union_task_arithmetic": {"tokenizer_source": "union", "merge_method": "task_arithmetic"},
    "tokens_and_padding": {
        "tokenizer": {
            "source": "union",
            "tokens": {
                "<|im_start|>": {"source": {"kind": "zero"}, "force": True},
                "a": {"source": {"kind": "model_token", "model": "CHAT", "token": "b"}},
            },
            "pad_to_multiple_of": 8,
        },
        "merge_method": "ties",
    },
}


@pytest.mark.mergekit
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_union_tokenizer_merge_gives_mergekits_tensors_and_tokenizes_the_chat_tokens(
    name: str, models: dict[str, Path], tmp_path: Path
) -> None:
    chat = json.dumps(str(models["chat"]))
    config = json.loads(json.dumps(CONFIGS[name]).replace('"CHAT"', chat))
    pruned = {"density": 0.7} if config["merge_method"] == "ties" else {}
    config["models"] = [
        {"model": str(models["chat"]), "parameters": {"weight": 0.6, **pruned}},
        {"model": str(models["plain"]), "parameters": {"weight": 0.4, **pruned}},
    ]
    if config["merge_method"] != "linear":  # mergekit's linear would merge the base in too
        config["base_model"] = str(models["base"])
    config["dtype"] = "float32"
    _, ours, theirs = run_both(yaml.safe_dump(config, sort_keys=False), tmp_path)
    for tensor in ours:
        assert ours[tensor].shape == theirs[tensor].shape, tensor
        assert torch.allclose(ours[tensor], theirs[tensor], rtol=0, atol=TOLERANCE), tensor
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    ids = tokenizer("<|im_start|>hi<|im_end|>", add_special_tokens=False)["input_ids"]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert isinstance(start, int)
    assert ids[0] == start >= VOCAB
    assert len(ids) == 4
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["vocab_size"] == ours[EMBED].shape[0] >= len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.isfinite(model(torch.tensor([ids])).logits).all()


def test_a_chat_template_alone_sets_the_template_and_keeps_the_vocabulary(
    models: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "models": [str(models["base"]), str(models["plain"])],
        "merge": {"method": "linear"},
        "tokenizer": {"chat_template": "chatml"},
    }
    out = _run(config, tmp_path)
    assert read_weights(out)[EMBED].shape[0] == VOCAB  # no remap: the padded rows stay
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_mergekits_chat_template_key_runs(models: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "models": [{"model": str(models["base"])}, {"model": str(models["plain"])}],
        "merge_method": "linear",
        "chat_template": "{{ 'custom:' + messages[0]['content'] }}",
    }
    out = _run(config, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "custom:x"
    )
