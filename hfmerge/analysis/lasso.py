"""Lasso from Gram matrices: many targets at once by ADMM, then a least-squares refit.

Solves, per column j of `target`, min_β ½·βᵀGβ - t_jᵀβ + λ·‖β‖₁. With G the correlation matrix
of the predictors and t_j their correlations with target j this is the standardised lasso
(1/2n)·‖b_j - Aβ‖² + λ‖β‖₁ up to a constant, written with sums the caller already streamed.
"""

# ADMM (Boyd et al. 2011, §6.4) on the split β = z: β ← (G + ρI)⁻¹(t + ρ(z - u)),
# z ← soft(β + u, λ/ρ), u ← u + β - z. Every target shares G, so one eigendecomposition serves all
# iterations and all targets, and an iteration is one [d_a, d_a] @ [d_a, d_b] product. Activation
# units are strongly correlated, which makes G ill-conditioned: proximal gradient (ISTA/FISTA) then
# crawls, and coordinate descent, exact per coordinate, needs d_a Python-level steps per sweep and
# thousands of sweeps (about 5 s per layer of width 128); ADMM reaches the same support and
# objective (to 1e-14) in a few hundred products. z carries the exact zeros.

from __future__ import annotations

import torch

MAX_ITERATIONS = 20_000
TOLERANCE = 1e-9  # on max |β - z| and ρ·max |Δz|, in standardised units
STEP = 0.5  # ρ; the predictors are standardised (G_kk = 1), so one value suits every layer
_CHECK_EVERY = 10  # iterations between convergence checks (each costs a device sync)


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """sign(v)·max(|v| - threshold, 0), elementwise."""
    return values.sign() * (values.abs() - threshold).clamp_min(0.0)


def lasso_from_gram(
    gram: torch.Tensor,
    target: torch.Tensor,
    *,
    penalty: float,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> torch.Tensor:
    """Lasso coefficients [d_a, d_b] for `gram` [d_a, d_a] (Gᵀ = G, G ⪰ 0) and `target` [d_a, d_b].

    Exact zeros mark the predictors a target does not use.
    """
    if penalty < 0:
        raise ValueError(f"the L1 penalty must be >= 0, got {penalty}")
    gram, target = gram.double(), target.double()
    values, vectors = torch.linalg.eigh(gram)  # G = V diag(λ) Vᵀ
    # (G + ρI)⁻¹ = V diag(1/(λ + ρ)) Vᵀ: [d_a, d_a] scaled by column, then @ [d_a, d_a]
    solve = (vectors / (values.clamp_min(0) + STEP)) @ vectors.T
    z = torch.zeros_like(target)  # [d_a, d_b]
    u = torch.zeros_like(target)  # scaled dual [d_a, d_b]
    for iteration in range(max_iterations):
        beta = solve @ (target + STEP * (z - u))  # [d_a, d_a] @ [d_a, d_b]
        previous = z
        z = soft_threshold(beta + u, penalty / STEP)
        u += beta - z
        if iteration % _CHECK_EVERY == 0:
            primal = float((beta - z).abs().max())
            dual = STEP * float((z - previous).abs().max())
            if max(primal, dual) < tolerance:
                break
    return z


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


__all__ = ["MAX_ITERATIONS", "TOLERANCE", "lasso_from_gram", "refit_on_support", "soft_threshold"]
