"""Lasso from Gram matrices: many targets at once by coordinate descent, then a least-squares refit.

Solves, per column j of `target`, min_β ½·βᵀGβ - t_jᵀβ + λ·‖β‖₁. With G the correlation matrix
of the predictors and t_j their correlations with target j this is the standardised lasso
(1/2n)·‖b_j - Aβ‖² + λ‖β‖₁ up to a constant, written with sums the caller already streamed.
"""

# Coordinate descent (Friedman et al. 2010, covariance updates) rather than ISTA/FISTA: activation
# units are strongly correlated, which makes G ill-conditioned; a proximal gradient step is then
# tiny along most directions while a coordinate step is exact along its own. Every target shares
# G, so one sweep updates a whole row of β [d_a, d_b] per coordinate and keeps the running product
# Gβ current with one rank-one update.

from __future__ import annotations

import torch

MAX_SWEEPS = 2000
TOLERANCE = 1e-9  # largest coefficient change in a sweep, in standardised units


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """sign(v)·max(|v| - threshold, 0), elementwise."""
    return values.sign() * (values.abs() - threshold).clamp_min(0.0)


def lasso_from_gram(
    gram: torch.Tensor,
    target: torch.Tensor,
    *,
    penalty: float,
    max_sweeps: int = MAX_SWEEPS,
    tolerance: float = TOLERANCE,
) -> torch.Tensor:
    """Lasso coefficients [d_a, d_b] for `gram` [d_a, d_a] (Gᵀ = G, G ⪰ 0) and `target` [d_a, d_b].

    A predictor with G_kk = 0 gets coefficient 0.
    """
    if penalty < 0:
        raise ValueError(f"the L1 penalty must be >= 0, got {penalty}")
    gram, target = gram.double(), target.double()
    beta = torch.zeros_like(target)  # [d_a, d_b]
    product = torch.zeros_like(target)  # Gβ [d_a, d_b], kept current
    diagonal = gram.diagonal()
    active = [k for k in range(gram.shape[0]) if float(diagonal[k]) > 0]
    for _ in range(max_sweeps):
        largest = 0.0
        for k in active:
            # Partial residual correlation of coordinate k with every target, then its exact update.
            partial = target[k] - product[k] + diagonal[k] * beta[k]  # [d_b]
            change = soft_threshold(partial, penalty) / diagonal[k] - beta[k]  # [d_b]
            size = float(change.abs().max())
            if size == 0.0:
                continue
            beta[k] += change
            product += torch.outer(gram[:, k], change)  # [d_a] x [d_b] -> [d_a, d_b]
            largest = max(largest, size)
        if largest < tolerance:
            break
    return beta


def refit_on_support(
    gram: torch.Tensor, target: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """Least squares of each target on its own support (the relaxed lasso, Meinshausen 2007).

    The lasso shrinks every kept coefficient by about the penalty; refitting on the chosen units
    removes that bias, so the prediction's R² measures the chosen units and not the shrinkage.
    `support` [d_a, d_b] is boolean; returns coefficients [d_a, d_b], zero off the support.
    """
    gram, target = gram.double(), target.double()
    beta = torch.zeros_like(target)
    for j in range(target.shape[1]):
        chosen = support[:, j].nonzero().flatten()  # [s]
        if chosen.numel() == 0:
            continue
        sub_gram = gram[chosen][:, chosen]  # [s, s]
        # gelsd: the minimum-norm solution where chosen units are collinear (duplicates).
        solution = torch.linalg.lstsq(
            sub_gram, target[chosen, j : j + 1], driver="gelsd"
        ).solution  # [s, 1]
        beta[chosen, j] = solution.flatten()
    return beta


__all__ = ["MAX_SWEEPS", "TOLERANCE", "lasso_from_gram", "refit_on_support", "soft_threshold"]
