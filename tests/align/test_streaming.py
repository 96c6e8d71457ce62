"""Streamed weight matching: tensors read one at a time from the checkpoints on disk, multiplied in
float64 blocks, within a memory budget checked before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfmerge.align import align_checkpoint, weight_matching, weights
from hfmerge.align.matching_memory import plan_memory, similarity_bytes
from hfmerge.align.matching_problem import group_touches
from hfmerge.align.permutation_files import PERMUTATIONS_FILE
from hfmerge.align.weights import Weights
from hfmerge.arch import spec_for
from hfmerge.arch.permute import invert, permute_state_dict, random_permutations
from hfmerge.arch.spec import ArchSpec
from hfmerge.cli.app import main
from hfmerge.errors import OptionError
from hfmerge.tensors import LazyCheckpoint
from tests.support.align import assert_same_perms
from tests.support.lm import save_permuted_copy
from tests.support.tiny_models import make_tiny_model, nontrivial_permutations, save_tiny_model
from tests.support.tiny_moe import checkpoint_of, save_moe_model

PLANTED_SEED = 9  # the seed `save_permuted_copy` draws its permutations from
State = dict[str, torch.Tensor]


def _spec(model_dir: Path) -> ArchSpec:
    config = json.loads((model_dir / "config.json").read_text())
    return spec_for(config, load_file(str(model_dir / "model.safetensors")).keys())


def _bf16_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny GQA Llama stored in bf16 (8 query heads over 2 KV heads) and its planted copy."""
    a = save_tiny_model("llama", tmp_path / "a", dtype=torch.bfloat16)
    return a, save_permuted_copy(a, tmp_path / "b", seed=PLANTED_SEED)


def _counting(state: State, reads: list[str]) -> Weights:
    """`state` as Weights that record every tensor read."""

    def read(name: str) -> torch.Tensor:
        reads.append(name)
        return state[name]

    shapes = {n: tuple(t.shape) for n, t in state.items()}
    return Weights(read, shapes, {n: t.numel() * t.element_size() for n, t in state.items()})


def test_planted_permutation_recovered_from_checkpoints_on_disk(tmp_path: Path) -> None:
    a, b = _bf16_pair(tmp_path)
    spec = _spec(a)
    planted = random_permutations(spec, torch.Generator().manual_seed(PLANTED_SEED))
    with LazyCheckpoint(a) as reader_a, LazyCheckpoint(b) as reader_b:
        streamed = weight_matching(
            spec,
            Weights.from_headers(reader_a.get, reader_a.info, reader_a.names),
            Weights.from_headers(reader_b.get, reader_b.info, reader_b.names),
        )
    assert_same_perms(streamed.perms, invert(spec, planted))
    assert streamed.converged
    # The same state dicts in memory take the same path: the same permutations and objectives.
    in_memory = weight_matching(
        spec, load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    )
    assert_same_perms(in_memory.perms, streamed.perms)
    assert in_memory.objective == streamed.objective
    # At the optimum <A, P(B)> = |A|^2, summed in float64 from the bf16 values.
    state = load_file(str(a / "model.safetensors"))
    norm = sum(float(t.double().square().sum()) for t in state.values())
    assert streamed.objective[-1] == pytest.approx(norm, rel=1e-12)


def test_streamed_align_writes_a_exactly_in_bf16(tmp_path: Path) -> None:
    """Streamed `hfmerge align` returns A's own bf16 tensors: exact, not rounded through float64."""
    a, b = _bf16_pair(tmp_path)
    align_checkpoint(a, b, tmp_path / "out", method="weight", progress=False)
    original = load_file(str(a / "model.safetensors"))
    aligned = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert aligned.keys() == original.keys()
    assert all(
        aligned[n].dtype == torch.bfloat16 and aligned[n].equal(t) for n, t in original.items()
    )


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt_neox", "gpt2", "bert"])
def test_small_blocks_give_the_same_permutations(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Products summed over many column blocks (paired gate|up rows, fused QKV) match one block."""
    model = make_tiny_model(kind, dtype=torch.float64)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    spec = spec_for(model.config.to_dict(), state.keys())
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=3))
    whole = weight_matching(spec, state, permuted)
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 7)
    blocked = weight_matching(spec, state, permuted)
    assert_same_perms(blocked.perms, whole.perms)
    assert blocked.objective == pytest.approx(whole.objective, rel=1e-12)


def test_small_blocks_give_the_same_expert_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, spec = checkpoint_of(save_moe_model("mixtral", tmp_path / "a"))
    planted = nontrivial_permutations(spec, seed=1)
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 5)
    result = weight_matching(spec, state, permute_state_dict(state, spec, planted))
    assert_same_perms(result.perms, invert(spec, planted))


def _tiny_llama() -> tuple[State, ArchSpec]:
    model = make_tiny_model("llama", dtype=torch.float64)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    return state, spec_for(model.config.to_dict(), state.keys())


def test_memory_plan_drops_caches_then_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hfmerge.align.matching_memory.current_rss", lambda: 10**9)
    state, spec = _tiny_llama()
    touches = group_touches(spec, list(state))
    source = Weights.of(state)
    free = plan_memory(spec, touches, source, source, max_memory_bytes=None)
    # The embeddings and head hold more than the residual's similarity: it is cached.
    assert free.cached_groups == {"residual"}
    held = 10**9 + free.peak_bytes
    assert plan_memory(spec, touches, source, source, max_memory_bytes=held) == free
    bare = plan_memory(spec, touches, source, source, max_memory_bytes=held - 1)
    assert bare.cached_groups == frozenset()
    assert bare.peak_bytes == free.peak_bytes - similarity_bytes(spec.groups["residual"])
    with pytest.raises(OptionError, match="below what weight matching needs") as refused:
        plan_memory(spec, touches, source, source, max_memory_bytes=10**9 + bare.peak_bytes - 1)
    assert f"{(10**9 + bare.peak_bytes) / 1e9:.2f} GB" in refused.value.fix


def test_recomputed_static_similarity_is_the_cached_one(monkeypatch: pytest.MonkeyPatch) -> None:
    state, spec = _tiny_llama()
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=2))
    cached = weight_matching(spec, state, permuted)
    monkeypatch.setattr("hfmerge.align.matching_memory.worth_caching", lambda *_: False)
    recomputed = weight_matching(spec, state, permuted)
    assert_same_perms(recomputed.perms, cached.perms)
    assert recomputed.objective == cached.objective  # the same additions in the same order


def test_too_small_budget_is_refused_before_any_weight_is_read() -> None:
    state, spec = _tiny_llama()
    reads: list[str] = []
    source = _counting(state, reads)
    with pytest.raises(OptionError, match="--max-memory"):
        weight_matching(spec, source, source, max_memory_bytes=10**6)
    assert reads == []
    # A budget that leaves room for the plan runs.
    result = weight_matching(spec, source, source, max_memory_bytes=10**12)
    assert reads
    assert result.converged


def test_align_refuses_a_too_small_budget_before_writing(tmp_path: Path) -> None:
    a, b = _bf16_pair(tmp_path)
    with pytest.raises(OptionError, match="--max-memory"):
        align_checkpoint(a, b, tmp_path / "out", method="weight", max_memory_bytes=10**6)
    assert not (tmp_path / "out").exists()


def test_cli_align_takes_max_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _bf16_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["align", str(a), str(b), "--out", "small", "--max-memory", "1MB"]) == 1
    assert not (tmp_path / "small").exists()
    assert main(["align", str(a), str(b), "--out", "ample", "--max-memory", "100GB"]) == 0
    assert (tmp_path / "ample" / PERMUTATIONS_FILE).exists()
