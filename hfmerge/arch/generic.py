"""The spec of a checkpoint whose model_type has no family: tensor names and shapes alone.

Such a model merges tensor by tensor like any other, but has no permutation groups, so nothing
that permutes or matches units (align, REPAIR, the CKA gate, router backbones) can run on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hfmerge.arch.config import config_field
from hfmerge.arch.spec import GENERIC_FAMILY, ArchSpec, TensorSpec

NAME = GENERIC_FAMILY
DESCRIPTION = "any other model_type transformers saves: plain tensor-by-tensor merges"

HEAD = "lm_head.weight"  # the output embedding of causal LMs and seq2seq LMs, when untied
# Input embeddings a tied head shares storage with, most common spelling first.
_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "shared.weight",
    "embed_in.weight",
)
_HEADED = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Last name parts that are always buffers (saved or kept, never loaded as parameters): RoPE
# frequencies, position and token-type ids, GPT-2's old masked_bias.
_BUFFER_LEAVES = frozenset({"inv_freq", "position_ids", "token_type_ids", "masked_bias"})
_CAUSAL_MASK_NDIM = 4  # GPT-2-style `attn.bias`: a [1, 1, n, n] causal mask, not a bias vector


def build(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> ArchSpec:
    """Every tensor of the checkpoint, with no group on any axis; buffers flagged by name.

    Args:
        config: parsed config.json (its `model_type` was already checked).
        shapes: every tensor name in the checkpoint with its shape (from the headers).
    """
    tensors = {
        name: TensorSpec(name, (None,) * len(shape), buffer=is_buffer_name(name, len(shape)))
        for name, shape in shapes.items()
    }
    return ArchSpec(GENERIC_FAMILY, str(config["model_type"]), {}, tensors, _tied(config, shapes))


def is_buffer_name(name: str, ndim: int) -> bool:
    """Whether a tensor of this name and rank is a buffer rather than a learned parameter."""
    parts = name.split(".")
    if parts[-1] in _BUFFER_LEAVES:
        return True
    return parts[-2:-1] == ["attn"] and parts[-1] == "bias" and ndim == _CAUSAL_MASK_NDIM


def _tied(config: Mapping[str, Any], names: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """{head: embedding} when the LM head is tied: the config does not untie it, the checkpoint
    lacks it (transformers saves a tied tensor once) and holds the embedding it shares."""
    architectures = [str(a) for a in config.get("architectures") or []]
    headed = any(a.endswith(_HEADED) for a in architectures)
    if not headed or HEAD in names or config_field(config, "tie_word_embeddings") is False:
        return {}
    for suffix in _EMBEDDINGS:
        shared = sorted(n for n in names if n == suffix or n.endswith("." + suffix))
        if shared:
            return {HEAD: shared[0]}
    return {}
