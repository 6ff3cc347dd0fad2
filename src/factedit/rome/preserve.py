"""Null-space preservation (AlphaEdit; Fang et al., ICLR 2025): updates that leave ordinary text's keys alone.

C = E[k kᵀ] over Wikipedia has a few large eigenvalues and many small ones: the keys of ordinary
text live in the span of the first. P projects onto the eigenvectors of C whose eigenvalue is below
`threshold` × the mean eigenvalue, i.e. onto the (numerical) null space of the preserved keys K₀; an
update whose input side lies there, ΔW = Λ uᵀ with u = P u, changes W k₀ by Λ uᵀ P k₀ ≈ 0 for such keys.

Keys written by earlier edits of the same run are preserved too: `without_keys` narrows P to the
part orthogonal to P K_edited, so a later rank-one edit cannot move an earlier fact's key at all.
"""

import torch

from factedit.errors import FacteditError


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P (d, d) float64 on C's device: the projection onto C's eigenvectors with eigenvalue < threshold · mean.

    Cached on the C tensor (recomputed if C changes in place), like C's factorization in update.py.
    """
    cache = second_moment.__dict__.setdefault("_factedit_null_space", {})
    key = (second_moment._version, float(threshold))
    if key not in cache:
        eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.detach().double())
        small = eigenvalues < threshold * eigenvalues.mean()
        if not small.any():
            raise FacteditError(
                f"editor.null_space_threshold={threshold} leaves no null space: raise it (C's smallest eigenvalue is "
                f"{float(eigenvalues[0] / eigenvalues.mean()):.2e} of the mean)"
            )
        basis = eigenvectors[:, small]
        cache.clear()
        cache[key] = basis @ basis.T
    return cache[key]


def without_keys(projector: torch.Tensor, edited_outer: torch.Tensor | None, rtol: float = 1e-9) -> torch.Tensor:
    """P narrowed to the orthogonal complement of P K, K the keys edited before (edited_outer = Σ k kᵀ = KKᵀ,
    (d, d)); P itself when there are none."""
    if edited_outer is None:
        return projector
    values, vectors = torch.linalg.eigh(edited_outer.to(projector))
    span = vectors[:, values > rtol * values.abs().max()]  # an orthonormal basis of range(K)
    if span.shape[1] == 0:
        return projector
    u, s, _ = torch.linalg.svd(projector @ span, full_matrices=False)
    basis = u[:, s > rtol**0.5 * s.max()] if s.max() > 0 else u[:, :0]
    return projector - basis @ basis.T
