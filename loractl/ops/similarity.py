"""Subspace analyses of LoRA updates from Hu et al. 2021, "LoRA: Low-Rank Adaptation of LLMs".

* Section 7.2: the normalised subspace similarity φ between the top singular directions of two
  factors (e.g. A of a rank-8 and a rank-64 adapter).
* Section 7.3: how strongly ``ΔW`` amplifies directions of the base weight W.

Inputs may be any floating dtype; everything is computed and returned in float64.
"""

from __future__ import annotations

import torch

from .factored import factored_svd

__all__ = [
    "subspace_similarity",
    "similarity_grid",
    "overlap",
    "phi_from_overlap",
    "grid_from_overlap",
    "amplification",
]

_F64 = torch.float64


def _basis_parts(factor: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Q, P)`` with ``Q @ P`` the singular basis of :func:`_singular_basis` (P None: Q is the basis).

    Both bases are the left singular vectors of a tall matrix T (Aᵀ [n, r], or B [m, r]): T = Q R (QR),
    R = P Σ Hᵀ (SVD of the small r×r R), so T = (Q P) Σ Hᵀ and the basis is Q P. That is O(n · r²)
    work, a third of an SVD of the whole factor, and as accurate (QR is backward stable). Keeping Q and
    P apart lets :func:`overlap` form ``P₁ᵀ (Q₁ᵀ Q₂) P₂`` with one large product instead of three.
    """
    if factor.dim() != 2:
        raise ValueError(f"factor must be 2-D, got shape {tuple(factor.shape)}")
    if which not in ("A", "B"):
        raise ValueError(f'factor must be "A" or "B", got {which!r}')
    tall = factor.to(_F64)
    if which == "A":
        tall = tall.T
    if tall.shape[0] < tall.shape[1]:  # more components than dimensions: no QR shortcut
        return torch.linalg.svd(tall, full_matrices=False)[0], None
    q, r = torch.linalg.qr(tall)
    return q, torch.linalg.svd(r)[0]


def _singular_basis(factor: torch.Tensor, which: str) -> torch.Tensor:
    """Orthonormal singular vectors of one LoRA factor, as columns, in order of decreasing σ.

    Formula: for ``which == "A"`` the factor is A [r, n] = U Σ Vᵀ and the result is V [n, k]
    (right singular vectors, in Rⁿ); for ``which == "B"`` the factor is B [m, r] = U Σ Vᵀ and the
    result is U [m, k] (left singular vectors, in Rᵐ); k = min(r, n) resp. min(m, r). Computed
    as in :func:`_basis_parts`.

    Args:
        factor: A [r, n] or B [m, r].
        which: ``"A"`` or ``"B"``.

    Returns:
        The basis [n, k] or [m, k] in float64.
    """
    q, p = _basis_parts(factor, which)
    return q if p is None else q @ p


def overlap(x1: torch.Tensor, x2: torch.Tensor, factor: str = "A") -> torch.Tensor:
    """Squared overlaps ``(U1ᵀ U2)²`` [k1, k2] of the singular bases of two factors: what φ of every
    (i, j) is computed from (:func:`phi_from_overlap`, :func:`grid_from_overlap`)."""
    q1, p1 = _basis_parts(x1, factor)
    q2, p2 = _basis_parts(x2, factor)
    if q1.shape[0] != q2.shape[0]:
        side = "n (columns of A)" if factor == "A" else "m (rows of B)"
        raise ValueError(f"the factors do not share {side}: {tuple(x1.shape)} vs {tuple(x2.shape)}")
    m = q1.T @ q2
    if p1 is not None:
        m = p1.T @ m
    if p2 is not None:
        m = m @ p2
    return m.square()


def phi_from_overlap(sq: torch.Tensor, i: int, j: int) -> float:
    """φ(i, j) from :func:`overlap`'s matrix (see :func:`subspace_similarity`)."""
    k1, k2 = sq.shape
    if not (1 <= i <= k1 and 1 <= j <= k2):
        raise ValueError(f"need 1 <= i <= {k1} and 1 <= j <= {k2}, got i={i}, j={j}")
    # φ ≤ 1 exactly; clamp the round-off of the sums (1.0000000000000004 is not a similarity)
    return min(1.0, max(0.0, float(sq[:i, :j].sum()) / min(i, j)))


