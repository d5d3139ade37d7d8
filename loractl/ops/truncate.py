"""Lowering one module's rank: optimally (SVD of its update, from the factors) or by keeping its first
components (DyLoRA's nested ranks). Modules in, modules out; :mod:`loractl.ops.factored` does the
linear algebra.

A parameter LoRA (MoE experts, ``LoraModule.experts``) is truncated expert by expert: each expert's update
``s·B_e·A_e`` gets its own optimal (or nested) truncation, at one rank k for all experts (PEFT stores one
rank per parameter: a dynamic rule's k is the largest any expert needs), restacked in PEFT's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import LoraModule, stack_experts
from .factored import balanced_factors, choose_rank, energy_kept, factored_svd

#: ``truncate --dylora-convention`` choices: how a nested truncation sets alpha
DYLORA_CONVENTIONS = ("original", "kohya", "lycoris")


@dataclass
class Truncated:
    """One module after truncation.

    Attributes:
        module: the truncated module (the input itself when it is kept whole).
        rank: its rank now.
        energy_kept: ‖ΔW_k‖²_F / ‖ΔW‖²_F.
    """

    module: LoraModule
    rank: int
    energy_kept: float


def svd_truncate(m: LoraModule, rank: int | None, **rule: float) -> Truncated:
    """The best rank-k approximation of ``m``'s update (Eckart–Young), computed from the factors (QR of
    B and Aᵀ, SVD of the r×r core): k is ``rank``, or the smallest rank meeting the dynamic ``rule``
    (one of ``energy``, ``sv_ratio``, ``sv_cumulative``, ``sv_fro``; see
    :func:`~loractl.ops.factored.choose_rank`) with ``rank`` as a cap. A module already at or below k
    is kept as it is; a truncated one gets alpha = k (scale 1, the singular values split as √σ
    between B and A). A parameter LoRA: :func:`_svd_truncate_experts`."""
    if m.experts > 1:
        return _svd_truncate_experts(m, rank, rule)
    (svd,) = _svds(m)  # once per module: rank rule and factors
    return _single_at(m, svd, choose_rank(svd[1], rank=rank, **rule))


def _svds(m: LoraModule) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The SVD (U, S, Vh) of the update of ``m`` from its factors, or of each of its experts' updates."""
    return [factored_svd(*e.matrices(), e.scale) for e in (m.split_experts() if m.experts > 1 else [m])]


def _single_at(m: LoraModule, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int) -> Truncated:
    """``m`` truncated to rank k from its SVD (kept as it is at or below k; else alpha = k, scale 1)."""
    u, s_vals, vh = svd
    if k >= m.rank:
        return Truncated(m, m.rank, energy_kept(s_vals, m.rank))
    nb, na = balanced_factors(u, s_vals, vh, k)
    return Truncated(m.with_factors(nb, na, alpha=float(k)), k, energy_kept(s_vals, k))


def nested_truncate(m: LoraModule, rank: int, alpha_factor: float = 1.0) -> Truncated:
    """The first ``rank`` components of a nested-rank (DyLoRA) module, exactly: A[:R], B[:, :R].

    Args:
        m: the module.
        rank: R (a module of lower rank is kept whole).
        alpha_factor: multiplies alpha when the convention rescales it (LyCORIS: the block size);
            1 keeps alpha (the original DyLoRA's s = alpha/R, and kohya's extractor).
    """
    k = min(rank, m.rank)
    if k >= m.rank:
        return Truncated(m, m.rank, 1.0)
    if m.experts > 1:
        parts = [nested_truncate(e, rank, alpha_factor) for e in m.split_experts()]
        kept = sum(t.energy_kept * _fro2(e) for t, e in zip(parts, m.split_experts()))
        total = sum(_fro2(e) for e in m.split_experts())
        return Truncated(stack_experts(m, [t.module for t in parts]), k, kept / total if total > 0 else 1.0)
    b2, a2 = m.matrices()
    module = m.with_factors(b2[:, :k], a2[:k], m.alpha * alpha_factor, rslora=m.rslora)
    return Truncated(module, k, energy_of_prefix(m, k))


