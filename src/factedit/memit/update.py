"""MEMIT's per-layer update: write a batch of (key, residual) pairs by least squares (MEMIT eq. 14).

For the F facts of a batch at one layer: keys K (d_mlp, F), residuals R (d_model, F) (the part of
each fact's v* − current value this layer takes). ΔW minimizes ‖(W + ΔW)K − (WK + R)‖² + λ‖ΔW C^½‖²,
i.e. it writes the pairs while keeping W's outputs on Wikipedia's keys, whose second moment is C:

    ΔW = R Kᵀ (λC + KKᵀ)⁻¹            λ = mom2_update_weight

With preserve=edited the keys written earlier in the run (their sum of outer products C_edited) join
the keys whose outputs are kept, as exactly as the batch's own are written, so a later batch does not
overwrite them; Wikipedia's keys are kept through λC as before (no projection):

    ΔW = R Kᵀ (λC + KKᵀ + C_edited)⁻¹   the minimizer of ‖ΔW K − R‖² + ‖ΔW K_edited‖² + λ‖ΔW C^½‖²

With preserve=null_space (AlphaEdit) the update instead lies in P's range, P the projection onto
the null space of Wikipedia's keys (preserve.py), and keeps the keys edited earlier in the run
(their sum of outer products C_edited):

    ΔWᵀ = (P(KKᵀ + C_edited + μC) + αI)⁻¹ P K Rᵀ      α = null_space_l2, μ = null_space_cov_weight

the minimizer over ΔW = ΔW P of ‖ΔW K − R‖² + α‖ΔW‖² + ‖ΔW K_edited‖² + μ‖ΔW C^½‖². AlphaEdit has μ = 0:
its P is an exact null space when the keys are low-rank. Where they are full-rank (SmolLM2's SwiGLU keys)
P keeps directions of small but non-zero variance, and μ > 0 weighs what Wikipedia's keys still see
through them, as MEMIT's λ does for the whole space.

Both are returned as thin factors (U (d_mlp, F), V (d_model, F)) with ΔW = V Uᵀ: a batch of F facts
is a rank-≤F change, saved as two matrices instead of d_model × d_mlp numbers.
"""

import torch

from factedit.errors import FacteditError


def memit_update(second_moment: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, weight: float,
                 edited_outer: torch.Tensor | None = None):  # fmt: skip
    """U = (λC + KKᵀ [+ C_edited])⁻¹K, V = R. keys (F, d_mlp), residuals (F, d_model); float64 on keys' device.
    edited_outer: Σ k kᵀ of the keys written earlier in the run (preserve=edited), or None."""
    keys, residuals = keys.double(), residuals.double().to(keys.device)
    system = weight * second_moment.to(keys).double() + keys.T @ keys  # λC + KKᵀ (d_mlp, d_mlp)
    if edited_outer is not None:
        system = system + edited_outer.to(keys)
    return _solve(system, keys.T), residuals.T


def null_space_update(projector: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor,
                      edited_outer: torch.Tensor | None, l2: float, second_moment: torch.Tensor | None = None,
                      cov_weight: float = 0.0):  # fmt: skip
    """U = (P(KKᵀ + C_edited + μC) + αI)⁻¹ P K, V = R (AlphaEdit; μ = cov_weight, 0 by default).
    edited_outer: Σ k kᵀ of keys edited before (or None); second_moment: C, needed when μ > 0."""
    keys, residuals = keys.double(), residuals.double().to(keys.device)
    projector = projector.to(keys)
    outer = keys.T @ keys if edited_outer is None else keys.T @ keys + edited_outer.to(keys)
    if cov_weight:
        outer = outer + cov_weight * second_moment.to(keys)
    system = projector @ outer + l2 * torch.eye(len(projector), dtype=keys.dtype, device=keys.device)
    return _solve(system, projector @ keys.T), residuals.T


def _solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    solution, info = torch.linalg.solve_ex(system, rhs)
    if info.item() != 0 or not torch.isfinite(solution).all():
        raise FacteditError(
            "the batch update's linear system is singular: recompute the key statistics with more tokens"
        )
    return solution
