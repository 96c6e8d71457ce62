"""The offline model zoo, built with the tiny config: real, deterministic, cached, lock-safe."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from hfmerge.errors import UnknownNameError
from hfmerge.zoo import ZOO_MEMBERS, ZooConfig, build_zoo, corpus, train, zoo_cache_dir, zoo_model

TINY = ZooConfig.tiny()
MEMBERS = ("seed0", "seed1", "code", "prose")  # the Llama-style members
GPT2_MEMBERS = ("gpt2-seed0", "gpt2-seed1")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny zoo per module: the cache root that holds it (training it takes ~20 s, so every
    test that uses it is marked slow)."""
    root = tmp_path_factory.mktemp("zoo-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HFMERGE_CACHE", str(root))
        build_zoo(TINY, progress=False)
    return root


@pytest.fixture
def tiny_zoo(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The tiny zoo's member dirs, with `HFMERGE_CACHE` pointing at its cache."""
    monkeypatch.setenv("HFMERGE_CACHE", str(tiny_cache))
    return {name: zoo_cache_dir(TINY) / name for name in MEMBERS}


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache root for this test only."""
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _probe_loss(model_dir: Path, domain: corpus.Domain, *, chunks: int = 12) -> float:
    """Mean token loss of a saved model on held-out text, computed without any zoo code."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = corpus.builtin_probe_text(domain)
    step = len(text) // chunks
    pieces = [text[i * step : i * step + 400] for i in range(chunks)]
    batch = tokenizer(pieces, return_tensors="pt", truncation=True, max_length=TINY.context)
    assert (batch["attention_mask"] == 1).all(), "400 characters always fill a 64-token window"
    with torch.no_grad():
        return float(model(**batch, labels=batch["input_ids"]).loss)


@pytest.mark.slow
def test_members_load_with_auto_classes_and_give_finite_logits(tiny_zoo: dict[str, Path]) -> None:
    for name, path in tiny_zoo.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        batch = tokenizer(
            ["def f(x):\n    return x", "The with statement"], return_tensors="pt", padding=True
        )
        assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all(), name
        logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, len(tokenizer)), name
        assert torch.isfinite(logits).all(), name
        config = model.config
        assert config.model_type == "llama"
        assert config.num_key_value_heads < config.num_attention_heads  # GQA
        assert not config.tie_word_embeddings
        assert (path / "generation_config.json").is_file()
        assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


@pytest.mark.slow
def test_gpt2_pair_is_a_real_tied_gpt2_of_the_same_size(tiny_zoo: dict[str, Path]) -> None:
    for name in GPT2_MEMBERS:
        path = zoo_cache_dir(TINY) / name
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert isinstance(model, GPT2LMHeadModel)
        config = model.config
        assert config.model_type == "gpt2"
        assert (config.n_embd, config.n_layer) == (TINY.hidden_size, TINY.num_layers)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
        batch = tokenizer(["def f(x):\n    return x"], return_tensors="pt")
        assert torch.isfinite(model(**batch).logits).all()
        info = json.loads((path / "zoo.json").read_text())
        assert info["architecture"] == "gpt2"
        # 120 tiny steps bring GPT-2 to about unigram level (the default size gets well below);
        # far below a uniform guess is still real learning.
        uniform = math.log(len(tokenizer))
        for domain in ("code", "prose"):
            assert info["heldout_loss"][domain] < uniform - 0.8, (name, domain)
    first, second = (load_file(zoo_cache_dir(TINY) / n / "model.safetensors") for n in GPT2_MEMBERS)
    assert first.keys() == second.keys()
    assert not torch.equal(
        first["transformer.h.0.mlp.c_fc.weight"], second["transformer.h.0.mlp.c_fc.weight"]
    )


