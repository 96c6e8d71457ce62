"""Spectral co-clustering of a bipartite graph (A units + B units), the number of groups chosen by
the eigengap; k-means on the spectral embedding.

The graph's edges join A units to B units only. Its normalised Laplacian I - D^-½WD^-½ has the
eigenvalues 1 ∓ σ_i, σ_i the singular values of N = D_a^-½ W_ab D_b^-½ (Dhillon 2001), so the
spectrum comes from one SVD of a d_a×d_b matrix. k groups use the top k singular vectors of both
sides, rows normalised to unit length (Ng, Jordan and Weiss 2002), clustered by k-means.
"""

# The eigengap: k = the k maximising σ_k - σ_(k+1), with σ_(m+1) = 0 for m = min(d_a, d_b) (a
# group needs a unit of each side, so there are at most m). k ≥ 2 so that "across groups" exists.
# A graph made of c disconnected blocks has σ_1 = ... = σ_c = 1 and a gap after c; a permutation
# (each A unit tied to one B unit) has all m singular values 1 and its gap at m.

from __future__ import annotations

from dataclasses import dataclass

import torch

KMEANS_RESTARTS = 8
KMEANS_ITERATIONS = 100


@dataclass(frozen=True)
class CoClusters:
    """Group labels of A's and B's units (-1: a unit with no edge), and the eigengap's choice."""

    labels_a: torch.Tensor  # [d_a] int64
    labels_b: torch.Tensor  # [d_b] int64
    groups: int
    singular_values: torch.Tensor  # [m] of the normalised bipartite matrix, descending


def eigengap_groups(singular_values: torch.Tensor, *, max_groups: int | None = None) -> int:
    """The group count k in [2, min(m, max_groups)] with the largest σ_k - σ_(k+1), where
    σ_(m+1) = 0; 1 when m = 1."""
    m = singular_values.numel()
    upper = min(m, max_groups) if max_groups is not None else m
    if upper < 2:
        return max(upper, 1)
    padded = torch.cat([singular_values, singular_values.new_zeros(1)])  # [m + 1]
    gaps = padded[:-1] - padded[1:]  # [m]: gaps[k - 1] = σ_k - σ_(k+1)
    return int(gaps[1:upper].argmax()) + 2  # gaps[1] is k = 2


def co_cluster(
    weights: torch.Tensor, *, max_groups: int | None = None, seed: int = 0
) -> CoClusters:
    """Co-cluster the bipartite graph with edge weights `weights` [d_a, d_b] (≥ 0)."""
    weights = weights.double()
    degree_a, degree_b = weights.sum(1), weights.sum(0)  # [d_a], [d_b]
    live_a, live_b = degree_a > 0, degree_b > 0
    labels_a = torch.full((weights.shape[0],), -1, dtype=torch.long)
    labels_b = torch.full((weights.shape[1],), -1, dtype=torch.long)
    live = weights[live_a][:, live_b]  # [a', b']
    if live.numel() == 0:
        return CoClusters(labels_a, labels_b, 0, weights.new_zeros(0))
    scale_a = degree_a[live_a].rsqrt()  # [a']
    scale_b = degree_b[live_b].rsqrt()  # [b']
    normalised = scale_a[:, None] * live * scale_b[None, :]  # D_a^-½ W D_b^-½ [a', b']
    left, sigma, right_t = torch.linalg.svd(normalised, full_matrices=False)  # [a',m] [m] [m,b']
    k = eigengap_groups(sigma, max_groups=max_groups)
    embedding = torch.cat([left[:, :k], right_t[:k].T])  # [a' + b', k]: A rows, then B rows
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = kmeans(embedding, k, seed=seed)  # [a' + b']
    labels_a[live_a] = labels[: live.shape[0]]
    labels_b[live_b] = labels[live.shape[0] :]
    return CoClusters(labels_a, labels_b, k, sigma)


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Labels [n] of the lowest-inertia Lloyd run from several k-means++ starts (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = torch.zeros(points.shape[0], dtype=torch.long), float("inf")
    for _ in range(KMEANS_RESTARTS):
        labels, inertia = _lloyd(points, _kmeans_plus_plus(points, k, generator))
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """The k starting centres [k, dim], each next one drawn with probability ∝ squared distance."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centres = [points[first]]
    nearest = ((points - points[first]) ** 2).sum(1)  # [n]
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # fewer distinct points than k: reuse one (its cluster stays empty)
            centres.append(points[0])
            continue
        pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        centres.append(points[pick])
        nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(1))
    return torch.stack(centres)  # [k, dim]


def _lloyd(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, float]:
    labels = torch.full((points.shape[0],), -1, dtype=torch.long)
    for _ in range(KMEANS_ITERATIONS):
        distances = torch.cdist(points, centres)  # [n, k]
        new = distances.argmin(1)  # [n]
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(centres.shape[0]):
            members = points[labels == c]  # [n_c, dim]
            if members.shape[0]:  # an empty cluster keeps its centre
                centres[c] = members.mean(0)
    inertia = float(((points - centres[labels]) ** 2).sum())
    return labels, inertia


__all__ = ["KMEANS_RESTARTS", "CoClusters", "co_cluster", "eigengap_groups", "kmeans"]
