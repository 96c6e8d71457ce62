"""Tiny random Hugging Face models of every supported family, deterministic per seed, for tests.

Every parameter (norm weights and biases included) is random, so permutation bugs cannot hide behind
constant ones and zeros.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    Exaone4Config,
    Exaone4ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    HeliumConfig,
    HeliumForCausalLM,
    InternLM3Config,
    IQuestCoderConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SeedOssConfig,
    SeedOssForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from hfmerge.arch.permute import random_permutations
from hfmerge.arch.spec import ArchSpec, AttentionPerm, GroupPerm, PermGroup, Permutations

VOCAB = 97
MAX_POSITIONS = 64


@dataclass(frozen=True)
class TinyFamily:
    """How to build one tiny model kind: its config class, model class and config fields."""

    config_cls: Callable[..., PretrainedConfig]
    model_cls: Callable[..., PreTrainedModel]
    fields: dict[str, Any] = field(default_factory=dict)


_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": MAX_POSITIONS,
    "type_vocab_size": 2,
}
# 8 query heads over 2 KV heads (GQA, 4 queries per group), head_dim 8.
_LLAMA = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
}
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the tiny vocabulary
# Gemma: head_dim 16 with hidden 48 (4 heads: q rows 64 != hidden), tied head by default; sliding
# windows of 4 tokens are shorter than the test batches, so they really mask.
_GEMMA = {
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "max_position_embeddings": MAX_POSITIONS,
    **_TOKENS,
}
_WINDOWS = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}
# 4 experts, top-2 routing, 24 FF units per expert (hidden 32, 4 query heads over 2 KV heads).
_MOE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 24,
    "num_experts_per_tok": 2,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
    **_TOKENS,
}
# Mixture-of-experts models: transformers fuses their experts in memory, so their state_dict()
# names differ from the checkpoint's; tests/support/tiny_moe.py reads and writes them as saved.
TINY_MOE_FAMILIES: dict[str, TinyFamily] = {
    "mixtral": TinyFamily(
        MixtralConfig, MixtralForCausalLM, {**_MOE, "num_local_experts": 4, "sliding_window": None}
    ),
    # head_dim 16 (q rows 64 != hidden 32), experts of 12 units.
    "qwen3_moe": TinyFamily(
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {**_MOE, "num_experts": 4, "moe_intermediate_size": 12, "head_dim": 16},
    ),
}

TINY_FAMILIES: dict[str, TinyFamily] = {
    "bert": TinyFamily(BertConfig, BertForMaskedLM, _BERT),
    "bert_base_model": TinyFamily(BertConfig, BertModel, _BERT),
    "gpt2": TinyFamily(
        GPT2Config,
        GPT2LMHeadModel,
        {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": 48,
            "n_positions": MAX_POSITIONS,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    # head_dim 16 with rotary_pct 0.25: 4 rotary dims pinned, 12 free dims per head.
    "gpt_neox": TinyFamily(
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "rotary_pct": 0.25,
            "use_parallel_residual": True,
            "max_position_embeddings": MAX_POSITIONS,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    "llama": TinyFamily(LlamaConfig, LlamaForCausalLM, _LLAMA),
    "llama_tied": TinyFamily(
        LlamaConfig, LlamaForCausalLM, {**_LLAMA, "tie_word_embeddings": True}
    ),
    "mistral": TinyFamily(MistralConfig, MistralForCausalLM, {**_LLAMA, "sliding_window": None}),
    "qwen2": TinyFamily(Qwen2Config, Qwen2ForCausalLM, _LLAMA),
    # Llama in all but name: scalar multipliers (Granite), RoPE-free layers (SmolLM3), q/k/v bias
    # without an o bias (Seed-OSS).
    "granite": TinyFamily(
        GraniteConfig,
        GraniteForCausalLM,
        {
            **_LLAMA,
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 1.5,
        },
    ),
    "smollm3": TinyFamily(
        SmolLM3Config,
        SmolLM3ForCausalLM,
        {**_LLAMA, **_TOKENS, "no_rope_layers": [1, 0], "tie_word_embeddings": True},
    ),
    "seed_oss": TinyFamily(SeedOssConfig, SeedOssForCausalLM, {**_LLAMA, "head_dim": 8}),
    "ministral": TinyFamily(
        MinistralConfig, MinistralForCausalLM, {**_LLAMA, "head_dim": 8, "sliding_window": 4}
    ),
    # transformers runs both with its Llama classes; InternLM3 with every bias on.
    "internlm3": TinyFamily(
        InternLM3Config,
        LlamaForCausalLM,
        {**_LLAMA, **_TOKENS, "head_dim": 8, "attention_bias": True, "mlp_bias": True},
    ),
    "iquestcoder": TinyFamily(
        IQuestCoderConfig, LlamaForCausalLM, {**_LLAMA, **_TOKENS, "head_dim": 8}
    ),
    # Interleaved RoPE pairs; Helium with q/k/v and MLP biases (never on o_proj), ERNIE 4.5 with
    # every bias on and its default tied head.
    "helium": TinyFamily(
        HeliumConfig,
        HeliumForCausalLM,
        {**_LLAMA, **_TOKENS, "head_dim": 8, "attention_bias": True, "mlp_bias": True},
    ),
    "ernie4_5": TinyFamily(
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
        {**_LLAMA, **_TOKENS, "head_dim": 8, "use_bias": True, "tie_word_embeddings": True},
    ),
    # head_dim 16 with hidden 64 and 8 heads: q_proj has 128 rows.
    "qwen3": TinyFamily(Qwen3Config, Qwen3ForCausalLM, {**_LLAMA, "head_dim": 16}),
    "gemma": TinyFamily(GemmaConfig, GemmaForCausalLM, _GEMMA),
    "gemma2": TinyFamily(Gemma2Config, Gemma2ForCausalLM, {**_GEMMA, **_WINDOWS}),
    "gemma3_text": TinyFamily(Gemma3TextConfig, Gemma3ForCausalLM, {**_GEMMA, **_WINDOWS}),
    # head_dim 8, half of it rotary: Q/K dims 4..7 of each head may move.
    "phi3": TinyFamily(
        Phi3Config, Phi3ForCausalLM, {**_LLAMA, **_TOKENS, "partial_rotary_factor": 0.5}
    ),
    "olmo2": TinyFamily(Olmo2Config, Olmo2ForCausalLM, {**_LLAMA, **_TOKENS}),
    "olmo3": TinyFamily(Olmo3Config, Olmo3ForCausalLM, {**_LLAMA, **_TOKENS, **_WINDOWS}),
    # Layer 0 slides with RoPE, layer 1 is global without it.
    "exaone4": TinyFamily(
        Exaone4Config, Exaone4ForCausalLM, {**_LLAMA, **_TOKENS, **_WINDOWS, "head_dim": 8}
    ),
}


def _randomise(model: PreTrainedModel, *, seed: int) -> None:
    """Overwrite every parameter with seeded noise: matrices ~ N(0, 1/fan), 1-D ones off 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # deduplicated: tied ones once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if param.dim() >= 2:
                # Scale by the smaller side so Conv1D [in, out] and Linear [out, in] both stay O(1).
                value = noise / min(param.shape) ** 0.5
            elif name.endswith("weight"):  # norm gains
                value = 1.0 + 0.3 * noise
            else:
                value = 0.2 * noise
            param.copy_(value.to(param.dtype))


