"""Probing: masks and BOS respected, padding-proof, pre-norm last block, shared tokenizer checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from hfmerge.analysis.similarity import CkaMatrix
from hfmerge.errors import IncompatibleModelsError, ModelSourceError, OptionError
from hfmerge.lm.batches import probe_batches
from hfmerge.lm.load import (
    is_causal,
    load_probe_model,
    shared_tokenizer,
)
from hfmerge.lm.placement import parse_device_map, parse_max_memory
from hfmerge.lm.probe import (
    kept_positions,
    layer_states,
    paired_states,
    pool,
    sample_positions,
)
from hfmerge.lm.textdata import load_texts, token_windows
from tests.support.any_models import save_any_model
from tests.support.lm import char_tokenizer, save_lm, save_permuted_copy, style_of

LENGTH, SAMPLES = 32, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama (GQA) and a randomly permuted copy: same function, other basis."""
    root = tmp_path_factory.mktemp("probe")
    a = save_lm("llama", root / "a", seed=0)
    return a, save_permuted_copy(a, root / "b", seed=3)


def _batches(kind: str, *, batch_size: int = 3) -> list[dict[str, torch.Tensor]]:
    tokenizer = char_tokenizer(style_of(kind))
    windows = token_windows(tokenizer, load_texts(None), max_length=LENGTH, samples=SAMPLES)
    windows[1] = windows[1][: LENGTH // 2]  # a short window, so batches hold real padding
    return probe_batches(windows, tokenizer, batch_size=batch_size)


def _load(path: Path) -> PreTrainedModel:
    return load_probe_model(path, label=str(path), device_map="cpu")


def _matrix(
    a: PreTrainedModel,
    b: PreTrainedModel,
    batches: list[dict[str, torch.Tensor]],
    *,
    causal: bool = True,
) -> torch.Tensor:
    matrix: CkaMatrix | None = None
    for states in paired_states(a, b, batches, causal=causal):
        if matrix is None:
            matrix = CkaMatrix([s.shape[1] for s in states.a], [s.shape[1] for s in states.b])
        matrix.update(states.a, states.b)
    assert matrix is not None
    return matrix.values()


def test_kept_positions_drop_padding_and_causal_position_zero() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert kept_positions(mask, causal=True).tolist() == [
        [False, True, True, False],
        [False, True, False, False],
    ]
    assert kept_positions(mask, causal=False).tolist() == mask.bool().tolist()


def test_pool_tokens_and_masked_mean() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [b=2, t=3, d=2]
    keep = torch.tensor([[True, True, False], [False, False, False]])
    assert pool(hidden, keep, pooling="tokens").tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert pool(hidden, keep, pooling="mean").tolist() == [[1.0, 2.0]]  # empty window dropped


def test_sample_positions_keep_at_most_k_kept_tokens_per_window() -> None:
    keep = kept_positions(
        torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7]), causal=True
    )
    sampled = sample_positions(keep, 4, first_window=0)
    assert sampled.sum(1).tolist() == [4, 4, 2]  # a window with fewer keeps them all
    assert not (sampled & ~keep).any()  # never padding nor causal position 0
    assert sampled.tolist() == sample_positions(keep, 4, first_window=0).tolist()  # seeded
    assert sampled[0].tolist() != sample_positions(keep, 4, first_window=5)[0].tolist()


def test_sampled_tokens_do_not_depend_on_batching() -> None:
    def picks(batch_size: int) -> list[list[int]]:
        rows: list[list[int]] = []
        for batch in _batches("llama", batch_size=batch_size):
            keep = kept_positions(batch["attention_mask"], causal=True)
            sampled = sample_positions(keep, 5, first_window=len(rows))
            rows += [row.nonzero().squeeze(1).tolist() for row in sampled]
        return rows

    assert picks(3) == picks(8)  # other padding lengths and window offsets, the same picks
    assert all(len(row) == 5 for row in picks(3))


def test_sampled_tokens_pair_up_between_the_two_models(llama_pair: tuple[Path, Path]) -> None:
    a, b = (_load(path) for path in llama_pair)
    batches = _batches("llama")
    states = list(paired_states(a, b, batches, causal=True, tokens_per_window=5))
    assert [s.a[0].shape[0] for s in states] == [15, 15, 10]  # 8 windows, 5 tokens each
    assert sum(s.tokens for s in states) > 8 * 5  # `tokens` counts every kept token
    matrix = CkaMatrix([s.shape[1] for s in states[0].a], [s.shape[1] for s in states[0].b])
    for s in states:
        matrix.update(s.a, s.b)
    diagonal = matrix.values().diagonal()
    assert diagonal.tolist() == pytest.approx([1.0] * len(diagonal), abs=1e-6)  # permuted copy


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_extra_padding_changes_nothing(tmp_path: Path, kind: str) -> None:
    model = _load(save_lm(kind, tmp_path / kind, seed=2))
    causal = is_causal(model.config)
    pad_id = char_tokenizer(style_of(kind)).pad_token_id
    batches = _batches(kind)
    padded = [
        {
            "input_ids": torch.nn.functional.pad(b["input_ids"], (0, 7), value=pad_id),
            "attention_mask": torch.nn.functional.pad(b["attention_mask"], (0, 7)),
        }
        for b in batches
    ]
    for plain, extra in zip(batches, padded, strict=True):
        for s, t in zip(
            layer_states(model, plain, causal=causal, pooling="tokens"),
            layer_states(model, extra, causal=causal, pooling="tokens"),
            strict=True,
        ):
            assert torch.allclose(s, t, atol=1e-5)
    torch.testing.assert_close(
        _matrix(model, model, padded, causal=causal),
        _matrix(model, model, batches, causal=causal),
        atol=1e-6,
        rtol=0,
    )
    other = _load(save_lm(kind, tmp_path / f"{kind}-other", seed=3))
    torch.testing.assert_close(
        _matrix(model, other, padded, causal=causal),
        _matrix(model, other, batches, causal=causal),
        atol=1e-6,
        rtol=0,
    )


