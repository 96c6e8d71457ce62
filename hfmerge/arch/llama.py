"""Llama-style decoders (Llama, Mistral, Qwen2 and others named alike): RMSNorm, RoPE, GQA, SwiGLU.

RoPE pins every Q/K dim inside a head, so attention permutes KV groups (with their query heads),
query heads inside a group, and V/O dims inside a head; gate_proj and up_proj share one FF order.
Granite's scalar multipliers (embedding, residual, attention, logits), SmolLM3's RoPE-free
layers and Ministral's sliding windows change nothing a permutation touches: the same spec holds.
InternLM3 and IQuest-Coder checkpoints load as LlamaForCausalLM in transformers. Helium and
ERNIE 4.5 rotate interleaved pairs of Q/K dims (not the two halves); every Q/K dim is pinned here,
so the pairing does not matter.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from hfmerge.arch.common import config_flag
from hfmerge.arch.decoder import Biases, DecoderBlock, build_decoder
from hfmerge.arch.spec import ArchSpec

NAME = "llama"
MODEL_TYPES = (
    "llama",
    "mistral",
    "ministral",
    "qwen2",
    "granite",
    "smollm3",
    "seed_oss",
    "internlm3",
    "iquestcoder",
    "helium",
    "ernie4_5",
)
DESCRIPTION = (
    "Llama-style decoders (Llama, Mistral, Ministral, Qwen2, Granite, SmolLM3, Seed-OSS, "
    "InternLM3, IQuest-Coder, Helium, ERNIE 4.5); RoPE, GQA, SwiGLU, tied or untied head"
)
TIED_BY_DEFAULT = frozenset(
    {"smollm3", "ernie4_5"}
)  # model types whose config defaults to a tied head
# Other config.json spellings of Llama's bias flags (transformers' InternLM3Config.attribute_map).
_FLAG_ALIASES = {"internlm3": {"attention_bias": "qkv_bias", "mlp_bias": "bias"}}


def _flag(config: Mapping[str, Any], key: str, *, default: bool) -> bool:
    """A bias flag of config.json, under its own name or the model type's alias."""
    alias = _FLAG_ALIASES.get(str(config.get("model_type")), {}).get(key)
    if config.get(key) is None and alias is not None:
        return config_flag(config, alias, default=default)
    return config_flag(config, key, default=default)


def _biases(config: Mapping[str, Any]) -> Biases:
    """Which projections carry a bias, as each model type's modeling code fixes or reads it."""
    model_type = config.get("model_type")
    if model_type == "qwen2":  # Qwen2Attention hard-codes bias=True on q/k/v only
        return Biases(qkv=True)
    if model_type in ("mistral", "ministral"):  # their attention and MLP hard-code bias=False
        return Biases()
    if model_type == "ernie4_5":  # one flag for every projection
        use_bias = config_flag(config, "use_bias", default=False)
        return Biases(qkv=use_bias, o=use_bias, mlp=use_bias)
    if model_type == "helium":  # o_proj hard-codes bias=False
        return Biases(
            qkv=config_flag(config, "attention_bias", default=False),
            mlp=config_flag(config, "mlp_bias", default=False),
        )
    mlp = _flag(config, "mlp_bias", default=False)
    if model_type == "seed_oss":  # q/k/v and o read separate flags
        return Biases(
            qkv=config_flag(config, "attention_bias", default=True),
            o=config_flag(config, "attention_out_bias", default=False),
            mlp=mlp,
        )
    attention_bias = _flag(config, "attention_bias", default=False)
    return Biases(qkv=attention_bias, o=attention_bias, mlp=mlp)


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The Llama-family spec of one checkpoint; the `model.` prefix is read from tensor names."""
    return build_decoder(
        config,
        tensor_names,
        family=NAME,
        block=DecoderBlock(biases=_biases(config)),
        tied_by_default=config.get("model_type") in TIED_BY_DEFAULT,
        label=label,
    )