def _rms_norm_in_input_dtype(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)  # [..., 1]
    scaled: torch.Tensor = self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))
    return scaled


def _offset_rms_norm_in_input_dtype(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)  # [..., 1]
    scaled: torch.Tensor = (1.0 + self.weight) * (hidden * torch.rsqrt(variance + self.eps))
    return scaled


def _router_in_input_dtype(
    self: Any, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = hidden.reshape(-1, self.hidden_dim)  # [batch, seq, hidden] -> [tokens, hidden]
    logits = torch.nn.functional.linear(hidden, self.weight)  # [tokens, experts]
    top, chosen = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)  # [tokens, top_k]
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises its top-k
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, chosen


def exact_float64_norms(model: PreTrainedModel) -> PreTrainedModel:
    """Make RMSNorm and MoE routers compute in the input dtype (same function, no float32 rounding).

    transformers' RMSNorms (Llama-style, and Gemma's `1 + weight` one) and MoE routers' softmax
    upcast to float32 even for float64 inputs; their order-dependent rounding (~1e-7) would drown a
    1e-10 invariance check. No-op for float32.
    """
    if model.dtype != torch.float64:
        return model
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("TopKRouter"):
            module.forward = types.MethodType(_router_in_input_dtype, module)
        if not name.endswith("RMSNorm"):
            continue
        if hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
        elif name.startswith("Gemma") and hasattr(module, "eps"):
            module.forward = types.MethodType(_offset_rms_norm_in_input_dtype, module)
    return model