@pytest.mark.slow
def test_tokenizer_is_lossless_on_code_and_unicode(tiny_zoo: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo["seed0"])
    text = 'def naïve(x: int) -> str:\n\treturn f"{x} ≥ 0 → ok"  # 日本\n'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_zoo_json_records_training_and_beats_unigram(tiny_zoo: dict[str, Path]) -> None:
    for name, path in tiny_zoo.items():
        info = json.loads((path / "zoo.json").read_text())
        assert info["name"] == name
        assert info["steps"] == (
            TINY.pretrain_steps if info["parent"] is None else TINY.finetune_steps
        )
        assert math.isfinite(info["final_train_loss"])
        for domain in ("code", "prose"):
            # Real learning: every member predicts held-out text better than token frequencies do.
            assert info["heldout_loss"][domain] < info["unigram_heldout_loss"][domain], (
                name,
                domain,
            )


@pytest.mark.slow
def test_specialists_are_better_on_their_own_domain(tiny_zoo: dict[str, Path]) -> None:
    code_on_code = _probe_loss(tiny_zoo["code"], "code")
    prose_on_code = _probe_loss(tiny_zoo["prose"], "code")
    code_on_prose = _probe_loss(tiny_zoo["code"], "prose")
    prose_on_prose = _probe_loss(tiny_zoo["prose"], "prose")
    assert code_on_code < prose_on_code
    assert prose_on_prose < code_on_prose


@pytest.mark.slow
def test_seed_models_differ_and_specialists_descend_from_seed0(tiny_zoo: dict[str, Path]) -> None:
    weights = {name: load_file(tiny_zoo[name] / "model.safetensors") for name in MEMBERS}
    assert weights["seed0"].keys() == weights["seed1"].keys()
    name = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(weights["seed0"][name], weights["seed1"][name])
    # A short fine-tune stays far closer to its parent than an independent seed is.
    for child in ("code", "prose"):
        near = (weights[child][name] - weights["seed0"][name]).norm()
        far = (weights["seed1"][name] - weights["seed0"][name]).norm()
        assert near < far / 2, child


