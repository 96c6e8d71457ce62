"""Tiny language models with real tokenizers for eval and barrier tests.

A character-level tokenizer fits the tiny models' 97-token vocabulary; `train_tiny_lm` gives a model
that has learned something in about a second, so interpolation can hurt it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from hfmerge.arch import spec_for
from hfmerge.arch.permute import permute_state_dict, random_permutations
from hfmerge.runtime import fixed_threads
from hfmerge.sources.refs import ModelSource, resolve_model
from hfmerge.zoo import corpus
from tests.support.tiny_models import VOCAB, add_noise, make_tiny_model

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,;:!?'\"()[]{}-_=+*/<>#%&|@$^~`\\\t"
# Specials per tokenizer style: (token names in id order, template, special-token kwargs).
_STYLES: dict[str, tuple[list[str], str | None, dict[str, str]]] = {
    "llama": (
        ["<s>", "</s>", "<pad>", "<unk>"],
        "<s> $A",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
    "gpt2": (
        ["<|endoftext|>"],
        None,
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    ),
    "bert": (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        "[CLS] $A [SEP]",
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        },
    ),
}


def style_of(kind: str) -> str:
    """Which tokenizer style a tiny model kind uses."""
    return "bert" if kind.startswith("bert") else "gpt2" if kind == "gpt2" else "llama"


def char_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A lowercasing one-character-per-token tokenizer of at most 97 ids."""
    specials, template, names = _STYLES[style]
    vocab = {token: i for i, token in enumerate([*specials, *CHARS])}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join back without spaces
    if template is not None:
        ids = [(t, vocab[t]) for t in specials if t in template]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=ids
        )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, model_max_length=64, **names
    )


def source_of(path: Path) -> ModelSource:
    """A local model directory as the resolved source that analysis functions take."""
    return resolve_model(str(path))


def save_lm(
    kind: str, path: Path, *, seed: int = 0, model: PreTrainedModel | None = None, **overrides: Any
) -> Path:
    """Save a tiny model of `kind` (or `model`) with a matching char tokenizer into `path`."""
    model = model or make_tiny_model(kind, seed=seed, **overrides)
    model.save_pretrained(path)
    char_tokenizer(style_of(kind)).save_pretrained(path)
    return path


def save_lm_with_tokens(
    path: Path,
    *,
    seed: int,
    scale: float,
    added: list[str],
    chat_template: str | None = None,
    **overrides: Any,
) -> Path:
    """A fine-tune stand-in of the tiny Llama (seed 0 plus `scale` noise drawn from `seed`) with
    the char tokenizer, saved into `path`. With `added`, filler tokens first fill the tokenizer up
    to the embedding's padded rows, then `added` become special tokens at the rows after them,
    with random embedding and head rows (a fine-tune that added chat tokens)."""
    model = add_noise(make_tiny_model("llama", seed=0, **overrides), seed=seed, scale=scale)
    tokenizer = char_tokenizer(style_of("llama"))
    if added:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB - len(tokenizer))])
        tokenizer.add_tokens(added, special_tokens=True)  # rows VOCAB, VOCAB + 1, ...
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        generator = torch.Generator().manual_seed(seed)
        state = model.state_dict()  # shares storage with the parameters
        with torch.no_grad():
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                weight: torch.Tensor = state[name]
                weight[VOCAB:] = torch.randn(len(added), weight.shape[1], generator=generator)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _train_windows(tokenizer: PreTrainedTokenizerFast, *, length: int) -> torch.Tensor:
    text = corpus.train_text("prose")[:60_000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    count = len(ids) // (length - 1)
    tiles = ids[: count * (length - 1)].view(count, length - 1)  # [n, length - 1]
    bos = torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, tiles], dim=1)  # [n, length]


def train_tiny_lm(
    kind: str = "llama", *, seed: int = 0, steps: int = 120, **overrides: Any
) -> PreTrainedModel:
    """A tiny causal LM briefly trained on pydoc prose (deterministic; about a second on a CPU)."""
    model = make_tiny_model(kind, seed=seed, **overrides)
    windows = _train_windows(char_tokenizer(style_of(kind)), length=48)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with fixed_threads(1):  # two threads on a shared 2-core box spin at barriers: ~15x slower
        for _ in range(steps):
            batch = windows[torch.randint(0, len(windows), (16,), generator=generator)]  # [16, 48]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.train(False)
    return model


def save_permuted_copy(source: Path, out: Path, *, seed: int = 1) -> Path:
    """`source` with a random valid permutation applied to every group: same function, new basis."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    spec = spec_for(config, tensors.keys())
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    save_file(
        permute_state_dict(tensors, spec, perms),
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out


def save_head_beside_embedding(path: Path) -> Path:
    """A saved tied model (`tie_word_embeddings: true`) rewritten with its head saved too, equal
    to the embedding, as some checkpoints are: the config ties them, the file holds both."""
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    return path