def energy_of_prefix(m: LoraModule, k: int) -> float:
    """‖s·B[:, :k]·A[:k]‖²_F / ‖s·B·A‖²_F, from the factors (traces of small Gram matrices, in float64)."""
    if k >= m.rank:
        return 1.0
    b2, a2 = m.matrices()
    b2, a2 = b2.double(), a2.double()

    def fro2(b: torch.Tensor, a: torch.Tensor) -> float:
        return float(torch.trace((b.T @ b) @ (a @ a.T)))

    total = fro2(b2, a2)
    return fro2(b2[:, :k], a2[:k]) / total if total > 0 else 1.0


def _fro2(m: LoraModule) -> float:
    """‖s·B·A‖²_F of a module LoRA, from the factors (float64)."""
    b2, a2 = m.matrices()
    b2, a2 = b2.double(), a2.double()
    return float(torch.trace((b2.T @ b2) @ (a2 @ a2.T))) * m.scale**2


def _svd_truncate_experts(m: LoraModule, rank: int | None, rule: dict[str, float]) -> Truncated:
    """:func:`svd_truncate` of each expert of a parameter LoRA at one rank k: the largest rank the rule gives any
    expert (``rank`` as a cap), so that every expert meets it; each expert's best rank-k approximation; the
    energy kept is that of all experts together."""
    svds = _svds(m)
    return _experts_at(m, svds, max(choose_rank(sv, rank=rank, **rule) for _, sv, _ in svds))


def _experts_at(m: LoraModule, svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int) -> Truncated:
    """A parameter LoRA with every expert truncated to rank k from its SVD; the energy kept is all
    experts' together."""
    total = sum(float(sv.double().square().sum()) for _, sv, _ in svds)

    def kept(j: int) -> float:
        return sum(float(sv.double()[:j].square().sum()) for _, sv, _ in svds) / total if total > 0 else 1.0

    if k >= m.rank:
        return Truncated(m, m.rank, kept(m.rank))
    experts = [
        e.with_factors(*balanced_factors(u, sv, vh, k), alpha=float(k))
        for e, (u, sv, vh) in zip(m.split_experts(), svds)
    ]
    return Truncated(stack_experts(m, experts), k, kept(k))


def _rank_gains(
    m: LoraModule, svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, int]:
    """What each rank of ``m`` is worth to :func:`budget_truncate`, from its SVDs (:func:`_svds`): the
    squared singular values gained (float64, non-increasing) and the bytes one rank of its factors
    takes. A parameter LoRA keeps one rank for all its experts: rank i gains Σₑ σₑ,ᵢ² and costs every
    expert's factor rows."""
    parts = m.split_experts() if m.experts > 1 else [m]
    gains = None
    per_rank = 0
    for e, (_, sv, _) in zip(parts, svds):
        b2, a2 = e.matrices()
        sq = sv.double().square()
        gains = sq if gains is None else gains + sq
        per_rank += (b2.shape[0] + a2.shape[1]) * max(e.up.element_size(), e.down.element_size())
    return gains, per_rank


def budget_truncate(modules: dict[str, LoraModule], budget: int) -> tuple[dict[str, Truncated], int]:
    """Ranks for every module within ``budget`` bytes of factors, minimising the total squared error
    ``Σ_modules Σ_{i>kₘ} σᵢ²`` of the updates (:func:`loractl.ops.lowrank.allocate`, greedy by
    squared singular value per byte, the same allocator as ``extract --budget``), each module kept
    at rank ≥ 1; then each truncated optimally at its rank (:func:`svd_truncate`).

    A rank of module m costs ``(out + in) · itemsize`` bytes of its factors' dtype.

    Returns:
        The truncated modules by name, and the bytes their factors take.

    Raises:
        ValueError: a budget below one rank of every module.
    """
    from .lowrank import Candidate, allocate

    svds = {name: _svds(m) for name, m in modules.items()}  # once per module: gains and factors
    cands = [Candidate(name, *_rank_gains(m, svds[name]), min_rank=1) for name, m in modules.items()]
    alloc = allocate(cands, budget)
    out = {}
    for name, m in modules.items():
        k = alloc.ranks[name]
        out[name] = _experts_at(m, svds[name], k) if m.experts > 1 else _single_at(m, svds[name][0], k)
    return out, alloc.bytes
