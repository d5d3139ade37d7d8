"""Spectral maths of one LoRA update ``ΔW = s · B · A`` computed from its factors.

B is [m, r] ("up"), A is [r, n] ("down") and s a float scale. Every function takes 2-D tensors of
any floating dtype, computes in float64 and returns float64 (the caller casts). The dense m×n
product is never formed: a thin QR of each factor reduces the problem to an r×r core.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "factored_svd",
    "truncate_factors",
    "balanced_factors",
    "choose_rank",
    "energy_kept",
    "effective_rank",
]

#: Relative slack used when comparing a rank rule's measure with its threshold, so that a threshold
#: that is met exactly in real arithmetic (e.g. energy 13/14 for S = [3, 2, 1]) is not missed
#: because of round-off in the cumulative sums.
RANK_RULE_RTOL = 1e-12

_F64 = torch.float64


def _check_factors(B: torch.Tensor, A: torch.Tensor) -> None:
    """Validate that ``B`` [m, r] and ``A`` [r, n] are 2-D floating factors with matching r."""
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(f"factors must be 2-D, got B {tuple(B.shape)} and A {tuple(A.shape)}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"inner dimensions differ: B is {tuple(B.shape)}, A is {tuple(A.shape)}")
    if not (B.is_floating_point() and A.is_floating_point()):
        raise TypeError(f"factors must be floating point, got {B.dtype} and {A.dtype}")


def factored_svd(
    B: torch.Tensor, A: torch.Tensor, s: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``s · B · A`` without forming the dense m×n product.

    Formula: ``B = Qb Rb`` and ``Aᵀ = Qa Ra`` (thin QR), ``s · Rb · Raᵀ = Uc · diag(S) · Vcᵀ``
    (SVD of the small core), hence ``s · B · A = (Qb Uc) · diag(S) · (Vcᵀ Qaᵀ)``, i.e.
    ``U = Qb Uc`` and ``Vh = Vcᵀ Qaᵀ``. Cost O((m + n) r²) instead of O(m n min(m, n)).

    Args:
        B: the up factor, [m, r], any floating dtype.
        A: the down factor, [r, n], any floating dtype.
        s: the scale s of ``ΔW = s · B · A``.

    Returns:
        ``(U, S, Vh)`` in float64 with ``U`` [m, k] (orthonormal columns), ``S`` [k] (descending,
        non-negative) and ``Vh`` [k, n] (orthonormal rows), ``k = min(r, m, n)`` (= r for any
        real LoRA module), such that ``s · B · A = U · diag(S) · Vh``.
    """
    _check_factors(B, A)
    q_b, r_b = torch.linalg.qr(B.to(_F64))  # B  = Qb Rb,  Qb [m, min(m, r)]
    q_a, r_a = torch.linalg.qr(A.to(_F64).T)  # Aᵀ = Qa Ra,  Qa [n, min(n, r)]
    core = float(s) * (r_b @ r_a.T)
    u_c, S, vh_c = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_c, S, vh_c @ q_a.T


