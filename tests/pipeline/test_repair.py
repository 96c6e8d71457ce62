"""`align: {repair: true}`: the published merge is the barrier's REPAIRed midpoint, and only the
tensors REPAIR folds into differ from the plain merge."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hfmerge.analysis.barrier import compare_barriers
from hfmerge.analysis.evaluation import eval_model
from hfmerge.errors import HfMergeError, RecipeError, ShardWriteError
from hfmerge.lm.placement import ProbePlacement
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from hfmerge.tensors import overwrite_tensors
from tests.support.lm import save_lm, source_of, train_tiny_lm
from tests.support.weights import read_weights

QUIET = RunOptions(progress=False)  # no progress bars in test output


class _Probe(TypedDict):
    data: str
    samples: int
    max_length: int


PROBE: _Probe = {"data": "builtin", "samples": 8, "max_length": 32}
FOLDED = (
    "input_layernorm",
    "q_proj",
    "k_proj",
    "o_proj",
    "post_attention_layernorm",
    "down_proj",
    "model.norm",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny Llamas trained from different seeds (~15 s: the tests using them are slow)."""
    root = tmp_path_factory.mktemp("seeds")
    return (
        save_lm("llama", root / "a", model=train_tiny_lm("llama", seed=0, steps=200)),
        save_lm("llama", root / "b", model=train_tiny_lm("llama", seed=1, steps=200)),
    )


def _recipe(
    a: Path,
    b: Path,
    out: Path,
    *,
    repair: bool,
    method: str = "linear",
    shard: str = "5GB",
    align: str = "weight",
) -> Any:
    return parse_recipe(
        {
            "models": [{"model": str(a), "weight": 0.5}, {"model": str(b), "weight": 0.5}],
            "base": str(a),
            "align": {"method": align, "repair": repair},
            "probe": PROBE,
            "merge": {"method": method},
            "output": {"path": str(out), "max_shard_size": shard},
        }
    )


def _loss(path: Path) -> float:
    return eval_model(
        source_of(path),
        data=PROBE["data"],
        max_length=PROBE["max_length"],
        samples=PROBE["samples"],
    ).loss


@pytest.mark.slow
@pytest.mark.parametrize("align", ["weight", "weight+orthogonal"])
def test_repaired_merge_is_the_barrier_midpoint_and_touches_only_folded_tensors(
    seeds: tuple[Path, Path], tmp_path: Path, align: str
) -> None:
    a, b = seeds
    run_recipe(_recipe(a, b, tmp_path / "plain", repair=False, align=align), QUIET)
    run_recipe(_recipe(a, b, tmp_path / "repaired", repair=True, align=align), QUIET)
    aligned, repaired = compare_barriers(
        source_of(a),
        source_of(b),
        aligns=[align, f"{align}+repair"],
        steps=3,
        data=PROBE["data"],
        max_length=PROBE["max_length"],
        samples=PROBE["samples"],
        progress=False,
    )
    assert _loss(tmp_path / "plain") == pytest.approx(aligned.loss_mid, abs=1e-4)
    assert _loss(tmp_path / "repaired") == pytest.approx(repaired.loss_mid, abs=1e-4)
    assert abs(repaired.loss_mid - aligned.loss_mid) > 1e-3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "repaired")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()

    plain = load_file(tmp_path / "plain" / "model.safetensors")
    fixed = load_file(tmp_path / "repaired" / "model.safetensors")
    changed = {name for name in plain if not torch.equal(plain[name], fixed[name])}
    assert changed
    assert all(any(part in name for part in FOLDED) for name in changed)
    assert not any("v_proj" in n or "gate_proj" in n or "embed" in n for n in changed)
    card = (tmp_path / "repaired" / "README.md").read_text()
    assert "REPAIR" in card
    assert "channel groups" in card
    assert re.search(r"\(\d+ fit passes over the probe\)", card)


def test_repair_needs_a_linear_merge() -> None:
    with pytest.raises(RecipeError, match=r"align\.repair.*linear"):
        _recipe(Path("a"), Path("b"), Path("out"), repair=True, method="ties")