def make_tiny_model(
    kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A small random model of `kind` (see TINY_FAMILIES), in eval mode, eager attention.

    In float64, RMSNorm is made to compute in float64 (see `exact_float64_norms`).
    """
    family = TINY_FAMILIES[kind] if kind in TINY_FAMILIES else TINY_MOE_FAMILIES[kind]
    config = family.config_cls(vocab_size=VOCAB, **{**family.fields, **overrides})
    config._attn_implementation = "eager"  # exact same kernel before and after permuting
    torch.manual_seed(seed)  # anything transformers draws at init (overwritten below anyway)
    model = family.model_cls(config)
    _randomise(model, seed=seed)
    module: torch.nn.Module = model  # torch's typing of .to/.eval (transformers wraps them)
    module.to(dtype).eval()  # in place
    return exact_float64_norms(model)


def add_noise(model: PreTrainedModel, *, seed: int, scale: float) -> PreTrainedModel:
    """A fine-tune stand-in: every parameter plus `scale` times N(0, 1) noise drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def save_tiny_model(kind: str, path: str | Path, **kw: Any) -> Path:
    """Build `make_tiny_model(kind, **kw)` and save_pretrained it (safetensors) into `path`."""
    out = Path(path)
    make_tiny_model(kind, **kw).save_pretrained(out)
    return out


def tiny_batch(kind: str, *, seed: int = 0, batch: int = 2, length: int = 9) -> dict[str, Any]:
    """Random token ids with a padded second row (right padding); BERT also gets segment ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3 :] = 0  # three padding positions in the last row
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if kind.startswith("bert"):
        inputs["token_type_ids"] = torch.randint(0, 2, (batch, length), generator=generator)
    return inputs


def model_outputs(
    model: PreTrainedModel, inputs: dict[str, Any], *, residual: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Outputs that a valid permutation leaves unchanged.

    LM heads give logits. A bare encoder's last_hidden_state lives in the residual basis, so when
    `residual` (the residual gather index the model was permuted with) is given it is moved back.
    """
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "logits", None) is not None:
        return {"logits": out.logits}
    hidden = out.last_hidden_state
    if residual is not None:
        hidden = hidden.index_select(-1, torch.argsort(residual))  # [b, t, d]: back to old order
    result = {"last_hidden_state": hidden}
    if getattr(out, "pooler_output", None) is not None:
        result["pooler_output"] = out.pooler_output  # pooler rows are never permuted
    return result


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over matching outputs."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _moves(group: PermGroup, perm: GroupPerm) -> bool:
    """Whether every part of `perm` that the group allows to move does move."""
    if not isinstance(perm, AttentionPerm):
        return not torch.equal(perm, torch.arange(group.size))
    start, end = group.qk_free_dims
    parts = [
        (perm.kv_heads, group.num_kv_heads > 1),
        (perm.q_in_group, group.queries_per_kv > 1),
        (perm.vo_dims, True),
        (perm.qk_dims, end - start > 1),
    ]
    identity = identity_permutations_of(group)
    return all(not torch.equal(p, i) for (p, free), i in zip(parts, identity, strict=True) if free)


def identity_permutations_of(group: PermGroup) -> list[torch.Tensor]:
    """Identity kv_heads, q_in_group, vo_dims, qk_dims of an attention group (`_moves` order)."""
    kv, per_kv, dim = group.num_kv_heads, group.queries_per_kv, group.head_dim
    return [
        torch.arange(kv),
        torch.arange(per_kv).repeat(kv, 1),  # [kv, per_kv]
        torch.arange(dim).repeat(kv, 1),
        torch.arange(dim).repeat(kv, 1),
    ]  # [kv, head_dim]


def nontrivial_permutations(spec: ArchSpec, *, seed: int = 0, tries: int = 200) -> Permutations:
    """Random valid permutations in which every group (and every free part of it) really moves."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        perms = random_permutations(spec, generator)
        if all(_moves(spec.groups[name], perm) for name, perm in perms.items()):
            return perms
    raise AssertionError(f"no non-trivial permutation of the {spec.family} spec in {tries} draws")
