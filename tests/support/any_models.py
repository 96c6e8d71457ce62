"""Tiny random models of model_types that no hfmerge family covers, for the generic merge path.

Each is built from its transformers config (`AutoConfig.for_model`) with the Auto class its head
needs, hidden 32, 2 layers, a 97-token vocabulary, and saved with `save_pretrained` (safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from tests.support.tiny_models import VOCAB, add_noise

Inputs = Literal["text", "seq2seq", "image"]
# How a refusal lists the llama family among those that have a spec.
LLAMA_FAMILY = (
    "llama (llama, mistral, ministral, qwen2, granite, smollm3, seed_oss, internlm3, iquestcoder, "
    "helium, ernie4_5)"
)


@dataclass(frozen=True)
class AnyModel:
    """One tiny model: its config.json model_type, the Auto class that builds it, its fields."""

    model_type: str
    auto: str  # the transformers Auto class that builds (and must load) it
    fields: dict[str, Any]
    inputs: Inputs = "text"


_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
}
_GQA = {**_SIZES, "num_key_value_heads": 2}
_CAUSAL = "AutoModelForCausalLM"
_MASKED = "AutoModelForMaskedLM"
_ROBERTA = {**_SIZES, "max_position_embeddings": 80, "pad_token_id": 1}  # positions start at 2
_BART = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "max_position_embeddings": 64,
}

ANY_MODELS: dict[str, AnyModel] = {
    # decoders
    "helium": AnyModel("helium", _CAUSAL, {**_GQA, "head_dim": 8, "pad_token_id": 0}),
    "hunyuan_v1_dense": AnyModel(
        "hunyuan_v1_dense", _CAUSAL, {**_GQA, "head_dim": 8, "pad_token_id": 0}
    ),
    "cohere2": AnyModel("cohere2", _CAUSAL, {**_GQA, "pad_token_id": 0}),  # tied head
    "phi": AnyModel("phi", _CAUSAL, _GQA),
    "stablelm": AnyModel("stablelm", _CAUSAL, _GQA),
    "arcee": AnyModel("arcee", _CAUSAL, {**_GQA, "pad_token_id": 0}),
    "starcoder2": AnyModel("starcoder2", _CAUSAL, _GQA),
    "cohere": AnyModel("cohere", _CAUSAL, _GQA),
    "falcon": AnyModel(
        "falcon", _CAUSAL, {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    ),
    "gptj": AnyModel(
        "gptj",
        _CAUSAL,
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
    ),
    "opt": AnyModel(
        "opt",
        _CAUSAL,
        {**_SIZES, "ffn_dim": 48, "word_embed_proj_dim": 32},
    ),
    "bloom": AnyModel("bloom", _CAUSAL, {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    # mixtures of experts: they have families now, and still merge here through their specs
    "mixtral": AnyModel(
        "mixtral", _CAUSAL, {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2}
    ),
    "qwen3_moe": AnyModel(
        "qwen3_moe",
        _CAUSAL,
        {
            **_GQA,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "decoder_sparse_step": 1,
        },
    ),
    # encoders
    "roberta": AnyModel("roberta", _MASKED, _ROBERTA),
    "distilbert": AnyModel(
        "distilbert",
        _MASKED,
        {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "max_position_embeddings": 64},
    ),
    "electra": AnyModel("electra", _MASKED, {**_SIZES, "embedding_size": 16}),
    "deberta-v2": AnyModel("deberta-v2", _MASKED, _SIZES),
    # a classifier head
    "roberta-cls": AnyModel(
        "roberta", "AutoModelForSequenceClassification", {**_ROBERTA, "num_labels": 3}
    ),
    # encoder-decoders
    "t5": AnyModel(
        "t5",
        "AutoModelForSeq2SeqLM",
        {"d_model": 32, "d_ff": 48, "d_kv": 8, "num_layers": 2, "num_heads": 4},
        "seq2seq",
    ),
    "bart": AnyModel("bart", "AutoModelForSeq2SeqLM", _BART, "seq2seq"),
    # vision
    "vit": AnyModel(
        "vit",
        "AutoModelForImageClassification",
        {**_SIZES, "image_size": 16, "patch_size": 8, "num_labels": 3},
        "image",
    ),
}


def make_any_model(kind: str, *, seed: int = 0) -> PreTrainedModel:
    """A random model of `kind` (a key of ANY_MODELS), float32, eval mode, eager attention."""
    spec = ANY_MODELS[kind]
    fields: dict[str, Any] = {"vocab_size": VOCAB, "decoder_start_token_id": 0, **spec.fields}
    if spec.inputs == "image":
        fields.pop("vocab_size")
        fields.pop("decoder_start_token_id")
    config = AutoConfig.for_model(spec.model_type, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    auto: Any = getattr(transformers, spec.auto)
    model: PreTrainedModel = auto.from_config(config)
    model.train(False)  # in place: eval mode
    return model


def save_any_model(kind: str, path: Path, *, seed: int = 0, noise_seed: int | None = None) -> Path:
    """`make_any_model` saved into `path`; with `noise_seed`, a noisy copy (a fine-tune)."""
    model = make_any_model(kind, seed=seed)
    if noise_seed is not None:
        add_noise(model, seed=noise_seed, scale=0.02)
    model.save_pretrained(path)
    return path


def any_inputs(kind: str) -> dict[str, torch.Tensor]:
    """A fixed batch the model of `kind` accepts: token ids, encoder-decoder ids, or pixels."""
    generator = torch.Generator().manual_seed(0)
    inputs = ANY_MODELS[kind].inputs
    if inputs == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if inputs == "seq2seq":
        batch["decoder_input_ids"] = ids[:, :5]
    return batch
