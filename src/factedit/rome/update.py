"""The closed-form rank-one update (ROME eq. 2): write the pair (k̄, v*) into W.

    u = C⁻¹ k̄                 (solve, never invert)
    Λ = (v* − W k̄) / (uᵀ k̄)
    ΔW = Λ uᵀ                 so that (W + ΔW) k̄ = v*, and ΔW k = 0 for every k with uᵀk = 0.

`update="original"` reproduces the reference code, which takes the residual and the denominator
at the bare prompt's key instead of k̄ (a known cause of edits that disable the model).
"""
import torch

from factedit.errors import FacteditError


def rank_one_update(weight: torch.Tensor, second_moment: torch.Tensor, key: torch.Tensor, target_value: torch.Tensor,
                    *, residual_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, Λ) of ΔW = Λ uᵀ, in float64.

    weight: W (d_model, d_mlp) in out×in orientation; second_moment: C (d_mlp, d_mlp);
    key: k̄ (d_mlp,); target_value: v* (d_model,); residual_key: the key used in the residual and the
    denominator (default k̄; the reference implementation passes the bare prompt's key).
    Returns u (d_mlp,), Λ (d_model,).
    """
    weight, second_moment, key, target_value = (t.detach().double() for t in (weight, second_moment, key, target_value))
    residual_key = key if residual_key is None else residual_key.detach().double()
    if weight.shape != (target_value.numel(), key.numel()) or second_moment.shape != (key.numel(), key.numel()):
        raise FacteditError(f"shape mismatch: W {tuple(weight.shape)}, C {tuple(second_moment.shape)}, k {tuple(key.shape)}, "
                            f"v {tuple(target_value.shape)}: the stats file belongs to another module")
    u = torch.linalg.solve(second_moment, key)
    denominator = u @ residual_key
    if not torch.isfinite(denominator) or denominator.abs() < 1e-12:
        raise FacteditError("the key statistics are singular for this key (uᵀk ≈ 0): recompute stats with more tokens")
    residual = target_value - weight @ residual_key
    return u, residual / denominator


def delta_weight(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """ΔW = Λ uᵀ, (d_model, d_mlp)."""
    return torch.outer(lam.double(), u.double())