def truncate_factors(
    B: torch.Tensor, A: torch.Tensor, s: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal (Eckart–Young) rank-``rank`` approximation of ``s · B · A`` as factors with scale 1.

    Formula: with ``s · B · A = U · diag(S) · Vh`` (:func:`factored_svd`), the best approximation
    of rank k in Frobenius and spectral norm is ``U_k · diag(S_k) · Vh_k`` (Eckart–Young–Mirsky),
    split evenly (:func:`balanced_factors`): ``B_new = U_k · diag(√S_k)``,
    ``A_new = diag(√S_k) · Vh_k``. The squared Frobenius error is ``Σ_{i>k} σᵢ²``.

    Args:
        B: the up factor, [m, r].
        A: the down factor, [r, n].
        s: the scale of the update.
        rank: the target rank k ≥ 1.

    Returns:
        ``(B_new, A_new)`` in float64, [m, k'] and [k', n], whose product (scale 1) is the
        approximation. When ``rank >= r`` nothing is lost and the exact factors are returned with
        s folded into B: ``(s · B, A)`` (so k' = r); otherwise ``k' = min(rank, m, n)``.
    """
    _check_factors(B, A)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank >= B.shape[1]:
        return B.to(_F64) * float(s), A.to(_F64)
    return balanced_factors(*factored_svd(B, A, s), rank)


def balanced_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the leading part of an SVD evenly into two factors.

    Formula: ``B = U_k · diag(√S_k)``, ``A = diag(√S_k) · Vh_k`` with ``k = min(rank, len(S))``,
    so ``B · A = U_k · diag(S_k) · Vh_k`` and ``Bᵀ B = A Aᵀ = diag(S_k)``.

    Args:
        U: left singular vectors as columns, [m, K].
        S: singular values, [K], descending.
        Vh: right singular vectors as rows, [K, n].
        rank: how many leading singular triplets to keep, ≥ 1.

    Returns:
        ``(B, A)``, [m, k] and [k, n], in the dtype of the inputs.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def _smallest_k_reaching(fraction: torch.Tensor, target: float) -> int:
    """Smallest k ≥ 1 with ``fraction[k-1] ≥ target`` (up to :data:`RANK_RULE_RTOL`).

    ``fraction`` is non-decreasing and ends at 1; when even the last entry misses the target
    (a target above 1), the full length is returned.
    """
    threshold = target * (1.0 - RANK_RULE_RTOL)
    reached = (fraction >= threshold).nonzero()
    return int(reached[0, 0]) + 1 if reached.numel() else int(fraction.shape[0])


def _check_fraction(name: str, value: float) -> None:
    """Reject a fraction rule's target outside [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def choose_rank(
    S: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
) -> int:
    """The smallest rank k ≥ 1 whose leading singular values satisfy a rule.

    Rules (at most one dynamic rule; σ₁ ≥ σ₂ ≥ … are the entries of ``S``):

    * ``energy`` F: ``Σ_{i≤k} σᵢ² / Σᵢ σᵢ² ≥ F``.
    * ``sv_ratio`` P: keep every ``σᵢ ≥ σ₁ / P``; k is the count of such σᵢ.
    * ``sv_cumulative`` F: ``Σ_{i≤k} σᵢ / Σᵢ σᵢ ≥ F``.
    * ``sv_fro`` F: ``sqrt(Σ_{i≤k} σᵢ² / Σᵢ σᵢ²) ≥ F``.

    Each comparison allows a relative slack of :data:`RANK_RULE_RTOL` (1e-12) so that a threshold
    met exactly in real arithmetic is met in floating point too. Unlike sd-scripts'
    ``resize_lora.py`` (which returns one rank more than the rule needs) k is the smallest rank
    that meets the rule: S = [3, 2, 1] with energy 13/14 gives k = 2.

    Args:
        S: singular values, 1-D, non-negative, in descending order.
        rank: alone, a fixed rank (``min(rank, len(S))``); with a dynamic rule, a cap on its k.
        energy: target fraction of the squared Frobenius norm, in [0, 1].
        sv_ratio: largest allowed ratio σ₁ / σᵢ, > 0.
        sv_cumulative: target fraction of the nuclear norm (Σσ), in [0, 1].
        sv_fro: target fraction of the Frobenius norm, in [0, 1].

    Returns:
        k, with ``1 ≤ k ≤ len(S)``. An all-zero S under a dynamic rule gives 1.
    """
    if S.dim() != 1 or S.numel() == 0:
        raise ValueError(f"S must be a non-empty 1-D tensor, got shape {tuple(S.shape)}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    rules = {"energy": energy, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative, "sv_fro": sv_fro}
    given = {name: value for name, value in rules.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one dynamic rank rule, got {sorted(given)}")
    n = int(S.shape[0])
    if not given:
        if rank is None:
            raise ValueError("give a rank or one of energy, sv_ratio, sv_cumulative, sv_fro")
        return min(rank, n)

    s64 = S.detach().to(_F64)
    if bool((s64 < 0).any()):
        raise ValueError("singular values must be non-negative")
    if float(s64.sum()) == 0.0:
        k = 1
    elif sv_ratio is not None:
        if sv_ratio <= 0:
            raise ValueError(f"sv_ratio must be > 0, got {sv_ratio}")
        floor = float(s64[0]) / sv_ratio * (1.0 - RANK_RULE_RTOL)
        k = max(1, int((s64 >= floor).sum()))
    elif sv_cumulative is not None:
        _check_fraction("sv_cumulative", sv_cumulative)
        k = _smallest_k_reaching(s64.cumsum(0) / s64.sum(), sv_cumulative)
    else:
        squared = s64.square()
        fraction = squared.cumsum(0) / squared.sum()
        if energy is not None:
            _check_fraction("energy", energy)
            k = _smallest_k_reaching(fraction, energy)
        else:
            assert sv_fro is not None
            _check_fraction("sv_fro", sv_fro)
            k = _smallest_k_reaching(fraction.sqrt(), sv_fro)
    return min(k, rank) if rank is not None else k


def energy_kept(S: torch.Tensor, k: int) -> float:
    """Fraction of the squared Frobenius norm kept by the first k singular values.

    Formula: ``Σ_{i≤k} σᵢ² / Σᵢ σᵢ²``.

    Args:
        S: singular values, 1-D.
        k: number of leading values kept (≥ 0; values past ``len(S)`` keep everything).

    Returns:
        The fraction in [0, 1]; 1.0 when S is all zero (nothing to lose).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    squared = S.detach().to(_F64).square()
    total = float(squared.sum())
    if total == 0.0:
        return 1.0
    return float(squared[:k].sum()) / total


def effective_rank(S: torch.Tensor) -> float:
    """Entropy-based effective rank (Roy & Vetterli, EUSIPCO 2007).

    Formula: ``erank = exp(−Σᵢ pᵢ log pᵢ)`` with ``pᵢ = σᵢ / Σⱼ σⱼ`` and ``0 · log 0 = 0``.
    It lies in [1, len(S)]: 1 for a single non-zero σ, len(S) for equal σ.

    Args:
        S: singular values, 1-D, non-negative.

    Returns:
        The effective rank; 0.0 for an all-zero S (the zero matrix).
    """
    s64 = S.detach().to(_F64)
    total = float(s64.sum())
    if total == 0.0:
        return 0.0
    p = s64[s64 > 0] / total
    return math.exp(float(-(p * p.log()).sum()))
