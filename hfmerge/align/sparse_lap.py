"""Exact linear assignment for wide groups: solve on a sparse candidate graph, certify with duals.

A dense LAP on an n x n similarity costs scipy's solver O(n^3) in the worst case (a weakly
structured 11008-unit FF group: tens of seconds, once per group per sweep). The optimum of such a
matrix almost only uses entries among each row's largest few, so the problem is solved on that
sparse graph (scipy's LAPJVsp, `min_weight_full_bipartite_matching`) and the answer is then proved
optimal for the dense matrix: dual potentials `u` (rows) and `v` (columns) are built that are tight
on the matching, and every dense entry is checked to satisfy `s_ij <= u_i + v_j` (maximising). By
LP duality no assignment then beats the matching by more than `n * tolerance`. A round is one
dense pass: rows whose entries break the check have their potential raised (Bellman-Ford on the
dense exchange graph), the entries that raised them join the graph, the matching is solved again
if the graph grew, and the potentials are settled on the graph. When MAX_ROUNDS pass without a
certificate the caller falls back to the dense solver, so no answer is ever inexact.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

# Each row's best `CANDIDATES` columns seed the graph; a round adds at most one per row.
CANDIDATES = 16
# Rounds (one dense pass each) before the dense solver is cheaper.
MAX_ROUNDS = 8
# Reduced costs down to -TOLERANCE * max|s| count as optimal: float64 rounding of the potentials,
# far below `improves`' 1e-10 relative threshold even summed over 14336 units.
TOLERANCE = 1e-12
# Bellman-Ford passes before giving up on the potentials (a few hundred at 14336 units); a
# deeper shortest-path tree is rare, and the dense solver then answers.
MAX_PASSES = 1000
# Rows of the dense matrix checked at a time: a [block, n] float64 temporary (58 MB at n = 14336).
CHECK_BLOCK = 512


def solve_sparse_lap(similarity: Floats, candidates: int = CANDIDATES) -> Ints | None:
    """The gather index maximising `sum_i similarity[i, perm[i]]`, or None if not certified.

    `similarity` is a finite, square float64 matrix. None means the rounds did not prove an
    optimum within MAX_ROUNDS (or the potentials found a cycle): solve it densely instead.
    """
    n = similarity.shape[0]
    edges = _candidate_edges(similarity, min(candidates, n))
    largest = max(float(similarity.max()), -float(similarity.min()))
    tolerance = TOLERANCE * max(largest, np.finfo(np.float64).tiny)
    potentials = np.zeros(n)
    match = _sparse_matching(similarity, edges)
    for _ in range(MAX_ROUNDS):
        if match is None:
            return None
        settled = _row_potentials(similarity, edges, match, potentials, tolerance)
        if settled is None:
            return None
        potentials, raised = _dense_pass(similarity, match, settled, tolerance)
        if raised.size == 0:
            return match
        grown = np.union1d(edges, raised)
        if grown.size > edges.size:  # new entries: the matching may change
            edges = grown
            match = _sparse_matching(similarity, edges)
    return None


def _candidate_edges(similarity: Floats, candidates: int) -> Ints:
    """Sorted flat keys `i * n + j` of each row's best columns, and of the diagonal.

    The diagonal makes a perfect matching always exist on the graph (and is where an aligned
    pair's optimum lies). Columns that no row ranks high join through the rounds' violations.
    """
    n = similarity.shape[0]
    best = torch.from_numpy(similarity).topk(candidates, dim=1).indices.numpy()  # [n, candidates]
    units = np.arange(n, dtype=np.int64)
    keys = np.concatenate([units.repeat(candidates) * n + best.reshape(-1), units * (n + 1)])
    return np.unique(keys)


def _sparse_matching(similarity: Floats, edges: Ints) -> Ints | None:
    """The maximum-weight perfect matching on the graph `edges`: match[i] is row i's column."""
    n = similarity.shape[0]
    rows, cols = np.divmod(edges, n)
    values = similarity[rows, cols]
    # LAPJVsp minimises positive weights (a stored zero is no edge): costs in [spread, 2 * spread],
    # which every perfect matching shifts by the same n * (top + spread).
    spread = float(values.max() - values.min()) or 1.0
    costs = (values.max() - values) + spread
    graph = sp.csr_matrix((costs, (rows, cols)), shape=(n, n))
    try:
        matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    except ValueError:  # no perfect matching on these edges
        return None
    match = np.empty(n, dtype=np.int64)
    match[matched_rows] = matched_cols
    return match


def _row_potentials(
    similarity: Floats, edges: Ints, match: Ints, start: Floats, tolerance: float
) -> Floats | None:
    """Row potentials `u >= start` with `s_ij <= u_i + v_j` on every graph edge, or None.

    With `v_j = s_(owner j) j - u_(owner j)` (tight on the matching), an edge (i, j) needs
    `u_(owner j) - u_i <= s_(owner j) j - s_ij`: the shortest-path condition on arcs
    owner(j) -> i of that length. Bellman-Ford from a virtual source at `-start`, vectorised over
    the arcs; a matching that is optimal on the graph has no negative cycle, so it settles (None
    if it has not within MAX_PASSES).
    """
    n = similarity.shape[0]
    owner = np.empty(n, dtype=np.int64)
    owner[match] = np.arange(n)
    rows, cols = np.divmod(edges, n)
    free = cols != match[rows]
    tails, heads, cols = owner[cols[free]], rows[free], cols[free]
    lengths = similarity[tails, cols] - similarity[heads, cols]
    order = np.argsort(heads, kind="stable")
    tails, heads, lengths = tails[order], heads[order], lengths[order]
    starts = np.flatnonzero(np.r_[True, heads[1:] != heads[:-1]])
    targets = heads[starts] if heads.size else heads
    # Distances are minus the potentials: the source reaches every row at -start.
    distance = -start
    for _ in range(MAX_PASSES):
        if not targets.size:
            return -distance
        shortest = np.minimum.reduceat(distance[tails] + lengths, starts)
        shorter = shortest < distance[targets] - tolerance
        if not shorter.any():
            return -distance
        distance[targets[shorter]] = shortest[shorter]
    return None


def _column_potentials(similarity: Floats, match: Ints, potentials: Floats) -> Floats:
    """`v_j = s_(owner j) j - u_(owner j)`: every matched entry is tight."""
    n = similarity.shape[0]
    owner = np.empty(n, dtype=np.int64)
    owner[match] = np.arange(n)
    return similarity[owner, np.arange(n)] - potentials[owner]


def _dense_pass(
    similarity: Floats, match: Ints, potentials: Floats, tolerance: float
) -> tuple[Floats, Ints]:
    """One Bellman-Ford pass over every dense entry: `u_i = max(u_i, max_j s_ij - v_j)`.

    Returns the raised row potentials and the flat keys `i * n + j` of the entries that raised
    them (each raised row's best). None raised means `s_ij <= u_i + v_j + tolerance` everywhere:
    the certificate. Raised rows break graph edges elsewhere, which the next round's
    Bellman-Ford on the graph settles at a fraction of a dense pass.
    """
    n = similarity.shape[0]
    columns = _column_potentials(similarity, match, potentials)
    raised = potentials.copy()
    best_columns = np.empty(n, dtype=np.int64)
    block = np.empty((min(CHECK_BLOCK, n), n))  # one buffer: a fresh one per block page-faults
    for start in range(0, n, CHECK_BLOCK):
        stop = min(start + CHECK_BLOCK, n)
        excess = block[: stop - start]  # [rows, n]: s_ij - v_j
        np.subtract(similarity[start:stop], columns[None, :], out=excess)
        best_columns[start:stop] = excess.argmax(axis=1)
        best = excess[np.arange(stop - start), best_columns[start:stop]]
        np.maximum(raised[start:stop], best, out=raised[start:stop])
    rows = np.flatnonzero(raised > potentials + tolerance)
    return raised, rows * n + best_columns[rows]
