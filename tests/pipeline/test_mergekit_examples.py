"""Configs shaped like every config in mergekit's examples folder and its README's tokenizer and
chat-template sections run with `hfmerge run` as they are and give mergekit's tensors.

Tiny five-block Llama models with a character tokenizer stand in for the 13B models the examples
name (their block ranges scaled from 40 blocks to 5). Each config runs twice: as written (in
float16 or bfloat16, which mergekit also computes in, so the two differ by that rounding) and in
float32 (where they agree to 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.lm import save_lm_with_tokens
from tests.support.mergekit import TOLERANCE, run_both

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]

# As written, mergekit computes in float16 or bfloat16 and hfmerge in float32: a few steps of
# the written dtype at these weights' size (below 2).
LOW_PRECISION_TOLERANCE = {"float16": 5e-3, "bfloat16": 4e-2}
# As written, mergekit computes in float16 (or bfloat16) and hfmerge in float32: besides the
# rounding, the methods that keep or drop entries by comparing magnitudes (TIES's trim,
# arcee_fusion's threshold) and the averaged embedding rows of a union vocabulary decide a few
# entries differently. At least this share of each tensor's entries agrees to rounding.
AS_WRITTEN_AGREEMENT = 0.9
CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = "{{ 'chat:' + messages[0]['content'] }}"  # what `chat_template: auto` finds
NAMES = ["base", "orca", "platypus", "wizard", "chatml_model", "llama3_model"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("examples")
    added = {"chatml_model": CHATML, "llama3_model": LLAMA3}
    return {
        name: str(
            save_lm_with_tokens(
                root / name,
                seed=seed,
                scale=0.02,
                added=added.get(name, []),
                chat_template=CHAT_TEMPLATE if name in added else None,
                num_hidden_layers=5,
            )
        )
        for seed, name in enumerate(NAMES)
    }


def examples(m: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The configs, each shaped like one of mergekit's (its keys, methods and parameters)."""
    return {
        "linear": {
            "models": [
                {"model": m["orca"], "parameters": {"weight": 1.0}},
                {"model": m["wizard"], "parameters": {"weight": 0.3}},
                {"model": m["platypus"], "parameters": {"weight": 0.5}},
            ],
            "merge_method": "linear",
            "dtype": "float16",
        },
        "ties_gradients": {
            "models": [
                {"model": m["orca"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                {
                    "model": m["platypus"],
                    "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]},
                },
                {
                    "model": m["wizard"],
                    "parameters": {
                        "density": 0.33,
                        "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}],
                    },
                },
            ],
            "merge_method": "ties",
            "base_model": m["base"],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float16",
        },
        "bio_merge": {
            "models": [
                {"model": m["orca"], "parameters": {"density": 0.5, "weight": 0.5}},
                {"model": m["platypus"], "parameters": {"density": 0.5, "weight": 0.5}},
            ],
            "merge_method": "ties",
            "base_model": m["base"],
            "parameters": {"normalize": False, "int8_mask": True},
            "dtype": "float16",
        },
        "gradient_slerp": {
            "slices": [
                {
                    "sources": [
                        {"model": m["orca"], "layer_range": [0, 5]},
                        {"model": m["platypus"], "layer_range": [0, 5]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": m["orca"],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float16",
        },
        "passthrough_deeper": {
            "slices": [
                {"sources": [{"model": m["orca"], "layer_range": [0, 3]}]},
                {"sources": [{"model": m["platypus"], "layer_range": [2, 5]}]},
            ],
            "merge_method": "passthrough",
            "dtype": "float16",
        },
        "arcee_fusion": {
            "models": [{"model": m["orca"]}, {"model": m["platypus"]}],
            "merge_method": "arcee_fusion",
            "base_model": m["orca"],
            "dtype": "bfloat16",
        },
        "tokenizer_practical": {
            "models": [
                {"model": m["chatml_model"], "parameters": {"weight": 0.5}},
                {"model": m["llama3_model"], "parameters": {"weight": 0.5}},
            ],
            "merge_method": "linear",
            "tokenizer": {
                "source": "union",
                "tokens": {
                    "<|im_start|>": {"source": m["chatml_model"]},
                    "<|im_end|>": {"source": m["chatml_model"]},
                    **{t: {"source": m["llama3_model"], "force": True} for t in LLAMA3},
                },
            },
            "chat_template": "auto",
            "dtype": "float16",
        },
        "tokenizer_sources": {
            "models": [
                {"model": m["chatml_model"], "parameters": {"weight": 0.7}},
                {"model": m["base"], "parameters": {"weight": 0.3}},
            ],
            "merge_method": "linear",
            "tokenizer": {
                "source": "union",
                "tokens": {
                    "<|renamed|>": {
                        "source": {"kind": "model_token", "model": m["chatml_model"], "token": "a"}
                    },
                    "<|unused|>": {"source": {"kind": "zero"}},
                    "b": {"source": m["base"], "force": True},
                },
            },
            "chat_template": "chatml",
            "dtype": "float16",
        },
        "legacy_tokenizer_source": {
            "models": [
                {"model": m["chatml_model"], "parameters": {"weight": 0.5}},
                {"model": m["orca"], "parameters": {"weight": 0.5}},
            ],
            "merge_method": "linear",
            "tokenizer_source": "union",
            "dtype": "float16",
        },
    }


def in_our_token_order(
    tensors: dict[str, torch.Tensor], their_vocab: dict[str, int], our_vocab: dict[str, int]
) -> dict[str, torch.Tensor]:
    """mergekit's token-indexed rows in our vocabulary's order. mergekit adds a union's tokens in
    the iteration order of a set of models, which changes from run to run (string hashing); the
    tokens are the same, and each token's row must be."""
    if their_vocab == our_vocab or their_vocab.keys() != our_vocab.keys():
        return tensors  # nothing to reorder (or a real difference, which the asserts report)
    order = torch.tensor([their_vocab[t] for t in sorted(our_vocab, key=our_vocab.__getitem__)])
    reordered = dict(tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = tensors[name]
        reordered[name] = torch.cat([rows[order], rows[len(order) :]])  # then the padding rows
    return reordered


@pytest.mark.parametrize("name", list(examples({n: n for n in NAMES})))
@pytest.mark.parametrize("dtype", ["as written", "float32"])
def test_each_example_runs_as_written_and_gives_mergekits_tensors(
    name: str, dtype: str, models: dict[str, str], tmp_path: Path
) -> None:
    config = examples(models)[name]
    if dtype == "float32":
        config |= {"dtype": dtype}
    text = yaml.safe_dump(config, sort_keys=False)
    _, ours, theirs = run_both(text, tmp_path, copy_tokenizer=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    expected = AutoTokenizer.from_pretrained(tmp_path / "mergekit")
    theirs = in_our_token_order(theirs, expected.get_vocab(), tokenizer.get_vocab())
    tolerance = TOLERANCE if dtype == "float32" else LOW_PRECISION_TOLERANCE[config["dtype"]]
    worst = max(float((ours[t].float() - theirs[t].float()).abs().max()) for t in ours)
    print(f"{name} {dtype}: max |hfmerge - mergekit| = {worst:.3g}")  # shown with -s
    for tensor in ours:
        # the config's dtype (mergekit's arcee_fusion writes float32 whatever it says)
        assert ours[tensor].dtype == getattr(torch, config["dtype"]), tensor
        close = torch.isclose(ours[tensor].float(), theirs[tensor].float(), atol=tolerance)
        if dtype == "float32":
            assert bool(close.all()), tensor
        else:  # see AS_WRITTEN_AGREEMENT
            assert float(close.float().mean()) >= AS_WRITTEN_AGREEMENT, tensor
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size"):
        assert ours_config[key] == theirs_config[key], key
    assert tokenizer.get_vocab().keys() == expected.get_vocab().keys()
    if "chat_template" in config:  # otherwise hfmerge keeps the base's, where mergekit's union
        # tokenizer drops it; named templates are written differently but render the same text
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        rendered = [
            t.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            for t in (tokenizer, expected)
        ]
        assert rendered[0] == rendered[1]
    sample = "<|im_start|>hi<|im_end|><|eot_id|>"
    assert tokenizer.tokenize(sample) == expected.tokenize(sample)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    ids = torch.tensor([tokenizer(sample)["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
