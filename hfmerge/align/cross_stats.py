"""Streaming Pearson correlation of two models' features on the same tokens (float64 sums)."""

from __future__ import annotations

import torch


class CrossStats:
    """Streaming sums for the Pearson correlation of A's features (rows) with B's (columns)."""

    def __init__(self, size_a: int, size_b: int) -> None:
        self.count = 0
        self.sum_a = torch.zeros(size_a, dtype=torch.float64)
        self.sum_b = torch.zeros(size_b, dtype=torch.float64)
        self.squares_a = torch.zeros(size_a, dtype=torch.float64)
        self.squares_b = torch.zeros(size_b, dtype=torch.float64)
        self.cross = torch.zeros(size_a, size_b, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add observations: `a` [n, size_a] and `b` [n, size_b], row i of both from one token."""
        a, b = a.to(torch.float64), b.to(torch.float64)
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.squares_a += (a * a).sum(0)
        self.squares_b += (b * b).sum(0)
        self.cross += a.T @ b  # [size_a, n] @ [n, size_b] -> [size_a, size_b]

    def correlation(self) -> torch.Tensor:
        """[size_a, size_b] Pearson correlation; 0 wherever a feature never varies."""
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        covariance = self.cross / n - torch.outer(mean_a, mean_b)  # [size_a, size_b]
        std_a = (self.squares_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.squares_b / n - mean_b**2).clamp_min(0).sqrt()
        scale = torch.outer(std_a, std_b)  # [size_a, size_b]
        # A feature with (numerically) no variance has no defined correlation: score it 0.
        tiny = 1e-12 * float(scale.max()) if scale.numel() else 0.0
        return torch.where(scale > tiny, covariance / scale.clamp_min(1e-300), 0.0)
