"""Head-aware assignment of one attention group, shared by weight and activation matching.

KV heads are matched by an outer LAP whose pair scores come from inner LAPs over the pair's query
heads and within-head dims (V/O always, Q/K only inside `qk_free_dims`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfmerge.align.lap import assignment_value, improves, lap_value, solve_lap
from hfmerge.arch.spec import AttentionPerm, Layout, PermGroup

PARTS = ("q", "k", "v", "o")
# part -> [heads_a, heads_b, head_dim, head_dim]: similarity of head dims of A to those of B
HeadBlocks = dict[str, torch.Tensor]
_MAX_QUERY_ROUNDS = 20  # alternations between query order and dim orders inside one pair


def part_heads(group: PermGroup, part: str) -> int:
    """Heads of one part: query heads for q and o, KV heads for k and v."""
    if part not in PARTS:
        raise ValueError(f"unknown attention part {part!r}; expected one of {PARTS}")
    return group.num_heads if part in ("q", "o") else group.num_kv_heads


def head_slices(group: PermGroup, layout: Layout) -> dict[str, torch.Tensor]:
    """Where each part's heads sit on an axis of `layout`: part -> [heads, head_dim] positions.

    Mirrors the layouts documented in `Layout`; a test checks it against `axis_index`.
    """
    heads, kv, dim = group.num_heads, group.num_kv_heads, group.head_dim

    def block(count: int, start: int) -> torch.Tensor:
        return start + torch.arange(count * dim).reshape(count, dim)  # [count*dim] -> [count, dim]

    if layout is Layout.Q:
        return {"q": block(heads, 0)}
    if layout is Layout.K:
        return {"k": block(kv, 0)}
    if layout is Layout.V:
        return {"v": block(kv, 0)}
    if layout is Layout.O:
        return {"o": block(heads, 0)}
    if layout is Layout.QKV_CONCAT:
        return {
            "q": block(heads, 0),
            "k": block(kv, heads * dim),
            "v": block(kv, (heads + kv) * dim),
        }
    if layout is Layout.QKV_PER_HEAD:
        first = torch.arange(heads)[:, None] * (3 * dim) + torch.arange(dim)  # [heads, dim]
        return {"q": first, "k": first + dim, "v": first + 2 * dim}
    raise ValueError(f"layout {layout.value!r} has no attention heads")


def head_blocks(similarity: torch.Tensor, *, heads: int, head_dim: int) -> torch.Tensor:
    """A head-major [heads*head_dim, heads*head_dim] similarity as [heads, heads, dim, dim]."""
    blocks = similarity.reshape(heads, head_dim, heads, head_dim)  # [h_a, d_a, h_b, d_b]
    return blocks.permute(0, 2, 1, 3)  # [h_a, d_a, h_b, d_b] -> [h_a, h_b, d_a, d_b]


def add_blocks(total: HeadBlocks, part: str, blocks: torch.Tensor) -> None:
    """Accumulate one part's blocks into `total` (in place)."""
    if part in total:
        total[part] = total[part] + blocks
    else:
        total[part] = blocks.to(torch.float64)


@dataclass(frozen=True)
class _Pair:
    """Similarity blocks of one (KV head of A, KV head of B) pair; None where a part is absent."""

    q: torch.Tensor | None  # [per_kv, per_kv, d, d]: query heads of A's group x of B's group
    k: torch.Tensor | None  # [d, d]
    v: torch.Tensor | None  # [d, d]
    o: torch.Tensor | None  # [per_kv, per_kv, d, d]


def _pair(group: PermGroup, blocks: HeadBlocks, a: int, b: int) -> _Pair:
    per_kv = group.queries_per_kv
    qa, qb = slice(a * per_kv, (a + 1) * per_kv), slice(b * per_kv, (b + 1) * per_kv)
    q, o = blocks.get("q"), blocks.get("o")
    k, v = blocks.get("k"), blocks.get("v")
    return _Pair(
        q=None if q is None else q[qa, qb],
        k=None if k is None else k[a, b],
        v=None if v is None else v[a, b],
        o=None if o is None else o[qa, qb],
    )


def _matched_queries(
    per_query: torch.Tensor | None, queries: torch.Tensor, dim: int
) -> torch.Tensor:
    """Sum of the blocks of matched query pairs: [per_kv, per_kv, d, d] -> [d, d]."""
    total = torch.zeros(dim, dim, dtype=torch.float64)
    if per_query is not None:
        # In-place adds: a reduction kernel over a tiny axis costs far more (thread start-up).
        for i, j in enumerate(queries.tolist()):
            total += per_query[i, j]
    return total