@pytest.mark.slow
def test_init_depends_on_the_seed_only(tiny_zoo: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo["seed0"])
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    torch.manual_seed(123)  # the global RNG state must not leak into the init
    first = train.new_model(TINY, tokenizer, seed=0).state_dict()
    torch.manual_seed(456)
    again = train.new_model(TINY, tokenizer, seed=0).state_dict()
    other = train.new_model(TINY, tokenizer, seed=1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


@pytest.mark.slow
def test_second_call_is_a_cache_hit(
    tiny_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    mtimes = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in tiny_zoo.items()}

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached zoo member was trained again")

    monkeypatch.setattr(train, "train_lm", no_training)
    built = build_zoo(TINY, progress=False)
    assert set(built) == set(ZOO_MEMBERS)
    assert {name: built[name] for name in tiny_zoo} == tiny_zoo
    assert zoo_model("code", config=TINY, progress=False) == tiny_zoo["code"]
    assert {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in tiny_zoo.items()} == mtimes


@pytest.mark.slow
def test_rebuilding_in_a_fresh_cache_is_bitwise_identical(
    tiny_zoo: dict[str, Path], fresh_cache: Path
) -> None:
    rebuilt = zoo_model("code", config=TINY, progress=False)  # trains seed0, then code
    assert rebuilt.is_relative_to(fresh_cache)
    for name in ("seed0", "code"):
        again = (rebuilt.parent / name / "model.safetensors").read_bytes()
        assert again == (tiny_zoo[name] / "model.safetensors").read_bytes(), name
    tokenizer_file = "tokenizer.json"
    assert (rebuilt / tokenizer_file).read_bytes() == (
        tiny_zoo["code"] / tokenizer_file
    ).read_bytes()


def test_failed_training_leaves_no_member_and_no_temp_dir(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(train, "train_lm", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo_model("seed1", config=TINY, progress=False)
    cache_dir = zoo_cache_dir(TINY)
    assert not (cache_dir / "seed1").exists()
    assert not list(cache_dir.glob(".tmp-*"))


@pytest.mark.slow
def test_concurrent_builders_train_each_member_once(
    tiny_zoo: dict[str, Path], fresh_cache: Path
) -> None:
    script = (
        "from hfmerge.zoo import ZooConfig, zoo_model; "
        "print(zoo_model('seed0', config=ZooConfig.tiny(), progress=True))"
    )
    env = {**os.environ, "HFMERGE_CACHE": str(fresh_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    trainings = sum(err.count("training zoo model 'seed0'") for _, err in results)
    assert trainings == 1
    built = Path(paths.pop())
    assert AutoModelForCausalLM.from_pretrained(built) is not None
    # Another process, same bytes: determinism does not hinge on this process's RNG state.
    weights = "model.safetensors"
    assert (built / weights).read_bytes() == (tiny_zoo["seed0"] / weights).read_bytes()


def test_unknown_member_name_is_a_user_error(fresh_cache: Path) -> None:
    with pytest.raises(UnknownNameError) as caught:
        zoo_model("seed2", config=TINY)
    assert caught.value.kind == "zoo model"
    assert caught.value.choices == sorted(ZOO_MEMBERS)
    assert "seed2" in str(caught.value)
    assert not fresh_cache.exists()  # rejected before touching the cache


def test_cache_dir_follows_env_and_keys_on_config(fresh_cache: Path) -> None:
    assert zoo_cache_dir(TINY).parent == fresh_cache / "zoo"
    assert zoo_cache_dir(TINY) != zoo_cache_dir(ZooConfig())
    assert zoo_cache_dir() == zoo_cache_dir(ZooConfig())
    assert zoo_cache_dir(TINY) == zoo_cache_dir(ZooConfig.tiny())


def test_default_cache_root_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HFMERGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo_cache_dir(TINY).parent == tmp_path / ".cache" / "hfmerge" / "zoo"


def test_corpus_is_deterministic_python_and_english() -> None:
    code, prose = corpus.code_text(), corpus.prose_text()
    assert 100_000 < len(code) <= corpus.CODE_CHAR_BUDGET + len(corpus.code_files()) * 2
    assert "def " in code
    assert "import " in code
    assert "statement" in prose
    assert "def " not in prose[:2000]
    files = corpus.code_files()
    assert list(files) == sorted(files, key=lambda p: p.name)
    assert len(corpus.corpus_hash()) == 64


def test_split_partitions_text_deterministically() -> None:
    text = corpus.prose_text()
    train_part, heldout = corpus.split(text, heldout_fraction=0.1)
    assert corpus.split(text, heldout_fraction=0.1) == (train_part, heldout)
    assert len(train_part) + len(heldout) == len(text)
    assert 0.05 < len(heldout) / len(text) < 0.15
    assert heldout[:500] not in train_part
    with pytest.raises(ValueError, match="heldout_fraction"):
        corpus.split(text, heldout_fraction=1.0)


def test_builtin_probe_text_is_heldout_and_mixed_holds_both() -> None:
    code_probe, prose_probe = corpus.builtin_probe_text("code"), corpus.builtin_probe_text("prose")
    mixed = corpus.builtin_probe_text("mixed")
    assert code_probe == corpus.split(corpus.code_text())[1]
    assert prose_probe == corpus.split(corpus.prose_text())[1]
    assert len(mixed) == len(code_probe) + len(prose_probe)
    assert code_probe[:1000] in mixed
    assert prose_probe[:1000] in mixed
    assert mixed[:4000] != code_probe[:4000]  # interleaved, not concatenated


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    factors = [train.lr_factor(s, steps=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(0.1)


def test_sample_batch_is_seeded_and_bos_led() -> None:
    streams = {"code": torch.arange(1000) + 10, "prose": torch.arange(500) + 2000}

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return train.sample_batch(
            streams, {"code": 3, "prose": 2}, context=16, bos_id=0, generator=gen
        )

    batch = draw(7)
    assert batch.shape == (5, 16)
    assert (batch[:, 0] == 0).all()
    assert (batch[:3, 1:] < 2000).all()
    assert (batch[3:, 1:] >= 2000).all()
    assert (batch[:, 2:] - batch[:, 1:-1] == 1).all()  # contiguous windows of the stream
    assert torch.equal(batch, draw(7))
    assert not torch.equal(batch, draw(8))
