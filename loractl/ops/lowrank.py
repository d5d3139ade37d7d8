"""The best low-rank approximation of a dense update, and ranks for a size budget (issue #14).

``loractl extract BASE TUNED`` replaces each changed weight's update ``ΔW = W_tuned − W_base``
(m×n) by a LoRA product ``b · a`` of rank k. By Eckart–Young–Mirsky the best rank-k approximation
in the Frobenius norm is the truncated SVD, losing ``Σ_{i>k} σᵢ²``. This module computes it, or a
certified near-optimal one, without a dense SVD:

* :func:`low_rank`: factors ``b`` [m, k] and ``a`` [k, n] for a fixed rank or an energy target,
  with the *true* relative error ``‖ΔW − b·a‖_F / ‖ΔW‖_F`` measured on the returned factors
  (the certificate), never more ranks than ΔW's numerical rank;
* :func:`spectrum_topk`: the leading singular values alone, to feed the allocator;
* :func:`rounding_floor`: how large a singular value the rounding of a stored matrix can make;
* :func:`allocate`: ranks per module that minimise the total squared error within a size budget
  (greedy by squared singular value per byte, with its optimality certificate).

Two methods (``method="auto"`` picks the cheaper): ``"randomized"`` is a range finder with
adaptive subspace (power) iteration and Rayleigh–Ritz (Halko, Martinsson & Tropp, SIAM Review 53
(2011), Algorithms 4.4 and 5.1); ``"exact"`` takes the eigenvectors of the float64 Gram matrix of
the smaller side. Large passes over ΔW run in float32, small matrices and norms in float64. Tensors
in, tensors out: no files, no printing. docs/algebra.md ("extract: the best LoRA of a full
fine-tune") states the method and its guarantees with measured numbers.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .factored import RANK_RULE_RTOL

__all__ = [
    "LowRank",
    "Spectrum",
    "low_rank",
    "certificate",
    "narrow",
    "spectrum_topk",
    "rounding_floor",
    "Candidate",
    "Allocation",
    "allocate",
    "OVERSAMPLE",
    "POWER_TOL",
    "MAX_POWER_ITERATIONS",
    "FLOOR_SAFETY",
]

_F32 = torch.float32
_F64 = torch.float64

#: Oversampling of the range finder: the sketch has ``k + max(OVERSAMPLE, ⌈k/2⌉)`` columns.
OVERSAMPLE = 16
#: Power iterations stop when one more improved the rank-k error by less than this fraction.
POWER_TOL = 1e-3
#: At least this many power iterations (the first one always pays on slowly decaying spectra).
MIN_POWER_ITERATIONS = 1
#: And at most this many (the loop's termination bound).
MAX_POWER_ITERATIONS = 8
#: ``method="auto"`` uses the exact method when the sketch would have at least this fraction of
#: min(m, n) columns (then the Gram eigendecomposition costs less than the iterations).
EXACT_FRACTION = 0.25
#: Margin of :func:`rounding_floor` over the expected largest singular value of rounding noise.
FLOOR_SAFETY = 1.5
#: Below this squared relative error (1e-3 relative) the certificate is recomputed in float64,
#: because a float32 residual would be dominated by its own rounding.
_FP64_CERTIFICATE_BELOW = 1e-6
#: Below this squared relative error (0.03 relative) the power iteration's convergence test uses
#: a float32 residual instead of Pythagoras (‖ΔW‖² − ‖B_k‖² cancels there).
_PYTHAGORAS_ABOVE = 1e-3
#: Elements per block when ΔW is walked block by block (residuals, norms, Gram matrix).
_BLOCK = 1 << 20

_PRECISION_BITS: dict[torch.dtype, int] = {
    torch.float64: 53,
    torch.float32: 24,
    torch.float16: 11,
    torch.bfloat16: 8,
}
for _name, _bits in (
    ("float8_e4m3fn", 4),
    ("float8_e4m3fnuz", 4),
    ("float8_e5m2", 3),
    ("float8_e5m2fnuz", 3),
):
    if hasattr(torch, _name):
        _PRECISION_BITS[getattr(torch, _name)] = _bits

Method = Literal["auto", "exact", "randomized"]


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """A rank-k approximation ``b · a`` of an update ΔW, with its certificate.

    Attributes:
        b: [m, k] float32, ``U_k · diag(√σ)`` (the "up" factor, PEFT's lora_B with scale 1).
        a: [k, n] float32, ``diag(√σ) · V_kᵀ`` (the "down" factor, lora_A). ``bᵀb = a aᵀ = diag(σ_k)``
            up to float32 rounding, as :func:`loractl.ops.factored.balanced_factors` splits them.
        s: float64, descending: the singular values the method found. ``"exact"``: all min(m, n)
            of ΔW. ``"randomized"``: the Ritz values of the sketch (its columns' count), each a lower
            bound of the true σᵢ (σᵢ(QᵀΔW) ≤ σᵢ(ΔW)); the first k are the factors' σ.
        rank: k, the number of columns of ``b``; 0 when ΔW is zero or all rounding noise.
        rel_error: ``‖ΔW − b·a‖_F / ‖ΔW‖_F`` of the returned float32 factors, computed from ΔW
            itself (a residual in float32, redone in float64 when below 1e-3); 0.0 for a zero ΔW.
        energy_kept: ``‖b·a‖²_F / ‖ΔW‖²_F`` in float64; 1.0 for a zero ΔW.
        method: ``"exact"`` or ``"randomized"``.
        numerical_rank: how many of ``s`` exceed ``floor`` (for "randomized" counted among the
            Ritz values, so at most their number).
        floor: the singular value below which ΔW is rounding noise (see :func:`low_rank`).
        power_iterations: power iterations run (0 for "exact").
        norm: ``‖ΔW‖_F``.
    """

    b: torch.Tensor
    a: torch.Tensor
    s: torch.Tensor
    rank: int
    rel_error: float
    energy_kept: float
    method: str
    numerical_rank: int
    floor: float
    power_iterations: int
    norm: float


@dataclass(frozen=True)
class Spectrum:
    """The leading singular values of an update (:func:`spectrum_topk`).

    Attributes:
        s: float64, descending: at most k values, only those above ``floor`` (so its length is
            min(k, numerical rank)); Ritz values (lower bounds) for "randomized".
        total: ``‖ΔW‖²_F`` (what an allocation's loss is measured against).
        floor: the rounding-noise floor used.
        method: ``"exact"`` or ``"randomized"``.
    """

    s: torch.Tensor
    total: float
    floor: float
    method: str


# --- the noise floor -----------------------------------------------------------------------------


def _precision_bits(dtype: torch.dtype) -> int:
    try:
        return _PRECISION_BITS[dtype]
    except KeyError:
        raise TypeError(f"expected a floating-point tensor, got {dtype}") from None


def _norms(t: torch.Tensor) -> tuple[float, float, float]:
    """``(‖t‖²_F, max row norm, max column norm)`` of a 2-D tensor, block by block, squares summed in
    float64. Row norms come from float32 blocks (relative error ~1e-7)."""
    m, n = t.shape
    if t.numel() == 0:
        return 0.0, 0.0, 0.0
    rows = max(1, _BLOCK // max(n, 1))
    total = 0.0
    row_max = 0.0
    col_sq = torch.zeros(n, dtype=_F64)
    for i in range(0, m, rows):
        blk = t[i : i + rows]
        if blk.dtype == _F64:
            r = torch.linalg.vector_norm(blk, dim=1)
            col_sq += blk.square().sum(0)
        else:
            blk = blk.to(_F32)
            r = torch.linalg.vector_norm(blk, dim=1).to(_F64)
            col_sq += blk.square().sum(0, dtype=_F64)
        total += float(r.square().sum())
        row_max = max(row_max, float(r.max()))
    return total, row_max, math.sqrt(float(col_sq.max()))


def _floor_from_norms(dtype: torch.dtype, row_max: float, col_max: float) -> float:
    p = _precision_bits(dtype)
    return FLOOR_SAFETY * 2.0 ** (1 - p) / math.sqrt(12.0) * (row_max + col_max)


def rounding_floor(t: torch.Tensor) -> float:
    """The largest singular value the rounding of a stored matrix can be expected to produce.

    Model: each entry x of ``t`` was rounded to nearest in ``t.dtype`` (precision p bits: 8 for
    bfloat16, 11 for float16, 24 for float32), so its error is at most half a unit in the last
    place, ``ulp(x) ≤ 2^{1−p}·|x|``, and behaves like an independent zero-mean variable of variance
    ``vᵢⱼ ≤ ulp(xᵢⱼ)²/12`` (uniform). A matrix E of such entries has
    ``E‖E‖₂ ≲ maxᵢ √(Σⱼ vᵢⱼ) + maxⱼ √(Σᵢ vᵢⱼ)`` (Bandeira & van Handel, Ann. Probab. 44 (2016);
    for equal variances v it is the Marchenko–Pastur edge (√m + √n)·√v). The floor is that bound,
    with ulp(x) ≤ 2^{1−p}|x| and a margin :data:`FLOOR_SAFETY` (1.5)::

        floor = 1.5 · 2^{1−p}/√12 · (maxᵢ ‖t[i, :]‖₂ + maxⱼ ‖t[:, j]‖₂)

    Measured on bfloat16 and float16 merges (shapes 16×32 to 2048×5632, with and without outlier
    rows and columns) the rounding noise's largest singular value was at most 0.91 of the bound
    before the margin.

    For ``ΔW = tuned − base`` where ``tuned`` was stored after adding an update to ``base`` (a merged
    adapter, a fine-tune saved in bfloat16), pass ``rounding_floor(tuned)`` to :func:`low_rank`.

    Args:
        t: a 2-D floating tensor (any of float64/32/16, bfloat16, float8).

    Returns:
        The floor, a singular value in the units of ``t`` (0.0 for an empty or zero tensor).

    Raises:
        ValueError: ``t`` is not 2-D or not finite.
        TypeError: ``t`` is not floating point.
    """
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(t.shape)}")
    _precision_bits(t.dtype)
    total, row_max, col_max = _norms(t)
    if not math.isfinite(total):
        raise ValueError("tensor has non-finite values")
    return _floor_from_norms(t.dtype, row_max, col_max)


# --- the two methods -----------------------------------------------------------------------------


@dataclass
class _Ritz:
    """``x ≈ (Q·Uz) · diag(S) · Vzᵀ`` with ``Z = xᵀQ = Vz · diag(S) · Uzᵀ`` (thin SVD, float64)."""

    q: torch.Tensor  # [p, l] float32, orthonormal columns
    z: torch.Tensor  # [q, l] float32, xᵀQ
    vz: torch.Tensor  # [q, l] float64
    s: torch.Tensor  # [l] float64, descending
    uz: torch.Tensor  # [l, l] float64

    @classmethod
    def of(cls, x: torch.Tensor, q: torch.Tensor) -> _Ritz:
        z = x.T @ q  # one pass over x: Z = xᵀQ = (Qᵀx)ᵀ
        vz, s, uzh = torch.linalg.svd(z.to(_F64), full_matrices=False)
        return cls(q, z, vz, s, uzh.T)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, a)`` of x's rank-k Ritz approximation, float64, split √σ to each side."""
        root = self.s[:k].sqrt()
        u = self.q.to(_F64) @ self.uz[:, :k]
        return u * root, root[:, None] * self.vz[:, :k].T


def _orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (Householder QR, stable even when y is rank deficient)."""
    return torch.linalg.qr(y).Q


def _oversample(k: int) -> int:
    return max(OVERSAMPLE, -(-k // 2))


def _to_d(b: torch.Tensor, a: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of x mapped to ΔW's orientation (x = ΔWᵀ when transposed), as contiguous float32."""
    if transposed:
        b, a = a.T, b.T
    return b.to(_F32).contiguous(), a.to(_F32).contiguous()


def _residual_sq(src: torch.Tensor, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> float:
    """``‖src − b·a‖²_F`` block by block of rows, each block's residual formed in ``dtype`` and its
    squared norm summed in float64. Never holds more than one block of the residual."""
    m, n = src.shape
    if b.shape[1] == 0:
        return _norms(src)[0]
    rows = max(1, _BLOCK // max(n, 1))
    b_, a_ = b.to(dtype), a.to(dtype)
    total = 0.0
    for i in range(0, m, rows):
        r = torch.addmm(src[i : i + rows].to(dtype), b_[i : i + rows], a_, alpha=-1)
        # per-row norms: a whole-tensor float32 vector_norm loses ~1e-4 relative on 3M elements
        total += float(torch.linalg.vector_norm(r, dim=1).to(_F64).square().sum())
    return total


def _error_sq(ritz: _Ritz, k: int, total: float, d: torch.Tensor, transposed: bool) -> float:
    """Squared error of the rank-k Ritz approximation, for the convergence test: Pythagoras
    ``‖ΔW‖² − Σ_{i≤k} σᵢ²`` (exact when B = QᵀΔW), or a float32 residual when that cancels."""
    pyth = total - float(ritz.s[:k].square().sum())
    if pyth >= _PYTHAGORAS_ABOVE * total:
        return pyth
    return _residual_sq(d, *_to_d(*ritz.factors(k), transposed), _F32)


def _randomized(
    x: torch.Tensor, width: int, k: int, total: float, gen: torch.Generator, d: torch.Tensor, transposed: bool
) -> tuple[_Ritz, int]:
    """Range finder with adaptive subspace iteration (Halko et al. 2011, Alg. 4.4 with Alg. 5.1).

    ``Q₀ = orth(x Ω)`` with Ω a Gaussian [q, l]; each iteration ``Q ← orth(x · orth(xᵀQ))``. Every
    ``Z = xᵀQ`` is also the Rayleigh–Ritz matrix of the current Q, so its SVD gives the rank-k error
    of that iterate for free (Pythagoras). Stops when an iteration improved that error by less than
    :data:`POWER_TOL` (relative) after at least :data:`MIN_POWER_ITERATIONS`, or after
    :data:`MAX_POWER_ITERATIONS`; returns the best iterate seen and the iterations run.
    """
    omega = torch.randn(x.shape[1], width, generator=gen, dtype=_F32)
    best = _Ritz.of(x, _orth(x @ omega))
    best_err = _error_sq(best, k, total, d, transposed)
    last = best
    it = 0
    while it < MAX_POWER_ITERATIONS:
        cand = _Ritz.of(x, _orth(x @ _orth(last.z)))
        last = cand
        it += 1
        err = _error_sq(cand, k, total, d, transposed)
        previous = best_err
        if err < best_err:
            best, best_err = cand, err
        if it >= MIN_POWER_ITERATIONS and previous <= (1.0 + POWER_TOL) ** 2 * err:
            break
    return best, it


def _gram_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All singular values of x ([p, q], p ≤ q) and its left singular vectors, from the float64
    Gram matrix ``x xᵀ`` (built block by block of columns) and its eigendecomposition."""
    p, q = x.shape
    gram = torch.zeros(p, p, dtype=_F64)
    cols = max(1, _BLOCK // max(p, 1))
    for j in range(0, q, cols):
        blk = x[:, j : j + cols].to(_F64)
        gram.addmm_(blk, blk.T)
    w, v = torch.linalg.eigh(gram)
    return w.flip(0).clamp(min=0).sqrt(), v.flip(1)


def _gram64(y: torch.Tensor) -> torch.Tensor:
    """``y · yᵀ`` in float64 for a wide y [k, n], block by block of columns."""
    k, n = y.shape
    out = torch.zeros(k, k, dtype=_F64)
    cols = max(1, _BLOCK // max(k, 1))
    for j in range(0, n, cols):
        blk = y[:, j : j + cols].to(_F64)
        out.addmm_(blk, blk.T)
    return out


def _resolution(shape: torch.Size, s1: float) -> float:
    """Singular values below ``√max(m, n) · 2⁻²⁴ · σ₁`` are not resolved by float32 arithmetic
    (the backward error of a float32 product with inner dimension N is ~√N·u relative)."""
    return math.sqrt(max(shape)) * 2.0**-24 * s1


def _energy_rank(s: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest k with ``Σ_{i≤k} σᵢ² ≥ energy · total`` (slack RANK_RULE_RTOL), or None."""
    if s.numel() == 0:
        return None
    reached = (s.square().cumsum(0) >= energy * total * (1.0 - RANK_RULE_RTOL)).nonzero()
    return max(1, int(reached[0, 0]) + 1) if reached.numel() else None


@dataclass
class _Solved:
    ritz: _Ritz | None
    s: torch.Tensor
    k: int
    numerical_rank: int
    floor: float
    method: str
    iterations: int


def _solve(
    d: torch.Tensor,
    total: float,
    base_floor: float,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    method: Method,
    seed: int,
) -> _Solved:
    """Choose the rank and compute the Ritz approximation of it (None when k = 0)."""
    m, n = d.shape
    p = min(m, n)
    transposed = m > n
    x = d.T if transposed else d  # [p, q] with p ≤ q
    cap = p if max_rank is None else min(max_rank, p)
    if rank is not None:
        cap = min(cap, rank)

    def floor_of(s: torch.Tensor) -> float:
        s1 = float(s[0]) if s.numel() else 0.0
        return math.hypot(base_floor, _resolution(d.shape, s1))

    def choose(s: torch.Tensor, fl: float) -> tuple[int, int]:
        r_num = int((s > fl).sum())
        k = cap if energy is None else (_energy_rank(s, total, energy) or cap)
        return min(k, cap, r_num), r_num

    gen = torch.Generator().manual_seed(seed)
    guess = cap if energy is None else min(cap, 32)
    if method == "randomized" or (method == "auto" and guess + _oversample(guess) < EXACT_FRACTION * p):
        if energy is None:
            width = min(cap + _oversample(cap), p)
            ritz, it = _randomized(x, width, cap, total, gen, d, transposed)
            fl = floor_of(ritz.s)
            k, r_num = choose(ritz.s, fl)
            return _Solved(ritz if k else None, ritz.s, k, r_num, fl, "randomized", it)
        while True:
            width = min(guess + _oversample(guess), p)
            if method == "auto" and width >= EXACT_FRACTION * p:
                break  # growing the sketch costs more than the exact method now
            ritz, it = _randomized(x, width, guess, total, gen, d, transposed)
            fl = floor_of(ritz.s)
            # only the first `guess` Ritz values have the oversampling behind them (all when l = p)
            k_e = _energy_rank(ritz.s if width >= p else ritz.s[:guess], total, energy)
            r_num = int((ritz.s > fl).sum())
            if k_e is not None or r_num <= guess or guess >= cap or width >= p:
                k = min(k_e or guess, cap, r_num)
                return _Solved(ritz if k else None, ritz.s, k, r_num, fl, "randomized", it)
            guess = min(cap, 4 * guess)
    s, v = _gram_eigh(x)
    fl = floor_of(s)
    k, r_num = choose(s, fl)
    ritz = _Ritz.of(x, v[:, :k].to(_F32).contiguous()) if k else None
    return _Solved(ritz, s, k, r_num, fl, "exact", 0)


def _prepare(
    delta: torch.Tensor,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    noise_floor: float | None,
    method: str,
) -> tuple[torch.Tensor, float, float]:
    """Validate the arguments; return ``(ΔW as float32, ‖ΔW‖²_F, floor before the σ₁ term)``."""
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise TypeError(f"delta must be floating point, got {delta.dtype}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if noise_floor is not None and not (noise_floor >= 0.0 and math.isfinite(noise_floor)):
        raise ValueError(f"noise_floor must be a finite number >= 0, got {noise_floor}")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    total, row_max, col_max = _norms(delta)
    if not math.isfinite(total):
        raise ValueError("delta has non-finite values (inf or NaN)")
    own = _floor_from_norms(delta.dtype, row_max, col_max)
    d = delta.to(_F32).contiguous()
    return d, total, math.hypot(noise_floor or 0.0, own)


def low_rank(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    noise_floor: float | None = None,
    method: Method = "auto",
    seed: int = 0,
) -> LowRank:
    """The best (or certified near-best) rank-k approximation ``b · a`` of an update ΔW.

    Formula: with ``ΔW ≈ Q·Qᵀ·ΔW`` for an orthonormal Q [m, l] (from the randomized range finder
    or, for ``"exact"``, the top eigenvectors of the Gram matrix) and ``QᵀΔW = Uz·diag(σ)·Vzᵀ``,
    the approximation is ``(Q·Uz_k)·diag(σ_k)·Vz_kᵀ`` (Rayleigh–Ritz: the best rank-k approximation
    within range(Q)), split ``b = Q·Uz_k·diag(√σ_k)``, ``a = diag(√σ_k)·Vz_kᵀ``. Its squared error
    is ``‖ΔW‖² − Σ_{i≤k} σᵢ²``; the reported ``rel_error`` is nevertheless measured directly on
    the returned float32 factors.

    The rank k:

    * ``rank`` R: ``k = min(R, max_rank, min(m, n), numerical rank)``;
    * ``energy`` F: the smallest k whose approximation keeps ``Σ_{i≤k} σᵢ² ≥ F · ‖ΔW‖²`` (slack
      1e-12), capped by ``max_rank`` and the numerical rank. With randomized Ritz values (lower
      bounds of the true σ) the k found can exceed the exact rule's by a little, never fall short.

    The numerical rank is the number of singular values above ``floor = hypot(noise_floor,
    rounding_floor(delta), √max(m, n)·2⁻²⁴·σ₁)``: the rounding noise of the stored weights (pass
    ``rounding_floor(tuned)``), the rounding of ΔW in its own dtype, and what float32 arithmetic
    resolves. If ``ΔW = Δ + E`` with rank(Δ) = r and ‖E‖₂ ≤ floor, then σ_{r+1}(ΔW) ≤ ‖E‖₂ ≤ floor
    (Weyl), so k ≤ r: a model merged from a rank-8 adapter gives back at most rank 8.

    Args:
        delta: ΔW, [m, n], float32/float16/bfloat16 (computed in float32; float64 is accepted, and
            computed in float32 too, with the certificate measured against the float64 values).
        rank: a fixed rank R ≥ 1.
        energy: or a target fraction F in [0, 1] of ‖ΔW‖²_F to keep.
        max_rank: a cap on k (with ``energy`` mostly).
        noise_floor: the rounding noise of the weights ΔW came from, as a singular value
            (:func:`rounding_floor` of the tuned tensor); None adds nothing.
        method: ``"auto"`` (exact when the sketch would hold ≥ 1/4 of min(m, n) columns),
            ``"exact"`` or ``"randomized"``.
        seed: seed of the Gaussian test matrix (results are deterministic for a seed).

    Returns:
        A :class:`LowRank`. k = 0 (empty factors) when ΔW is zero or entirely below the floor.

    Raises:
        ValueError: not 2-D, not finite, neither or both of rank/energy, a bad value.
        TypeError: delta not floating point.
    """
    d, total, base_floor = _prepare(delta, rank, energy, max_rank, noise_floor, method)
    m, n = d.shape
    if total == 0.0:
        empty = torch.zeros(0, dtype=_F64)
        return LowRank(
            torch.zeros(m, 0), torch.zeros(0, n), empty, 0, 0.0, 1.0, "exact", 0, base_floor, 0, 0.0
        )
    solved = _solve(d, total, base_floor, rank, energy, max_rank, method, seed)
    if solved.ritz is None:
        b, a = torch.zeros(m, 0), torch.zeros(0, n)
    else:
        b, a = _to_d(*solved.ritz.factors(solved.k), m > n)
    src = delta if delta.dtype == _F64 else d
    err_sq = _residual_sq(src, b, a, _F64 if delta.dtype == _F64 else _F32)
    if err_sq < _FP64_CERTIFICATE_BELOW * total and delta.dtype != _F64:
        err_sq = _residual_sq(src, b, a, _F64)
    kept = float((_gram64(b.T) * _gram64(a)).sum())  # ‖b·a‖²_F = tr(bᵀb · a aᵀ)
    return LowRank(
        b=b,
        a=a,
        s=solved.s,
        rank=solved.k,
        rel_error=math.sqrt(max(err_sq, 0.0) / total),
        energy_kept=kept / total,
        method=solved.method,
        numerical_rank=solved.numerical_rank,
        floor=solved.floor,
        power_iterations=solved.iterations,
        norm=math.sqrt(total),
    )


def certificate(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """``(‖ΔW − b·a‖_F / ‖ΔW‖_F, ‖b·a‖²_F / ‖ΔW‖²_F)`` of any factors, measured as :func:`low_rank`
    measures its own (``rel_error``, ``energy_kept``).

    For factors stored in another dtype than the float32 ones :func:`low_rank` returns (a bfloat16
    adapter): the error of what is written, the rounding of the factors included. The residual is
    formed block by block in float32 (in float64 when ΔW is float64, or when the error is below
    10⁻³, where the float32 rounding of the product would dominate it), its squared row norms
    summed in float64; the energy is ``tr(bᵀb · a aᵀ)`` in float64.

    Args:
        delta: ΔW, [m, n].
        b: [m, k] (k may be 0).
        a: [k, n].

    Returns:
        ``(rel_error, energy_kept)``; ``(0.0, 1.0)`` for a zero ΔW.

    Raises:
        ValueError: shapes that do not fit, or a ΔW that is not finite.
        TypeError: delta not floating point.
    """
    fits = delta.dim() == b.dim() == a.dim() == 2 and b.shape[1] == a.shape[0]
    if not fits or b.shape[0] != delta.shape[0] or a.shape[1] != delta.shape[1]:
        raise ValueError(
            f"factors {tuple(b.shape)} and {tuple(a.shape)} do not fit an update of shape {tuple(delta.shape)}"
        )
    if not delta.is_floating_point():
        raise TypeError(f"delta must be floating point, got {delta.dtype}")
    wide = delta.dtype == _F64
    src = delta if wide else delta.to(_F32).contiguous()
    total = _norms(src)[0]
    if not math.isfinite(total):
        raise ValueError("delta has non-finite values (inf or NaN)")
    if total == 0.0:
        return 0.0, 1.0
    b32, a32 = b.to(_F32), a.to(_F32)
    err_sq = _residual_sq(src, b32, a32, _F64 if wide else _F32)
    if err_sq < _FP64_CERTIFICATE_BELOW * total and not wide:
        err_sq = _residual_sq(src, b32, a32, _F64)
    kept = float((_gram64(b32.T) * _gram64(a32)).sum()) if b.shape[1] else 0.0
    return math.sqrt(max(err_sq, 0.0) / total), kept / total


def narrow(
    delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Factors ``b`` [m, k], ``a`` [k, n] stored in a narrower ``dtype`` (bfloat16, float16), with the
    :func:`certificate` of what is stored.

    Two candidates, the one with the smaller true error kept: the plain cast of both factors, and the
    cast ``a`` with ``b`` refitted to it by least squares, ``b = ΔW·aᵀ·(a·aᵀ)⁻¹`` (float64 Gram, k×k),
    then cast: the best up factor for the rounded down factor, so ``a``'s rounding is absorbed and
    only ``b``'s is left. A dense SVD whose factors are cast (mergekit's rule) is the first candidate.

    Returns:
        ``(b, a, rel_error, energy_kept)`` in ``dtype``.
    """
    plain_b, plain_a = b.to(dtype), a.to(dtype)
    best = (plain_b, plain_a, *certificate(delta, plain_b, plain_a))
    if b.shape[1] == 0:
        return best
    a64 = plain_a.to(_F64)
    rhs = (delta.to(_F32) @ plain_a.to(_F32).T).to(_F64)  # [m, k]
    try:
        refit = torch.linalg.solve(a64 @ a64.T, rhs.T).T
    except RuntimeError:  # pragma: no cover - a singular Gram: the rows of a are independent by construction
        return best
    if not bool(torch.isfinite(refit).all()):  # pragma: no cover - same
        return best
    refit_b = refit.to(dtype)
    rel, energy = certificate(delta, refit_b, plain_a)
    return (refit_b, plain_a, rel, energy) if rel < best[2] else best


def spectrum_topk(
    delta: torch.Tensor,
    k: int,
    *,
    noise_floor: float | None = None,
    method: Method = "auto",
    seed: int = 0,
) -> Spectrum:
    """The leading singular values of ΔW above its noise floor, at most k of them.

    The same computation as ``low_rank(delta, rank=k, ...)`` without the factors and the
    certificate (one pass less). For :func:`allocate`: ``Candidate(name, spectrum.s ** 2,
    bytes_per_rank, total=spectrum.total)``.

    Args:
        delta: ΔW, [m, n].
        k: how many values at most, ≥ 1.
        noise_floor: as for :func:`low_rank`.
        method: as for :func:`low_rank`.
        seed: as for :func:`low_rank`.

    Returns:
        A :class:`Spectrum`.
    """
    d, total, base_floor = _prepare(delta, k, None, None, noise_floor, method)
    if total == 0.0:
        return Spectrum(torch.zeros(0, dtype=_F64), 0.0, base_floor, "exact")
    solved = _solve(d, total, base_floor, k, None, None, method, seed)
    return Spectrum(solved.s[: solved.k].clone(), total, solved.floor, solved.method)


# --- the budget allocator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One module offered to :func:`allocate`.

    Attributes:
        name: the module's name (unique).
        sv2: squared singular values σ₁² ≥ σ₂² ≥ …: rank j adds σⱼ² to the kept energy. A module
            is never given more ranks than listed.
        bytes_per_rank: bytes one more rank costs (``(m + n) · itemsize`` for a LoRA), ≥ 1.
        fixed_bytes: bytes paid once when the module gets rank ≥ 1 (e.g. a bias), ≥ 0.
        min_rank: ranks the module must keep (``truncate`` keeps every module at ≥ 1), ≥ 0.
        total: ``‖ΔW‖²_F``; None means ``Σ sv2`` (a complete spectrum).
    """

    name: str
    sv2: Sequence[float] | torch.Tensor
    bytes_per_rank: int
    fixed_bytes: int = 0
    min_rank: int = 0
    total: float | None = None


@dataclass(frozen=True)
class Allocation:
    """The ranks :func:`allocate` chose, and how good they are.

    Attributes:
        ranks: name -> rank, for every candidate (0 = leave the module out).
        bytes: the bytes they take (≤ the budget).
        kept: ``Σ`` over modules of the kept ``Σ_{i≤k} σᵢ²``.
        lost: ``Σ`` over modules of ``total − kept`` (the total squared error).
        lost_bound: no allocation within the budget loses less than this (the Lagrangian bound;
            equal to ``lost`` when the allocation is optimal for the budget).
        optimal_bytes: the allocation before the final fill, which is exactly optimal among all
            allocations of at most this many bytes (see :func:`allocate`).
        saturated: modules given every listed rank; if their spectra were cut short, list more.
    """

    ranks: dict[str, int]
    bytes: int
    kept: float
    lost: float
    lost_bound: float
    optimal_bytes: int
    saturated: tuple[str, ...] = field(default=())


def _hull(gains: list[float], costs: list[int], start: int) -> list[tuple[int, int, float]]:
    """Upper concave hull of the points ``(costs[j], gains[j])`` for j ≥ start, as segments
    ``(to_rank, Δcost, Δgain)`` with non-increasing slope Δgain/Δcost. Only segments that gain
    something are kept."""
    hull = [start]
    for j in range(start + 1, len(gains)):
        while len(hull) >= 2:
            i0, i1 = hull[-2], hull[-1]
            # drop i1 if it lies on or below the chord i0 -> j (cross product, exact for ints/floats)
            lhs = (gains[i1] - gains[i0]) * (costs[j] - costs[i0])
            rhs = (gains[j] - gains[i0]) * (costs[i1] - costs[i0])
            if lhs < rhs:
                hull.pop()
            else:
                break
        hull.append(j)
    segments = []
    for i0, i1 in zip(hull, hull[1:], strict=False):
        dg = gains[i1] - gains[i0]
        if dg <= 0:
            break
        segments.append((i1, costs[i1] - costs[i0], dg))
    return segments


def _curves(candidates: Sequence[Candidate]) -> tuple[list[list[float]], list[list[int]], list[float]]:
    """Each candidate's kept energy ``G(k)`` and cost ``c(k)`` for k = 0..r, and its total energy,
    after checking it (see :func:`allocate`'s ``Raises``)."""
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"duplicate module names: {dup}")
    gains_of: list[list[float]] = []
    costs_of: list[list[int]] = []
    totals: list[float] = []
    for c in candidates:
        sv2 = [float(v) for v in (c.sv2.tolist() if isinstance(c.sv2, torch.Tensor) else c.sv2)]
        if any(not (v >= 0.0 and math.isfinite(v)) for v in sv2):
            raise ValueError(f"module {c.name!r}: squared singular values must be finite and >= 0")
        if any(b > a for a, b in zip(sv2, sv2[1:], strict=False)):
            raise ValueError(f"module {c.name!r}: squared singular values must be in descending order")
        if c.bytes_per_rank < 1 or c.fixed_bytes < 0:
            raise ValueError(f"module {c.name!r}: bytes_per_rank must be >= 1 and fixed_bytes >= 0")
        if not 0 <= c.min_rank <= len(sv2):
            raise ValueError(f"module {c.name!r}: min_rank {c.min_rank} is not within 0..{len(sv2)}")
        gains = [0.0]
        for v in sv2:
            gains.append(gains[-1] + v)
        costs = [0] + [c.fixed_bytes + j * c.bytes_per_rank for j in range(1, len(sv2) + 1)]
        gains_of.append(gains)
        costs_of.append(costs)
        totals.append(gains[-1] if c.total is None else max(float(c.total), gains[-1]))
    return gains_of, costs_of, totals


def allocate(candidates: Sequence[Candidate], budget: int) -> Allocation:
    """Ranks per module minimising the total squared error ``Σ_modules Σ_{i>kₘ} σᵢ²`` within
    ``Σ bytes ≤ budget``: greedy by kept energy per byte.

    Each module's kept energy ``G(k) = Σ_{i≤k} σᵢ²`` against its cost ``c(k) = fixed + k·bytes``
    (c(0) = 0) is replaced by its upper concave hull (without fixed costs the points already are
    concave, since σᵢ² decreases, and every rank is its own segment). Segments of all modules are
    taken in order of decreasing ratio Δgain/Δbytes (ties: candidate order) while they fit.

    Guarantee (Lagrangian argument): when the first segment that does not fit is met, with ratio λ,
    every taken segment has ratio ≥ λ and every other ≤ λ, so each module's rank maximises
    ``G(k) − λ·c(k)`` over all its ranks, and for any allocation x:
    ``G(x) ≤ G(greedy) + λ·(bytes(x) − bytes(greedy))``. Hence that allocation is optimal among all
    that use at most its bytes (``optimal_bytes``), and no allocation within the budget loses less
    than ``lost − λ·(budget − optimal_bytes)`` (``lost_bound``). It is not always optimal for the
    budget itself: the last segment may not fit and leave bytes unused (a knapsack remainder).
    Those bytes are then filled greedily with later segments that fit, which only lowers the
    loss. With no fixed costs and one bytes-per-rank for all modules, every segment costs the
    same and the result is optimal for the budget.

    Args:
        candidates: the modules, see :class:`Candidate` (unique names).
        budget: bytes available, ≥ 0.

    Returns:
        An :class:`Allocation`.

    Raises:
        ValueError: the budget does not cover the ``min_rank`` ranks, or is too small for a single
            rank of any module that has something to keep; or a malformed candidate (duplicate
            name, increasing or negative sv2, min_rank above the listed ranks, bytes_per_rank < 1).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget}")
    gains_of, costs_of, totals = _curves(candidates)
    ranks = [c.min_rank for c in candidates]
    used = sum(costs_of[i][r] for i, r in enumerate(ranks))
    if used > budget:
        raise ValueError(f"budget of {budget} bytes is below the {used} bytes the minimum ranks take")

    segments = [_hull(gains_of[i], costs_of[i], ranks[i]) for i in range(len(candidates))]
    heap = [(-(seg[0][2] / seg[0][1]), i, 0) for i, seg in enumerate(segments) if seg]
    heapq.heapify(heap)
    first_miss: tuple[float, list[int], int] | None = None  # (λ, ranks, bytes) at the first miss
    while heap:
        neg_ratio, i, j = heapq.heappop(heap)
        to_rank, dcost, _ = segments[i][j]
        if used + dcost > budget:
            if first_miss is None:
                first_miss = (-neg_ratio, list(ranks), used)
            # fill: the largest part of the segment that fits (its points are real ranks, each
            # gaining something); the module is then blocked, its later segments come after this one
            costs, r0 = costs_of[i], ranks[i]
            fit = max(
                (r for r in range(r0 + 1, to_rank) if used + costs[r] - costs[r0] <= budget), default=r0
            )
            used += costs[fit] - costs[r0]
            ranks[i] = fit
            continue
        ranks[i] = to_rank
        used += dcost
        if j + 1 < len(segments[i]):
            nxt = segments[i][j + 1]
            heapq.heappush(heap, (-(nxt[2] / nxt[1]), i, j + 1))

    if all(r == c.min_rank == 0 for r, c in zip(ranks, candidates, strict=True)):
        firsts = [costs_of[i][1] for i, seg in enumerate(segments) if seg]
        if firsts:
            raise ValueError(
                f"budget of {budget} bytes is below the cheapest single rank ({min(firsts)} bytes)"
            )

    def lost_of(rs: list[int]) -> float:
        return sum(totals[i] - gains_of[i][r] for i, r in enumerate(rs))

    lost = lost_of(ranks)
    if first_miss is None:
        lost_bound, optimal_bytes = lost, used
    else:
        lam, rs, optimal_bytes = first_miss
        lost_bound = max(0.0, lost_of(rs) - lam * (budget - optimal_bytes))
    kept = sum(gains_of[i][r] for i, r in enumerate(ranks))
    saturated = tuple(
        c.name for i, c in enumerate(candidates) if ranks[i] == len(gains_of[i]) - 1 and ranks[i] > 0
    )
    return Allocation(
        ranks={c.name: ranks[i] for i, c in enumerate(candidates)},
        bytes=used,
        kept=kept,
        lost=lost,
        lost_bound=min(lost_bound, lost),
        optimal_bytes=optimal_bytes,
        saturated=saturated,
    )
