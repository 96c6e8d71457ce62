"""The assignment building blocks: LAP wrapper, per-layout head slices, head-aware solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hfmerge.align import lap
from hfmerge.align.attention import (
    HeadBlocks,
    add_blocks,
    attention_objective,
    head_blocks,
    head_slices,
    solve_attention,
)
from hfmerge.align.lap import assignment_value, improves, solve_dense_lap, solve_lap
from hfmerge.align.sparse_lap import _candidate_edges, _sparse_matching, solve_sparse_lap
from hfmerge.arch.permute import axis_index, axis_length, invert, random_permutations
from hfmerge.arch.spec import ArchSpec, AttentionPerm, Layout, PermGroup
from hfmerge.errors import AlignmentError

# 6 query heads over 2 KV heads (3 per group), head_dim 4, first dim pinned (partial rotary).
GQA = PermGroup(
    "layers.0.attn", "attention", 24, num_heads=6, num_kv_heads=2, head_dim=4, qk_free_dims=(1, 4)
)
MHA = PermGroup(
    "layers.0.attn", "attention", 12, num_heads=3, num_kv_heads=3, head_dim=4, qk_free_dims=(0, 4)
)
GQA_LAYOUTS = (Layout.Q, Layout.K, Layout.V, Layout.O, Layout.QKV_CONCAT)
MHA_LAYOUTS = (*GQA_LAYOUTS, Layout.QKV_PER_HEAD)  # NeoX's fused layout needs one KV per query


def _random_perm(group: PermGroup, seed: int) -> AttentionPerm:
    spec = ArchSpec("test", "test", {group.name: group}, {})
    perm = random_permutations(spec, torch.Generator().manual_seed(seed))[group.name]
    assert isinstance(perm, AttentionPerm)
    return perm


def test_solve_lap_maximises_like_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        similarity = torch.randn(5, 5, generator=generator, dtype=torch.float64)
        best = max(
            assignment_value(similarity, torch.tensor(p)) for p in itertools.permutations(range(5))
        )
        perm = solve_lap(similarity)
        assert sorted(perm.tolist()) == list(range(5))
        assert assignment_value(similarity, perm) == pytest.approx(best, abs=1e-12)


def test_solve_lap_returns_a_gather_index() -> None:
    units = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    planted = torch.tensor([4, 0, 5, 1, 3, 2])
    moved = units[torch.argsort(planted)]  # B's unit planted[i] is A's unit i
    assert torch.equal(solve_lap(units @ moved.T), planted)  # [6, 3] @ [3, 6] -> [6, 6]


def test_solve_lap_refuses_bad_matrices() -> None:
    with pytest.raises(AlignmentError, match="NaN"):
        solve_lap(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        solve_lap(torch.zeros(2, 3))


def test_improves_ignores_rounding_but_not_gains() -> None:
    assert not improves(1000.0 + 1e-10, 1000.0)
    assert not improves(1000.0, 1000.0)
    assert improves(1000.001, 1000.0)
    assert improves(1e-3, 0.0)


def _expected_old_position(
    group: PermGroup, perm: AttentionPerm, part: str, new_head: int, slices: torch.Tensor
) -> torch.Tensor:
    """The axis positions that `perm` should gather into `new_head` of `part`, by the spec rules."""
    per_kv = group.queries_per_kv
    if part in ("q", "o"):
        slot, j = divmod(new_head, per_kv)
        old = int(perm.kv_heads[slot]) * per_kv + int(perm.q_in_group[slot, j])
    else:
        slot, old = new_head, int(perm.kv_heads[new_head])
    dims = perm.qk_dims[slot] if part in ("q", "k") else perm.vo_dims[slot]
    return slices[old][dims]


@pytest.mark.parametrize(("group", "layouts"), [(GQA, GQA_LAYOUTS), (MHA, MHA_LAYOUTS)])
def test_head_slices_agree_with_axis_index(group: PermGroup, layouts: tuple[Layout, ...]) -> None:
    perm = _random_perm(group, seed=2)
    for layout in layouts:
        index = axis_index(group, perm, layout)
        slices = head_slices(group, layout)
        covered = torch.cat([s.reshape(-1) for s in slices.values()])  # [heads*head_dim] each
        assert sorted(covered.tolist()) == list(range(axis_length(group, layout))), layout
        for part, where in slices.items():
            for new_head in range(where.shape[0]):
                expected = _expected_old_position(group, perm, part, new_head, where)
                assert torch.equal(index[where[new_head]], expected), (layout, part, new_head)


def _layout_tensors(group: PermGroup, seed: int) -> dict[Layout, torch.Tensor]:
    """One random [axis_len, 5] tensor per layout of a GQA group."""
    generator = torch.Generator().manual_seed(seed)
    return {
        layout: torch.randn(axis_length(group, layout), 5, generator=generator, dtype=torch.float64)
        for layout in GQA_LAYOUTS
    }


def _blocks(
    group: PermGroup, a: dict[Layout, torch.Tensor], b: dict[Layout, torch.Tensor]
) -> HeadBlocks:
    """Head blocks of A against B, built from the layouts as weight matching does."""
    blocks: HeadBlocks = {}
    for layout in a:
        for part, where in head_slices(group, layout).items():
            rows = where.reshape(-1)  # [heads, head_dim] -> [heads*head_dim]
            gram = a[layout][rows] @ b[layout][rows].T  # [n, 5] @ [5, n] -> [n, n]
            add_blocks(
                blocks, part, head_blocks(gram, heads=where.shape[0], head_dim=group.head_dim)
            )
    return blocks


def _inner_product(
    group: PermGroup,
    a: dict[Layout, torch.Tensor],
    b: dict[Layout, torch.Tensor],
    perm: AttentionPerm,
) -> float:
    return sum(
        float((a[layout] * b[layout][axis_index(group, perm, layout)]).sum()) for layout in a
    )


def test_attention_objective_is_the_inner_product_after_permuting() -> None:
    a, b = _layout_tensors(GQA, seed=3), _layout_tensors(GQA, seed=4)
    blocks = _blocks(GQA, a, b)
    for seed in range(5):
        perm = _random_perm(GQA, seed=10 + seed)
        assert attention_objective(GQA, blocks, perm) == pytest.approx(
            _inner_product(GQA, a, b, perm), rel=1e-12
        )


@pytest.mark.parametrize("group", [GQA, MHA])
def test_solve_attention_recovers_a_planted_permutation(group: PermGroup) -> None:
    layouts = GQA_LAYOUTS if group is GQA else MHA_LAYOUTS
    generator = torch.Generator().manual_seed(5)
    a = {
        layout: torch.randn(axis_length(group, layout), 5, generator=generator, dtype=torch.float64)
        for layout in layouts
    }
    planted = _random_perm(group, seed=6)
    b = {layout: t[axis_index(group, planted, layout)] for layout, t in a.items()}
    found = solve_attention(group, _blocks(group, a, b))
    spec = ArchSpec("test", "test", {group.name: group}, {})
    expected = invert(spec, {group.name: planted})[group.name]
    assert isinstance(expected, AttentionPerm)
    for field in ("kv_heads", "q_in_group", "qk_dims", "vo_dims"):
        assert torch.equal(getattr(found, field), getattr(expected, field)), field
    start = group.qk_free_dims[0]  # rotary dims stay in place
    assert torch.equal(found.qk_dims[:, :start], torch.arange(start).repeat(group.num_kv_heads, 1))


def _all_mha_perms(group: PermGroup) -> list[AttentionPerm]:
    """Every valid permutation of a small MHA group with pinned dim 0 (brute force)."""
    dims = list(itertools.permutations(range(group.head_dim)))
    free = [d for d in dims if d[0] == 0]
    heads = range(group.num_heads)
    perms = []
    for order in itertools.permutations(heads):
        for qk in itertools.product(free, repeat=len(heads)):
            for vo in itertools.product(dims, repeat=len(heads)):
                perms.append(
                    AttentionPerm(
                        torch.tensor(order),
                        torch.zeros(len(heads), 1, dtype=torch.long),
                        torch.tensor(qk),
                        torch.tensor(vo),
                    )
                )
    return perms


def test_solve_attention_is_optimal_without_gqa() -> None:
    group = PermGroup(
        "layers.0.attn",
        "attention",
        6,
        num_heads=2,
        num_kv_heads=2,
        head_dim=3,
        qk_free_dims=(1, 3),
    )
    generator = torch.Generator().manual_seed(7)
    layouts = (Layout.Q, Layout.K, Layout.V, Layout.O)
    a, b = (
        {layout: torch.randn(6, 2, generator=generator, dtype=torch.float64) for layout in layouts}
        for _ in range(2)
    )
    blocks = _blocks(group, a, b)
    best = max(attention_objective(group, blocks, p) for p in _all_mha_perms(group))
    found = solve_attention(group, blocks)
    assert attention_objective(group, blocks, found) == pytest.approx(best, abs=1e-12)
    assert attention_objective(group, blocks, found) == pytest.approx(
        _inner_product(group, a, b, found), rel=1e-12
    )


def test_solve_attention_refuses_misshapen_blocks() -> None:
    with pytest.raises(ValueError, match="o blocks have shape"):
        solve_attention(GQA, {"o": torch.zeros(2, 2, 4, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="unknown attention part"):
        solve_attention(GQA, {"x": torch.zeros(6, 6, 4, 4, dtype=torch.float64)})


def _planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`A @ B.T` for B = A's units permuted plus noise, and the gather index that undoes it."""
    generator = torch.Generator().manual_seed(seed)
    units = torch.randn(n, 32, generator=generator, dtype=torch.float64)
    planted = torch.randperm(n, generator=generator)
    moved = units[torch.argsort(planted)] + 0.1 * torch.randn(
        n, 32, generator=generator, dtype=torch.float64
    )
    return units @ moved.T, planted  # [n, 32] @ [32, n] -> [n, n]