def grid_from_overlap(sq: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for every i and j from :func:`overlap`'s matrix (see :func:`similarity_grid`)."""
    k1, k2 = sq.shape
    prefix = sq.cumsum(0).cumsum(1)
    i = torch.arange(1, k1 + 1, dtype=_F64)[:, None]
    j = torch.arange(1, k2 + 1, dtype=_F64)[None, :]
    return (prefix / torch.minimum(i, j)).clamp_(0.0, 1.0)  # round-off of the sums may pass 1


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int, factor: str = "A") -> float:
    """Normalised subspace similarity φ of Hu et al. 2021, Section 7.2 (Eq. 4).

    Formula: ``φ(A1, A2, i, j) = ‖U1ᵢᵀ U2ⱼ‖²_F / min(i, j)`` where U1ᵢ holds the first i singular
    vectors of A1 and U2ⱼ the first j of A2 — right singular vectors (in Rⁿ) when the factors are
    A [r, n], left singular vectors (in Rᵐ) when they are B [m, r]. φ is in [0, 1]: 1 when one
    subspace contains the other, 0 when they are orthogonal.

    Args:
        A1: first factor, A1 [r1, n] (or, with ``factor="B"``, B1 [m, r1]).
        A2: second factor, A2 [r2, n] (or B2 [m, r2]).
        i: number of leading singular vectors of A1, 1 ≤ i ≤ min(r1, n) (resp. min(m, r1)).
        j: number of leading singular vectors of A2, likewise.
        factor: ``"A"`` (down factors) or ``"B"`` (up factors).

    Returns:
        φ as a Python float.
    """
    return phi_from_overlap(overlap(A1, A2, factor), i, j)


def similarity_grid(A1: torch.Tensor, A2: torch.Tensor, factor: str = "A") -> torch.Tensor:
    """φ(A1, A2, i, j) of :func:`subspace_similarity` for every i and j at once.

    Formula: with ``M = (U1ᵀ U2)²`` (element-wise square, [k1, k2]), ``‖U1ᵢᵀ U2ⱼ‖²_F`` is the
    two-dimensional prefix sum ``C[i, j] = Σ_{a≤i, b≤j} M[a, b]``, so
    ``grid[i−1, j−1] = C[i, j] / min(i, j)``. One decomposition per factor, O(k1 · k2) after that.

    Args:
        A1: first factor, A1 [r1, n] (or, with ``factor="B"``, B1 [m, r1]).
        A2: second factor, A2 [r2, n] (or B2 [m, r2]).
        factor: ``"A"`` (down factors) or ``"B"`` (up factors).

    Returns:
        float64 tensor [k1, k2] (k = the factor's rank r unless r exceeds the other dimension),
        entry [i−1, j−1] = φ(i, j).
    """
    return grid_from_overlap(overlap(A1, A2, factor))


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random [rows, cols] matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    gauss = torch.randn(rows, cols, generator=generator, dtype=_F64)
    q, r = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _projected_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``‖Uᵀ W V‖_F`` for U [m, r] and V [n, r] with orthonormal columns."""
    return float(torch.linalg.matrix_norm(U.T @ W @ V))


def amplification(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    s: float,
    r: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Feature amplification of ``ΔW = s · B · A`` on the base weight W (Hu et al. 2021, Sec. 7.3).

    Formula: with ``U`` [m, r] and ``V`` [n, r] the top-r left and right singular vectors of ΔW as
    columns (so ``ΔW ≈ U Σ Vᵀ``), W is projected onto ΔW's subspaces as ``Uᵀ W V`` ([r, r]).
    The paper writes the same projection ``Uᵀ W Vᵀ`` because its V holds the right vectors as
    rows (our ``Vh``). The amplification factor is ``‖ΔW‖_F / ‖Uᵀ W V‖_F``. For comparison the same
    projection is taken onto W's own top-r singular pair and onto a random orthonormal pair.

    Args:
        W: the dense base weight, [m, n].
        B: the up factor, [m, rank].
        A: the down factor, [rank, n].
        s: the scale of the update.
        r: how many singular directions to project on; defaults to the LoRA rank (B.shape[1]),
            capped at min(m, n).
        generator: random source of the random pair; ``None`` uses a fresh generator seeded with 0
            so results are reproducible.

    Returns:
        ``{"delta_norm": ‖ΔW‖_F, "proj_delta": ‖Uᵀ W V‖_F (U, V from ΔW), "proj_top": the same with
        U, V from W's top-r SVD, "proj_random": the same with a random orthonormal pair,
        "amplification": delta_norm / proj_delta (inf when proj_delta is 0), "w_norm": ‖W‖_F}``,
        all Python floats.
    """
    if W.dim() != 2 or tuple(W.shape) != (B.shape[0], A.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} does not match ΔW [{B.shape[0]}, {A.shape[1]}]")
    U, S, Vh = factored_svd(B, A, s)
    r = min(B.shape[1], S.shape[0]) if r is None else r
    if not 1 <= r <= S.shape[0]:
        raise ValueError(f"r must be in [1, {S.shape[0]}], got {r}")
    w64 = W.to(_F64)
    u_w, _, vh_w = torch.linalg.svd(w64, full_matrices=False)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    m, n = w64.shape
    delta_norm = float(torch.linalg.vector_norm(S))  # ‖ΔW‖_F = sqrt(Σ σᵢ²)
    proj_delta = _projected_norm(w64, U[:, :r], Vh[:r].T)
    return {
        "delta_norm": delta_norm,
        "proj_delta": proj_delta,
        "proj_top": _projected_norm(w64, u_w[:, :r], vh_w[:r].T),
        "proj_random": _projected_norm(
            w64, _random_orthonormal(m, r, generator), _random_orthonormal(n, r, generator)
        ),
        "amplification": delta_norm / proj_delta if proj_delta > 0 else float("inf"),
        "w_norm": float(torch.linalg.matrix_norm(w64)),
    }
