"""The generic spec of a model_type without a family, block indices from names, Auto classes."""

from __future__ import annotations

from typing import Any

import pytest

from hfmerge.arch import (
    GENERIC_FAMILY,
    check_shapes,
    family_of,
    permutable_family,
    require_permutable,
    spec_for,
)
from hfmerge.arch.generic import is_buffer_name
from hfmerge.arch.heads import auto_class_name
from hfmerge.arch.layers import layer_index
from hfmerge.errors import ArchitectureError, NoPermutationSpecError
from tests.support.any_models import LLAMA_FAMILY

# A causal LM with a tied head (no lm_head.weight), a RoPE buffer and GPT-2-style mask buffers.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (97, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.self_attn.rotary_emb.inv_freq": (4,),
    "model.layers.1.mlp.up_proj.weight": (48, 32),
    "model.h.1.attn.bias": (1, 1, 64, 64),
    "model.h.1.attn.masked_bias": (),
    "model.norm.weight": (32,),
}
CONFIG: dict[str, Any] = {"model_type": "newlm", "architectures": ["NewLMForCausalLM"]}


def test_a_model_type_without_a_family_gets_a_generic_spec() -> None:
    spec = spec_for(CONFIG, SHAPES, label="org/new", shapes=SHAPES)
    assert (spec.family, spec.model_type) == (GENERIC_FAMILY, "newlm")
    assert not spec.permutable
    assert spec.groups == {}
    assert spec.num_layers == 0
    assert spec.tensors.keys() == SHAPES.keys()
    for name, shape in SHAPES.items():
        assert spec.tensors[name].axes == (None,) * len(shape), name
    buffers = {name for name, tensor in spec.tensors.items() if tensor.buffer}
    assert buffers == {
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.h.1.attn.bias",
        "model.h.1.attn.masked_bias",
    }
    # Tied: the head shares the embedding, and the checkpoint holds the embedding once.
    assert spec.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    check_shapes(spec, SHAPES, label="org/new")  # nothing to contradict


def test_family_specs_stay_permutable() -> None:
    assert family_of({"model_type": "mistral"}) == "llama"
    assert family_of({"model_type": "t5"}) == GENERIC_FAMILY


@pytest.mark.parametrize(
    ("config", "names", "tied"),
    [
        # the nested text config of a multimodal checkpoint unties the head
        ({**CONFIG, "text_config": {"tie_word_embeddings": False}}, SHAPES, {}),
        ({**CONFIG, "tie_word_embeddings": False}, SHAPES, {}),
        # the checkpoint holds the head: not tied whatever the config says
        (
            {**CONFIG, "tie_word_embeddings": True},
            {**SHAPES, "lm_head.weight": (97, 32)},
            {},
        ),
        # a headless model has no head to tie
        ({"model_type": "newlm", "architectures": ["NewLMModel"]}, SHAPES, {}),
        # seq2seq: T5 keeps its one embedding as `shared`
        (
            {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
            {"shared.weight": (97, 32), "encoder.block.0.layer.0.layer_norm.weight": (32,)},
            {"lm_head.weight": "shared.weight"},
        ),
    ],
)
def test_tied_heads_come_from_the_config_and_the_checkpoint(
    config: dict[str, Any], names: dict[str, tuple[int, ...]], tied: dict[str, str]
) -> None:
    assert spec_for(config, names, shapes=names).tied == tied


def test_model_type_is_still_required() -> None:
    with pytest.raises(ArchitectureError, match="model_type"):
        spec_for({"architectures": ["X"]}, SHAPES, label="x", shapes=SHAPES)


def test_a_generic_spec_needs_the_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        spec_for(CONFIG, SHAPES, label="org/new")


def test_steps_that_permute_refuse_a_generic_model_naming_the_families() -> None:
    spec = spec_for(CONFIG, SHAPES, label="org/new", shapes=SHAPES)
    with pytest.raises(NoPermutationSpecError) as caught:
        require_permutable(spec, label="org/new", feature="recipe `align:`")
    error = caught.value
    assert (error.model, error.model_type, error.feature) == ("org/new", "newlm", "recipe `align:`")
    assert LLAMA_FAMILY in error.families
    assert "gemma (gemma, gemma2, gemma3_text)" in error.families
    text = str(error)
    assert "org/new" in text
    assert "recipe `align:` needs a permutation spec, and model_type 'newlm' has none" in text
    assert "bert (bert)" in text
    with pytest.raises(NoPermutationSpecError, match="REPAIR"):
        permutable_family(CONFIG, label="m", feature="REPAIR")
    assert permutable_family({"model_type": "gpt2"}, label="m", feature="REPAIR") == "gpt2"


def test_layer_index_gives_moe_experts_and_seq2seq_stacks_their_block() -> None:
    assert layer_index("model.layers.1.block_sparse_moe.experts.3.w1.weight") == 1
    assert layer_index("model.layers.0.mlp.experts.gate_up_proj") == 0
    assert layer_index("model.decoder.layers.1.encoder_attn.k_proj.weight") == 1


@pytest.mark.parametrize(
    ("name", "ndim", "buffer"),
    [
        ("model.rotary_emb.inv_freq", 1, True),
        ("bert.embeddings.position_ids", 2, True),
        ("roberta.embeddings.token_type_ids", 2, True),
        ("h.0.attn.bias", 4, True),
        ("h.0.attn.bias", 1, False),  # a real bias vector
        ("h.0.self_attn.bias", 4, False),
        ("model.layers.0.self_attn.q_proj.bias", 1, False),
    ],
)
def test_buffers_are_recognised_by_name(name: str, ndim: int, buffer: bool) -> None:
    assert is_buffer_name(name, ndim) is buffer


@pytest.mark.parametrize(
    ("config", "auto"),
    [
        ({"architectures": ["Qwen3ForCausalLM"]}, "AutoModelForCausalLM"),
        ({"architectures": ["GPT2LMHeadModel"]}, "AutoModelForCausalLM"),
        ({"architectures": ["RobertaForMaskedLM"]}, "AutoModelForMaskedLM"),
        (
            {"architectures": ["RobertaForSequenceClassification"]},
            "AutoModelForSequenceClassification",
        ),
        ({"architectures": ["BertForTokenClassification"]}, "AutoModelForTokenClassification"),
        ({"architectures": ["ViTForImageClassification"]}, "AutoModelForImageClassification"),
        (
            {"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
            "AutoModelForSeq2SeqLM",
        ),
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "AutoModelForImageTextToText"),
        ({"architectures": ["BertModel"]}, "AutoModel"),
        ({}, "AutoModel"),
    ],
)
def test_the_auto_class_comes_from_architectures(config: dict[str, Any], auto: str) -> None:
    assert auto_class_name(config) == auto
