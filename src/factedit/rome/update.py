"""The closed-form rank-one update (ROME eq. 2): write the pair (k̄, v*) into W.

    u = C⁻¹ k̄                 (solve, never invert)
    Λ = (v* − W k̄) / (uᵀ k̄)
    ΔW = Λ uᵀ                 so that (W + ΔW) k̄ = v*, and ΔW k = 0 for every k with uᵀk = 0.

`update="original"` reproduces the reference code, which takes the residual and the denominator
at the bare prompt's key instead of k̄ (a known cause of edits that disable the model).
`update="two_keys"` keeps ΔW rank one but picks u so that k̄ and the bare prompt's key k₀ both get
the shift the value optimization assumed: u is the C-smallest vector with uᵀk̄ = uᵀk₀ = 1, so
ΔW k̄ = ΔW k₀ = v* − W k̄ = δ. (With u = C⁻¹k̄, k₀ only gets the fraction uᵀk₀ / uᵀk̄ of δ, which is
small for some prompts that begin with the subject.)
"""

import torch

from factedit.errors import FacteditError


def rank_one_update(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    key: torch.Tensor,
    target_value: torch.Tensor,
    *,
    residual_key: torch.Tensor | None = None,
    also_key: torch.Tensor | None = None,
    projector: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, Λ) of ΔW = Λ uᵀ, in float64.

    weight: W (d_model, d_mlp) in out×in orientation; second_moment: C (d_mlp, d_mlp);
    key: k̄ (d_mlp,); target_value: v* (d_model,); residual_key: the key used in the residual and the
    denominator (default k̄; the reference implementation passes the bare prompt's key); also_key:
    k₀ (d_mlp,), a second key that gets the same shift as k̄ (two_keys); projector: P (d_mlp, d_mlp)
    of preserve.py, which takes the place of C⁻¹ (u is then the smallest vector in P's range with
    uᵀk̄ = 1, and uᵀk₀ = 1 with two_keys).
    Returns u (d_mlp,), Λ (d_model,).
    """
    weight, key, target_value = (t.detach().double() for t in (weight, key, target_value))
    residual_key = key if residual_key is None else residual_key.detach().double()
    if weight.shape != (target_value.numel(), key.numel()) or second_moment.shape != (key.numel(), key.numel()):
        raise FacteditError(
            f"shape mismatch: W {tuple(weight.shape)}, C {tuple(second_moment.shape)}, k {tuple(key.shape)}, "
            f"v {tuple(target_value.shape)}: the stats file belongs to another module"
        )
    if projector is None:
        whiten = lambda rhs: solve_second_moment(second_moment, rhs)  # C⁻¹ rhs
    else:
        whiten = lambda rhs: projector.to(rhs) @ rhs  # P rhs
    u = whiten(key) if also_key is None else two_key_direction(whiten, key, also_key.detach().double().to(key.device))
    denominator = u @ residual_key
    if not torch.isfinite(denominator) or denominator.abs() < 1e-12 * (1 if projector is None else key @ key):
        why = (
            "the null space holds none of this key: raise editor.null_space_threshold"
            if projector is not None
            else ("the key statistics are singular for this key (uᵀk ≈ 0): recompute stats with more tokens")
        )
        raise FacteditError(why)
    residual = target_value - weight @ residual_key
    return u, residual / denominator


def two_key_direction(whiten, key: torch.Tensor, also_key: torch.Tensor) -> torch.Tensor:
    """The u (d_mlp,) of least uᵀCu with uᵀk̄ = uᵀk₀ = 1: u = C⁻¹K (KᵀC⁻¹K)⁺ 1 for K = [k̄ k₀], where
    whiten(rhs) = C⁻¹ rhs (or P rhs: the least ‖u‖ in P's range). (The pseudo-inverse: when k₀ ∥ k̄
    the two conditions are one, and u = C⁻¹k̄ / k̄ᵀC⁻¹k̄.)"""
    keys = torch.stack([key, also_key], dim=1)  # (d_mlp, 2)
    whitened = whiten(keys)
    gram = keys.T @ whitened
    ones = torch.ones(2, dtype=gram.dtype, device=gram.device)
    return whitened @ (torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ ones)


def solve_second_moment(second_moment: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """C⁻¹ rhs in float64 on rhs's device; rhs: (d_mlp,) or (d_mlp, n).

    C's LU factorization is computed once per device and kept on the C tensor itself (it lives and
    dies with C, and is redone if C is changed in place), so every later edit with the same statistics
    costs two triangular solves instead of an O(d_mlp³) factorization and a copy of C to the device.
    """
    cache = second_moment.__dict__.setdefault("_factedit_lu", {})
    version = second_moment._version
    if cache.get(rhs.device, (None,))[0] != version:
        with torch.no_grad():
            lu, pivots, info = torch.linalg.lu_factor_ex(
                second_moment.detach().to(device=rhs.device, dtype=torch.float64)
            )
        if info.item() != 0:
            raise FacteditError("the key statistics C are singular: recompute stats with more tokens")
        cache.clear()  # one device at a time: a factor of d_mlp² float64s is not small
        cache[rhs.device] = (version, lu, pivots)
    _, lu, pivots = cache[rhs.device]
    solved = torch.linalg.lu_solve(lu, pivots, rhs.double().reshape(len(rhs), -1))
    return solved[:, 0] if rhs.dim() == 1 else solved


def delta_weight(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """ΔW = Λ uᵀ, (d_model, d_mlp), in float64: one edit's outer product (u (d_mlp,), Λ (d_model,)),
    or a batch's product of thin factors (u (d_mlp, r), Λ (d_model, r): rank ≤ r)."""
    u, lam = u.double(), lam.double()
    return torch.outer(lam, u) if u.dim() == 1 else lam @ u.T