def test_overwrite_tensors_keeps_dtype_and_refuses_a_new_shape(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(6, dtype=torch.bfloat16).view(2, 3),
        "b": torch.ones(4, dtype=torch.float32),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    overwrite_tensors(tmp_path, {"a": torch.full((2, 3), 2.5)}, label="m")  # float32 in
    reloaded = load_file(tmp_path / "model.safetensors")
    assert reloaded["a"].dtype == torch.bfloat16
    assert torch.equal(reloaded["a"], torch.full((2, 3), 2.5).bfloat16())
    assert torch.equal(reloaded["b"], tensors["b"])
    with pytest.raises(ShardWriteError, match="shape"):
        overwrite_tensors(tmp_path, {"b": torch.ones(5)}, label="m")


@pytest.mark.slow
def test_repair_overwrites_tensors_across_shards(seeds: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = seeds
    run_recipe(_recipe(a, b, tmp_path / "one", repair=True), QUIET)
    run_recipe(_recipe(a, b, tmp_path / "many", repair=True, shard="40KB"), QUIET)
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    whole = load_file(tmp_path / "one" / "model.safetensors")
    sharded = read_weights(tmp_path / "many")
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(whole[name], sharded[name]) for name in whole)


# Per block, the tensors REPAIR folds into: norms (Gemma's offset gains too), the per-head q/k norm
# gains (Gemma 3) or the fused qkv_proj (Phi-3), and the O and FF down-projection inputs.
FOLDED_PER_BLOCK = {
    "gemma3_text": {
        "input_layernorm.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "pre_feedforward_layernorm.weight",
        "mlp.down_proj.weight",
        "post_feedforward_layernorm.weight",
    },
    "phi3": {
        "input_layernorm.weight",
        "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.down_proj.weight",
    },
}


@pytest.mark.parametrize("kind", list(FOLDED_PER_BLOCK))
def test_repair_runs_on_the_newer_decoder_families(kind: str, tmp_path: Path) -> None:
    a, b = (save_lm(kind, tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1)))
    for repair in (False, True):
        run_recipe(_recipe(a, b, tmp_path / f"repair_{repair}", repair=repair), QUIET)
    plain = load_file(tmp_path / "repair_False" / "model.safetensors")
    fixed = load_file(tmp_path / "repair_True" / "model.safetensors")
    changed = {name for name in plain if not torch.equal(plain[name], fixed[name])}
    expected = {f"model.layers.{i}.{t}" for i in range(2) for t in FOLDED_PER_BLOCK[kind]}
    assert changed == expected | {"model.norm.weight"}


def _spy_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the placement of every model `load_lm` loads."""
    import hfmerge.lm.load as load

    calls: list[dict[str, Any]] = []
    real = load.load_lm

    def spied(path: Path, **kwargs: Any) -> Any:
        calls.append({"path": path, **kwargs})
        return real(path, **kwargs)

    monkeypatch.setattr(load, "load_lm", spied)
    return calls


@pytest.mark.slow
def test_repair_offloaded_within_a_budget_writes_the_same_merge(
    seeds: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model of REPAIR loaded with all its layers on disk: the same factors and tensors."""
    import hfmerge.pipeline.repair as repair

    a, b = seeds
    run_recipe(_recipe(a, b, tmp_path / "whole", repair=True), QUIET)
    offloaded = ProbePlacement("auto", {"cpu": "0MiB"}, one_at_a_time=True, offload=True)
    monkeypatch.setattr(repair, "repair_placement", lambda *args, **kwargs: offloaded)
    loads = _spy_loads(monkeypatch)
    options = RunOptions(progress=False, max_memory="100GB")
    run_recipe(_recipe(a, b, tmp_path / "offloaded", repair=True), options)
    # The base and the aligned input (written in the base's basis first), then the merge.
    assert [call["max_memory"] for call in loads] == [{"cpu": "0MiB"}] * 3
    assert loads[0]["path"] == a  # the base is its own basis: loaded as it is
    assert loads[1]["path"] != b
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    placed = load_file(tmp_path / "offloaded" / "model.safetensors")
    assert whole.keys() == placed.keys()
    for name in whole:
        assert torch.allclose(placed[name], whole[name], rtol=1e-5, atol=1e-6), name


def test_a_budget_repair_cannot_work_within_is_refused_before_the_merge(
    seeds: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hfmerge.pipeline.align as align

    a, b = seeds
    monkeypatch.setattr(align, "align_inputs", _never)
    options = RunOptions(progress=False, max_memory="500MB")
    with pytest.raises(HfMergeError, match="cannot hold the probe of even one model") as caught:
        run_recipe(_recipe(a, b, tmp_path / "out", repair=True), options)
    assert "probe.samples" in str(caught.value.fix)
    assert not (tmp_path / "out").exists()


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the budget should have been refused before the alignment")


def test_repair_placement_goes_whole_then_offloaded_then_refused_as_the_budget_shrinks(
    seeds: tuple[Path, Path],
) -> None:
    from hfmerge.lm.placement import BASE_BYTES, Footprint
    from hfmerge.pipeline.repair import repair_placement, repair_working_bytes

    a, _ = seeds
    footprint = Footprint.of(a, label="a")
    weights = footprint.weights
    fixed = BASE_BYTES + footprint.largest_shard
    fixed += repair_working_bytes(a, label="a", inputs=2, length=32)
    kinds = []
    for budget in range(fixed + 3 * weights, fixed - weights, -weights // 8):
        try:
            placement = repair_placement(a, label="a", inputs=2, budget=budget, length=32)
        except HfMergeError:
            kinds.append("refused")
            continue
        assert placement.offload == (placement.max_memory is not None)
        kinds.append("offloaded" if placement.offload else "whole")
    seen = list(dict.fromkeys(kinds))  # each kind once, in the order first met
    assert seen == ["whole", "offloaded", "refused"]
