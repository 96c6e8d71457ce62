"""Mixture-of-experts specs (Mixtral, Qwen3-MoE): expert order and per-expert FF symmetries.

Real tiny transformers models (float64, 2 blocks, 4 experts, top-2 routing), read and written in
their checkpoint form (one tensor per expert projection): every valid permutation keeps the logits,
and each broken rule changes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hfmerge.arch.experts import plain
from hfmerge.arch.permute import (
    check_permutations,
    compose,
    invert,
    permute_state_dict,
    random_permutations,
    source_name,
)
from hfmerge.arch.spec import ArchSpec, ExpertSlot, Permutations
from tests.support.controls import CHANGED, KEPT
from tests.support.tiny_models import (
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    tiny_batch,
)
from tests.support.tiny_moe import (
    MOE_KINDS,
    checkpoint_of,
    load_moe_model,
    save_moe_model,
    write_checkpoint,
)

# Each family's names for the router and expert e's projections in block 0.
ROUTER = {
    "mixtral": "model.layers.0.block_sparse_moe.gate.weight",
    "qwen3_moe": "model.layers.0.mlp.gate.weight",
}
EXPERT = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.{}.{}.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.{}.{}.weight",
}
PROJECTIONS = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {kind: save_moe_model(kind, root / kind, dtype=torch.float64) for kind in MOE_KINDS}


def _logit_change(source: Path, state: dict[str, torch.Tensor], out: Path) -> float:
    """Largest logit difference between the saved model and `state` written next to it."""
    inputs = tiny_batch("mixtral", seed=5)
    before = model_outputs(load_moe_model(source), inputs)
    after = model_outputs(load_moe_model(write_checkpoint(source, state, out)), inputs)
    return max_abs_diff(before, after)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_spec_groups_of_a_moe_checkpoint(kind: str, saved: dict[str, Path]) -> None:
    state, spec = checkpoint_of(saved[kind])
    assert spec.family == kind
    assert spec.has_experts
    assert spec.num_layers == 2
    assert set(spec.tensors) == set(state)
    for layer in (0, 1):
        order = spec.groups[f"layers.{layer}.experts"]
        assert (order.kind, order.size) == ("experts", 4)
        assert f"layers.{layer}.mlp" not in spec.groups  # no dense FF in a sparse block
        for e in range(4):
            ff = spec.groups[f"layers.{layer}.experts.{e}.mlp"]
            assert ff.kind == "ff"
            assert ff.expert == ExpertSlot(order.name, e)
    router = spec.tensors[ROUTER[kind]]
    assert [r.group if r else None for r in router.axes] == ["layers.0.experts", "residual"]
    gate, up, down = (EXPERT[kind].format(2, p) for p in PROJECTIONS[kind])
    for name in (gate, up, down):
        assert spec.tensors[name].expert == ExpertSlot("layers.0.experts", 2)
    assert spec.tensors[gate].axes == spec.tensors[up].axes
    assert spec.tensors[down].axes == spec.tensors[gate].axes[::-1]
    assert spec.tensors[ROUTER[kind]].expert is None


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_valid_permutations_keep_logits(kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    state, spec = checkpoint_of(saved[kind])
    perms = nontrivial_permutations(spec, seed=1)
    permuted = permute_state_dict(state, spec, perms)
    order = perms["layers.0.experts"]
    assert isinstance(order, torch.Tensor)
    assert not torch.equal(order, torch.arange(4))  # the experts really move, and logits stay
    assert _logit_change(saved[kind], permuted, tmp_path / "p") < KEPT
    other = save_moe_model(kind, tmp_path / "other", seed=9, dtype=torch.float64)
    assert _logit_change(saved[kind], checkpoint_of(other)[0], tmp_path / "o") > CHANGED


def _broken(
    kind: str, state: dict[str, torch.Tensor], spec: ArchSpec, rule: str
) -> dict[str, torch.Tensor]:
    """`state` under a valid expert order, with one rule of the symmetry then broken."""
    order = torch.tensor([2, 0, 3, 1])
    perms: Permutations = {"layers.0.experts": order}
    moved = permute_state_dict(state, spec, perms)
    router = ROUTER[kind]
    gate, _, _ = (EXPERT[kind].format(1, p) for p in PROJECTIONS[kind])
    if rule == "experts without router rows":
        moved[router] = state[router]
    elif rule == "router rows without experts":
        moved = {**state, router: moved[router]}
    elif rule == "gate and up in different orders":
        moved = dict(state)
        moved[gate] = state[gate].flip(0)  # up keeps its order
    return moved


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize(
    "rule",
    [
        "experts without router rows",
        "router rows without experts",
        "gate and up in different orders",
    ],
)
def test_each_broken_rule_changes_logits(
    kind: str, rule: str, saved: dict[str, Path], tmp_path: Path
) -> None:
    state, spec = checkpoint_of(saved[kind])
    assert _logit_change(saved[kind], _broken(kind, state, spec, rule), tmp_path / "b") > CHANGED


def test_an_expert_ff_order_travels_with_its_expert(saved: dict[str, Path], tmp_path: Path) -> None:
    """The FF order keyed by expert 3 is the one applied to expert 3, in whichever slot it lands."""
    state, spec = checkpoint_of(saved["mixtral"])
    ff = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    perms: Permutations = {
        "layers.0.experts": torch.tensor([3, 2, 1, 0]),
        "layers.0.experts.3.mlp": ff,
    }
    out = permute_state_dict(state, spec, perms)
    w1 = EXPERT["mixtral"]
    assert torch.equal(out[w1.format(0, "w1")], state[w1.format(3, "w1")][ff])
    assert torch.equal(out[w1.format(0, "w2")], state[w1.format(3, "w2")][:, ff])
    assert torch.equal(out[w1.format(3, "w1")], state[w1.format(0, "w1")])
    assert _logit_change(saved["mixtral"], out, tmp_path / "p") < KEPT
    # Keying the FF order by the slot instead (slot 3 holds expert 0) breaks w2 against w1.
    wrong = dict(out)
    wrong[w1.format(3, "w1")] = state[w1.format(0, "w1")][ff]
    assert _logit_change(saved["mixtral"], wrong, tmp_path / "w") > CHANGED


def test_source_name_follows_the_expert_order(saved: dict[str, Path]) -> None:
    _, spec = checkpoint_of(saved["qwen3_moe"])
    perms: Permutations = {"layers.0.experts": torch.tensor([1, 3, 0, 2])}
    name = EXPERT["qwen3_moe"]
    assert source_name(name.format(0, "down_proj"), spec, perms) == name.format(1, "down_proj")
    assert source_name(name.format(3, "up_proj"), spec, perms) == name.format(2, "up_proj")
    layer1 = "model.layers.1.mlp.experts.0.up_proj.weight"  # another block's order: untouched
    assert source_name(layer1, spec, perms) == layer1
    assert source_name(ROUTER["qwen3_moe"], spec, perms) == ROUTER["qwen3_moe"]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_invert_and_compose_rekey_expert_ffs(kind: str, saved: dict[str, Path]) -> None:
    state, spec = checkpoint_of(saved[kind])
    p = nontrivial_permutations(spec, seed=3)
    q = nontrivial_permutations(spec, seed=4)
    once = permute_state_dict(state, spec, p)
    back = permute_state_dict(once, spec, invert(spec, p))
    assert all(torch.equal(back[n], state[n]) for n in state)
    twice = permute_state_dict(once, spec, q)
    composed = permute_state_dict(state, spec, compose(spec, p, q))
    assert all(torch.equal(twice[n], composed[n]) for n in state)
    # Only an expert order on one side, only FF orders on the other.
    orders = {n: v for n, v in p.items() if n.endswith(".experts")}
    ffs = {n: v for n, v in q.items() if ".experts." in n}
    split = permute_state_dict(permute_state_dict(state, spec, orders), spec, ffs)
    joined = permute_state_dict(state, spec, compose(spec, orders, ffs))
    assert all(torch.equal(split[n], joined[n]) for n in state)


def test_random_and_checked_expert_orders(saved: dict[str, Path]) -> None:
    _, spec = checkpoint_of(saved["mixtral"])
    draws = [random_permutations(spec, torch.Generator().manual_seed(s)) for s in (0, 0, 1, 2)]
    orders = [plain(d, "layers.1.experts", 4) for d in draws]
    assert torch.equal(orders[0], orders[1])  # seeded
    assert any(not torch.equal(o, torch.arange(4)) for o in orders)
    check_permutations(spec, draws[2])
    for bad in (torch.tensor([0, 0, 1, 2]), torch.arange(5), torch.arange(4.0)):
        with pytest.raises(ValueError, match=r"layers\.0\.experts"):
            check_permutations(spec, {"layers.0.experts": bad})


def test_qwen3_moe_dense_blocks_keep_a_plain_ff(tmp_path: Path) -> None:
    """`mlp_only_layers` keeps block 0 dense: a dense FF group there, experts in block 1 only."""
    source = save_moe_model("qwen3_moe", tmp_path / "m", dtype=torch.float64, mlp_only_layers=[0])
    state, spec = checkpoint_of(source)
    assert spec.groups["layers.0.mlp"].size == 24
    assert "layers.0.experts" not in spec.groups
    assert spec.groups["layers.1.experts"].size == 4
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=5))
    assert _logit_change(source, permuted, tmp_path / "p") < KEPT