def test_padding_is_masked_not_averaged_in() -> None:
    hidden = torch.zeros(1, 4, 2)
    hidden[0, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    hidden[0, 2:] = 1000.0  # what a model emits at pad positions must never reach a statistic
    keep = kept_positions(torch.tensor([[1, 1, 0, 0]]), causal=False)
    assert pool(hidden, keep, pooling="mean").tolist() == [[2.0, 3.0]]


def test_permuted_copy_has_the_same_matrix_as_the_model_itself(
    llama_pair: tuple[Path, Path],
) -> None:
    a, b = _load(llama_pair[0]), _load(llama_pair[1])
    batches = _batches("llama")
    states_a = layer_states(a, batches[0], causal=True, pooling="tokens")
    states_b = layer_states(b, batches[0], causal=True, pooling="tokens")
    # The residual permutation moves hidden units, so raw states differ (the basis changed) ...
    assert not torch.allclose(states_a[1], states_b[1], atol=1e-3)
    # ... yet they are the same up to that permutation, which CKA cannot see.
    assert torch.allclose(states_a[1].sort(dim=1).values, states_b[1].sort(dim=1).values, atol=1e-4)
    itself = _matrix(a, a, batches)
    assert torch.allclose(itself.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-9)
    torch.testing.assert_close(_matrix(a, b, batches), itself, atol=1e-5, rtol=0)


def test_mean_pooling_gives_one_sample_per_window(llama_pair: tuple[Path, Path]) -> None:
    model = _load(llama_pair[0])
    batch = _batches("llama")[0]
    states = layer_states(model, batch, causal=True, pooling="mean")
    assert [tuple(s.shape) for s in states] == [(3, 64)] * 3


def test_last_state_is_the_last_block_output_before_the_final_norm(
    llama_pair: tuple[Path, Path],
) -> None:
    model = _load(llama_pair[0])
    batch = _batches("llama")[0]
    captured: list[torch.Tensor] = []
    blocks = model.layers
    assert isinstance(blocks, torch.nn.ModuleList)
    last_block = blocks[-1]
    handle = last_block.register_forward_hook(
        lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        states = layer_states(model, batch, causal=True, pooling="tokens")
    finally:
        handle.remove()
    keep = kept_positions(batch["attention_mask"], causal=True)
    assert torch.allclose(states[-1], captured[0][keep], atol=1e-6)


def test_bert_keeps_position_zero(tmp_path: Path) -> None:
    path = save_lm("bert", tmp_path / "bert", seed=1)
    model = _load(path)
    assert not is_causal(model.config)
    batch = _batches("bert")[0]
    states = layer_states(model, batch, causal=False, pooling="tokens")
    assert states[0].shape[0] == int(batch["attention_mask"].sum())


def test_shared_tokenizer_rules(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    a = llama_pair[0]
    assert len(shared_tokenizer(a, llama_pair[1], label_a="a", label_b="b")) == len(
        char_tokenizer("llama")
    )
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(a / name, no_tok / name)
    shared_tokenizer(a, no_tok, label_a="a", label_b="no_tok")  # B is read with A's tokenizer
    with pytest.raises(ModelSourceError, match="has no tokenizer") as info:
        shared_tokenizer(no_tok, a, label_a="no_tok", label_b="a")
    assert "save_pretrained" in info.value.message()
    bert = save_lm("bert", tmp_path / "bert", seed=0)
    with pytest.raises(IncompatibleModelsError, match="tokenizers differ"):
        shared_tokenizer(a, bert, label_a="a", label_b="bert")


def test_device_map_and_max_memory_parsing() -> None:
    assert parse_device_map("auto") == "auto"
    assert parse_device_map("cuda:1") == "cuda:1"
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(OptionError, match="neither a strategy nor a device") as info:
        parse_device_map("everywhere")
    assert (info.value.option, info.value.value) == ("--device-map", "everywhere")
    with pytest.raises(OptionError, match="not valid JSON"):
        parse_device_map("{oops")
    with pytest.raises(OptionError, match="DEVICE=SIZE") as info:
        parse_max_memory("20GiB")
    assert info.value.option == "--max-memory"


def test_auto_device_map_with_memory_limit_loads_and_runs(llama_pair: tuple[Path, Path]) -> None:
    model = load_probe_model(
        llama_pair[0], label="a", device_map="auto", max_memory={"cpu": "1GiB"}
    )
    states = layer_states(model, _batches("llama")[0], causal=True, pooling="tokens")
    assert len(states) == 3
    assert states[0].dtype == torch.float32


def test_an_encoder_decoders_probe_states_are_its_encoder_blocks_outputs(tmp_path: Path) -> None:
    """T5's encoder: every state is a block's own output (the last one before the final norm),
    and the decoder is not run."""
    path = save_any_model("t5", tmp_path / "t5")
    model = _load(path)
    assert not is_causal(model.config)
    batch = _batches("llama")[0]
    outputs: list[torch.Tensor] = []
    blocks = model.get_submodule("block")  # T5Stack.block: the encoder's blocks
    assert isinstance(blocks, torch.nn.ModuleList)
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out[0])) for block in blocks
    ]
    states = layer_states(model, batch, causal=False, pooling="tokens")
    for hook in hooks:
        hook.remove()
    keep = batch["attention_mask"].bool()
    assert len(states) == 1 + len(outputs) == 3
    for state, output in zip(states[1:], outputs, strict=True):
        torch.testing.assert_close(state, output[keep], rtol=0, atol=0)