def _dim_matrices(
    pair: _Pair, queries: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-head similarities (Q/K, V/O), [d, d] each, for one query assignment of the pair."""
    qk = _matched_queries(pair.q, queries, dim)
    vo = _matched_queries(pair.o, queries, dim)
    if pair.k is not None:
        qk = qk + pair.k
    if pair.v is not None:
        vo = vo + pair.v
    return qk, vo


def qk_order(group: PermGroup, similarity: torch.Tensor) -> torch.Tensor:
    """Best within-head Q/K order: identity on pinned (rotary) dims, a LAP on the free ones."""
    start, end = group.qk_free_dims
    order = torch.arange(group.head_dim)
    if end - start > 1:
        order[start:end] = start + solve_lap(similarity[start:end, start:end])
    return order


def _query_scores_independent(group: PermGroup, pair: _Pair) -> torch.Tensor:
    """[per_kv, per_kv] query-pair scores, each pair with its own best dim orders (first guess)."""
    per_kv = group.queries_per_kv
    scores = torch.zeros(per_kv, per_kv, dtype=torch.float64)
    for i in range(per_kv):
        for j in range(per_kv):
            if pair.o is not None:
                scores[i, j] += lap_value(pair.o[i, j])
            if pair.q is not None:
                scores[i, j] += assignment_value(pair.q[i, j], qk_order(group, pair.q[i, j]))
    return scores


def _query_scores(pair: _Pair, qk: torch.Tensor, vo: torch.Tensor, per_kv: int) -> torch.Tensor:
    """[per_kv, per_kv] query-pair scores under fixed within-head orders."""
    scores = torch.zeros(per_kv, per_kv, dtype=torch.float64)
    dims = torch.arange(len(qk))
    if pair.o is not None:
        scores += pair.o[:, :, dims, vo].sum(-1)  # [per_kv, per_kv, d] -> [per_kv, per_kv]
    if pair.q is not None:
        scores += pair.q[:, :, dims, qk].sum(-1)  # [per_kv, per_kv, d] -> [per_kv, per_kv]
    return scores


@dataclass(frozen=True)
class _PairSolution:
    score: float
    queries: torch.Tensor  # [per_kv]
    qk: torch.Tensor  # [head_dim]
    vo: torch.Tensor  # [head_dim]


def _solve_pair(group: PermGroup, pair: _Pair) -> _PairSolution:
    """Query order and dim orders of one pair by alternating exact LAPs (never decreasing)."""
    per_kv, dim = group.queries_per_kv, group.head_dim
    if per_kv == 1:
        queries = torch.zeros(1, dtype=torch.long)
    else:
        queries = solve_lap(_query_scores_independent(group, pair))
    for _ in range(_MAX_QUERY_ROUNDS):
        m_qk, m_vo = _dim_matrices(pair, queries, dim)
        qk, vo = qk_order(group, m_qk), solve_lap(m_vo)
        score = assignment_value(m_qk, qk) + assignment_value(m_vo, vo)
        if per_kv == 1:
            break
        scores = _query_scores(pair, qk, vo, per_kv)
        better = solve_lap(scores)
        if not improves(assignment_value(scores, better), assignment_value(scores, queries)):
            break
        queries = better
    return _PairSolution(score, queries, qk, vo)


def check_blocks(group: PermGroup, blocks: HeadBlocks) -> None:
    """Every part is known and shaped [heads, heads, head_dim, head_dim]."""
    for part, block in blocks.items():
        heads = part_heads(group, part)
        expected = (heads, heads, group.head_dim, group.head_dim)
        if tuple(block.shape) != expected:
            raise ValueError(
                f"{group.name}: {part} blocks have shape {tuple(block.shape)}, expected {expected}"
            )


def solve_attention(group: PermGroup, blocks: HeadBlocks) -> AttentionPerm:
    """The head-aware permutation maximising the summed similarity of the group's parts."""
    check_blocks(group, blocks)
    kv = group.num_kv_heads
    solutions = [
        [_solve_pair(group, _pair(group, blocks, a, b)) for b in range(kv)] for a in range(kv)
    ]
    scores = torch.tensor(
        [[s.score for s in row] for row in solutions], dtype=torch.float64
    )  # [kv_a, kv_b]
    kv_heads = solve_lap(scores)
    chosen = [solutions[g][int(kv_heads[g])] for g in range(kv)]
    return AttentionPerm(
        kv_heads=kv_heads,
        q_in_group=torch.stack([c.queries for c in chosen]),  # [kv, per_kv]
        qk_dims=torch.stack([c.qk for c in chosen]),  # [kv, head_dim]
        vo_dims=torch.stack([c.vo for c in chosen]),  # [kv, head_dim]
    )


def attention_objective(group: PermGroup, blocks: HeadBlocks, perm: AttentionPerm) -> float:
    """The summed similarity that `perm` achieves on `blocks` (what `solve_attention` maximises)."""
    check_blocks(group, blocks)
    total = 0.0
    for g in range(group.num_kv_heads):
        pair = _pair(group, blocks, g, int(perm.kv_heads[g]))
        m_qk, m_vo = _dim_matrices(pair, perm.q_in_group[g], group.head_dim)
        total += assignment_value(m_qk, perm.qk_dims[g]) + assignment_value(m_vo, perm.vo_dims[g])
    return total