def _similarities(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random, low-rank (independent models), uneven-norm (some columns top every row), tied."""
    generator = torch.Generator().manual_seed(seed)

    def gaussian(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    norms = torch.exp(gaussian(n))  # column norms over about a factor 20 from 5% to 95%
    return {
        "random": gaussian(n, n),
        "low rank": gaussian(n, 16) @ gaussian(16, n),  # [n, 16] @ [16, n]
        "uneven norms": (gaussian(n, 16) @ gaussian(16, n)) * norms,
        "ties": torch.randint(0, 3, (n, n), generator=generator).to(torch.float64),
    }


def _dense_value(similarity: torch.Tensor) -> float:
    return assignment_value(similarity, torch.from_numpy(solve_dense_lap(similarity.numpy())))


@pytest.mark.parametrize("n", [1, 7, 60, 300])
def test_sparse_lap_is_exact_or_declines(n: int) -> None:
    certified = 0
    for name, similarity in _similarities(n, seed=n).items():
        perm = solve_sparse_lap(similarity.numpy())
        if perm is None:
            continue
        certified += 1
        assert sorted(perm.tolist()) == list(range(n)), name
        assert assignment_value(similarity, torch.from_numpy(perm)) == pytest.approx(
            _dense_value(similarity), rel=1e-12, abs=1e-12
        ), name
    assert certified >= 3  # random, low rank and ties are certified; uneven norms may decline


def test_sparse_lap_grows_the_graph_to_the_optimum() -> None:
    # 4 candidates per row miss the optimum of a random matrix: the rounds must add edges.
    similarity = _similarities(200, seed=3)["random"]
    edges = _candidate_edges(similarity.numpy(), 4)
    first = _sparse_matching(similarity.numpy(), edges)
    assert first is not None
    best = _dense_value(similarity)
    assert assignment_value(similarity, torch.from_numpy(first)) < best - 1e-6
    perm = solve_sparse_lap(similarity.numpy(), candidates=4)
    assert perm is not None
    assert assignment_value(similarity, torch.from_numpy(perm)) == pytest.approx(best, rel=1e-12)


def test_sparse_lap_recovers_a_planted_permutation() -> None:
    similarity, planted = _planted(500, seed=4)
    perm = solve_sparse_lap(similarity.numpy())
    assert perm is not None
    assert torch.equal(torch.from_numpy(perm), planted)


def test_solve_lap_declined_sparse_falls_back_to_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lap, "SPARSE_MIN_UNITS", 10)
    similarity = _similarities(80, seed=5)["uneven norms"]
    calls: list[bool] = []

    def declined(matrix: object, candidates: int = 0) -> None:
        calls.append(True)

    monkeypatch.setattr(lap, "solve_sparse_lap", declined)
    perm = solve_lap(similarity)
    assert calls == [True]
    assert assignment_value(similarity, perm) == pytest.approx(_dense_value(similarity), rel=1e-12)


def test_solve_lap_uses_the_sparse_solver_when_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lap, "SPARSE_MIN_UNITS", 10)
    monkeypatch.setattr(lap, "solve_dense_lap", None)  # any dense solve would fail
    similarity, planted = _planted(40, seed=6)
    assert torch.equal(solve_lap(similarity), planted)
    with pytest.raises(AlignmentError, match="NaN"):
        solve_lap(torch.full((12, 12), float("nan")))


@pytest.mark.slow
def test_solve_lap_matches_scipy_at_3000_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lap, "SPARSE_MIN_UNITS", 3000)
    generator = torch.Generator().manual_seed(7)
    weights = torch.randn(2, 3000, 256, generator=generator, dtype=torch.float64)
    independent = weights[0] @ weights[1].T  # [3000, 256] @ [256, 3000]: two unrelated models
    for similarity in (independent, _planted(3000, seed=8)[0]):
        certified = solve_sparse_lap(similarity.numpy())
        assert certified is not None
        reference = solve_dense_lap(similarity.numpy())
        assert np.array_equal(certified, reference)
        assert torch.equal(solve_lap(similarity), torch.from_numpy(reference))
