"""Weighted combination of LoRA modules that update the same base weight.

A module is ``(B, A, s, w)``: up factor B [m, r], down factor A [r, n], scale s and combination
weight w; its weighted update is ``w · s · B · A``. A module that one adapter lacks is passed
as a zero-rank placeholder (B [m, 0], A [0, n]), which every function accepts: it adds nothing
and, in :func:`combine_peft`, is skipped exactly as PEFT skips an adapter without the module.

:func:`combine_cat` and :func:`combine_svd` are exact (resp. optimally truncated) and work in
float64 from the factors. :func:`combine_peft` reproduces PEFT's ``add_weighted_adapter``
arithmetic operation for operation, in PEFT's dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch

from ..adapter import LoraModule, stack_experts
from .factored import balanced_factors, truncate_factors

__all__ = [
    "Module",
    "PEFT_COMBINATION_TYPES",
    "combine_cat",
    "combine_svd",
    "combine_peft",
    "combine_modules",
]

#: ``(B [m, r], A [r, n], s, w)``: factors, scale and combination weight of one module.
Module = tuple[torch.Tensor, torch.Tensor, float, float]

#: loractl's method name -> the ``combination_type`` of PEFT's ``add_weighted_adapter`` it matches.
PEFT_COMBINATION_TYPES: dict[str, str] = {
    "linear": "linear",
    "cat": "cat",
    "svd": "svd",
    "ties": "ties_svd",
    "dare-linear": "dare_linear_svd",
    "dare-ties": "dare_ties_svd",
    "magnitude-prune": "magnitude_prune_svd",
}

#: ``combine --method`` choices
COMBINE_METHODS = ("cat", "svd", "linear", "ties", "dare-linear", "dare-ties", "magnitude-prune")
_NEEDS_DENSITY = ("ties", "dare-linear", "dare-ties", "magnitude-prune")
_Prune = Literal["magnitude", "random"]
_F64 = torch.float64


def _check_modules(modules: Sequence[Module]) -> tuple[int, int]:
    """Validate a module list and return the shared update shape (m, n)."""
    if not modules:
        raise ValueError("no modules to combine")
    m, n = modules[0][0].shape[0], modules[0][1].shape[1]
    for index, (B, A, _, _) in enumerate(modules):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"module {index}: bad factor shapes B {tuple(B.shape)}, A {tuple(A.shape)}")
        if (B.shape[0], A.shape[1]) != (m, n):
            raise ValueError(
                f"module {index} updates a [{B.shape[0]}, {A.shape[1]}] weight, expected [{m}, {n}]"
            )
    return int(m), int(n)


def combine_cat(modules: Sequence[Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact weighted sum of LoRA modules by concatenating their factors.

    Formula: ``B_cat = [w₁s₁B₁ | w₂s₂B₂ | …]`` (columns), ``A_cat = [A₁; A₂; …]`` (rows), so
    ``B_cat · A_cat = Σᵢ wᵢ sᵢ Bᵢ Aᵢ`` with scale 1 and rank Σᵢ rᵢ.

    Args:
        modules: ``(B, A, s, w)`` per module, all updating the same [m, n] weight.

    Returns:
        ``(B_cat [m, Σr], A_cat [Σr, n])`` in float64; the combined update has scale 1.
    """
    _check_modules(modules)
    B_cat = torch.cat([B.to(_F64) * (float(w) * float(s)) for B, _, s, w in modules], dim=1)
    A_cat = torch.cat([A.to(_F64) for _, A, _, _ in modules], dim=0)
    return B_cat, A_cat


def combine_svd(modules: Sequence[Module], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal rank-``rank`` approximation of the weighted sum ``Σᵢ wᵢ sᵢ Bᵢ Aᵢ``.

    Formula: the sum is ``B_cat · A_cat`` (:func:`combine_cat`); its truncated SVD
    ``U_k diag(S_k) Vh_k`` (Eckart–Young) is split evenly, ``B = U_k √S_k``, ``A = √S_k Vh_k``.
    The SVD is taken from the factors (:func:`~loractl.ops.factored.truncate_factors`, QR of
    each) unless the dense m×n sum holds fewer numbers than the factors (``m·n ≤ Σr·(m + n)``).

    Args:
        modules: ``(B, A, s, w)`` per module, all updating the same [m, n] weight.
        rank: the target rank, ≥ 1.

    Returns:
        ``(B [m, k], A [k, n])`` in float64 with scale 1. k = min(rank, m, n); when
        ``rank ≥ Σr`` nothing needs truncating and the exact concatenation (k = Σr) is returned.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    B_cat, A_cat = combine_cat(modules)
    (m, total), n = B_cat.shape, A_cat.shape[1]
    if rank >= total or m * n > total * (m + n):
        return truncate_factors(B_cat, A_cat, 1.0, rank)
    dense = B_cat @ A_cat
    return balanced_factors(*torch.linalg.svd(dense, full_matrices=False), rank)


# --- PEFT's merge_utils, operation for operation -------------------------------------------------


def _prune(tensor: torch.Tensor, density: float, method: _Prune) -> torch.Tensor:
    """PEFT's ``prune``: keep the top ``int(density · numel)`` magnitudes, or a random fraction.

    Formula: magnitude: ``t ⊙ 1[|t| among the top-k]`` (``torch.topk`` ties as PEFT);
    random (DARE, always rescaled): ``t ⊙ Bernoulli(density) / density``. Density ≥ 1 keeps t.
    """
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        k = int(density * tensor.numel())
        top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
        mask[top_k[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return tensor * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: Literal["total", "frequency"]) -> torch.Tensor:
    """PEFT's ``calculate_majority_sign_mask``: ``sign(tᵢ) == sign(Σᵢ tᵢ)`` (or of Σ sign(tᵢ))."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority_sign = torch.where(magnitude >= 0, 1, -1)
    return sign == majority_sign


def _merge(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    prune: _Prune | None,
    elect_sign: bool,
    density: float | None,
    majority_sign: Literal["total", "frequency"],
) -> torch.Tensor:
    """PEFT's task_arithmetic / magnitude_prune / ties / dare_linear / dare_ties.

    Formula: prune each tᵢ (in list order, which fixes the RNG draws), stack, then
    ``Σᵢ wᵢ tᵢ`` or, with sign election (TIES), ``Σᵢ wᵢ tᵢ mᵢ / max(1, Σᵢ mᵢ)`` with
    ``mᵢ = [sign(tᵢ) = majority sign]``.
    """
    if prune is not None:
        assert density is not None
        tensors = [_prune(t, density, prune) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    mask = _majority_sign_mask(stacked, majority_sign) if elect_sign else None
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if mask is None:
        return weighted.sum(dim=0)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


#: method -> (how its deltas are pruned, whether TIES sign election is used).
_MERGE_RULES: dict[str, tuple[_Prune | None, bool]] = {
    "svd": (None, False),
    "ties": ("magnitude", True),
    "dare-linear": ("random", False),
    "dare-ties": ("random", True),
    "magnitude-prune": ("magnitude", False),
}


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """PEFT's ``task_arithmetic``: ``Σᵢ wᵢ tᵢ`` over the stacked tensors."""
    return _merge(tensors, weights, prune=None, elect_sign=False, density=None, majority_sign="total")


def _peft_delta(B: torch.Tensor, A: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's ``Linear.get_delta_weight``: ``(B @ A) * s``, via float32 for CPU (b)float16."""
    cast = B.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
    out = (B.float() @ A.float() if cast else B @ A) * s
    return out.to(B.dtype) if cast else out


def _peft_cat(present: list[Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``cat``: ``A' = [A₁·w₁·s₁; …]``, ``B' = [B₁ | …]`` (weights on A, in that order)."""
    loras_A = [A * w * s for _, A, s, w in present]
    return torch.cat([B for B, _, _, _ in present], dim=1), torch.cat(loras_A, dim=0)


def _peft_linear(present: list[Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factor-wise ``linear``: ``A' = Σ sgn(wᵢsᵢ)√|wᵢsᵢ| Aᵢ``, ``B' = Σ √|wᵢsᵢ| Bᵢ``."""
    ranks = {A.shape[0] for _, A, _, _ in present}
    if len(ranks) != 1:
        raise ValueError(
            f"method 'linear' needs all modules to have the same rank, got ranks {sorted(ranks)}; "
            "use method 'cat' instead (exact for any ranks), or an SVD-based method"
        )
    weights_A, weights_B = [], []
    for _, _, s, w in present:
        weight_with_scaling = w * s
        sign = 1 if weight_with_scaling >= 0 else -1
        weights_A.append(math.sqrt(abs(weight_with_scaling)) * sign)
        weights_B.append(math.sqrt(abs(weight_with_scaling)))
    device, dtype = present[0][1].device, present[0][1].dtype
    A_new = _weighted_sum([A for _, A, _, _ in present], torch.tensor(weights_A).to(device))
    B_new = _weighted_sum([B for B, _, _, _ in present], torch.tensor(weights_B).to(device))
    return B_new.to(dtype), A_new.to(dtype)


def _peft_svd(
    present: list[Module],
    method: str,
    new_rank: int,
    density: float | None,
    majority_sign: Literal["total", "frequency"],
    clamp: float | None,
    full_matrices: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_svd_generalized_task_arithmetic_weighted_adapter`` for one 2-D module.

    Formula: ``D = merge(sᵢ BᵢAᵢ, wᵢ)``; ``D = U diag(S) Vh`` (``torch.linalg.svd``, dense);
    ``B' = U_k diag(S_k)``, ``A' = Vh_k`` (unbalanced, as PEFT), then optionally both clamped to
    ``[−q, q]`` with ``q = torch.quantile(all entries of B' and A', clamp)`` (signed values).
    """
    deltas = [_peft_delta(B, A, s) for B, A, s, _ in present]
    weights = torch.tensor([w for _, _, _, w in present]).to(deltas[0].device)
    prune, elect_sign = _MERGE_RULES[method]
    delta = _merge(
        deltas, weights, prune=prune, elect_sign=elect_sign, density=density, majority_sign=majority_sign
    )
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    U = U[:, :new_rank]
    S = S[:new_rank]
    U = U @ torch.diag(S)
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi_val = torch.quantile(dist, clamp)
        low_val = -hi_val
        U = U.clamp(low_val, hi_val)
        Vh = Vh.clamp(low_val, hi_val)
    return U, Vh


def combine_peft(
    modules: Sequence[Module],
    method: str,
    *,
    density: float | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
    rank: int | None = None,
    generator_seed: int | None = None,
    clamp: float | None = None,
    full_matrices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module of PEFT's ``LoraModel.add_weighted_adapter``, reproduced exactly.

    Methods and the PEFT ``combination_type`` each reproduces (:data:`PEFT_COMBINATION_TYPES`):

    * ``linear`` (``linear``): factor-wise, ``A' = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ``,
      ``B' = Σ √|wᵢsᵢ|·Bᵢ``; all ranks must be equal. Not the weighted sum of the updates.
    * ``cat`` (``cat``): ``A' = [w₁s₁A₁; …]``, ``B' = [B₁ | …]``; exact.
    * ``svd``, ``ties``, ``dare-linear``, ``dare-ties``, ``magnitude-prune`` (``svd``,
      ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the dense
      deltas ``Dᵢ = sᵢ·Bᵢ·Aᵢ`` are merged element-wise with weights wᵢ (task arithmetic;
      TIES = magnitude-prune to ``density`` + sign election + disjoint mean; DARE = Bernoulli(density)
      drop + rescale by 1/density; magnitude-prune = top-``density`` magnitudes), then
      ``D = U·diag(S)·Vh`` by dense ``torch.linalg.svd`` and ``B' = U_k·diag(S_k)``, ``A' = Vh_k``.

    As in PEFT, a single module (one adapter) always uses ``linear``, the arithmetic is done in
    the factors' dtype (float32 usually; CPU (b)float16 deltas are computed via float32 and cast
    back, and the weights tensor is float32), and the result is not cast to float64. The new
    adapter's scale is 1 (PEFT sets ``r = lora_alpha = new rank``; but when the first adapter
    uses rsLoRA, PEFT's new adapter inherits it and PEFT scales by √(new rank)). The update must be in
    [out, in] orientation (the caller transposes embedding / ``fan_in_fan_out`` modules first,
    as PEFT does before its SVD).

    Randomness (DARE's ``torch.bernoulli``) comes from torch's global CPU RNG, as in PEFT. With
    ``generator_seed`` set, ``torch.manual_seed(generator_seed)`` is called right before this
    module's first Bernoulli draw (inside ``torch.random.fork_rng``, so the caller's RNG state is
    left untouched); PEFT gives the same result when the global seed is set to the same value
    immediately before its ``dare_linear`` / ``dare_ties`` call for this module. With ``None`` the
    global RNG is used as it stands (and advanced).

    Args:
        modules: ``(B, A, s, w)`` per adapter, in adapter order; a zero-rank placeholder marks an
            adapter that lacks this module (PEFT skips it).
        method: one of :data:`PEFT_COMBINATION_TYPES`.
        density: fraction of entries kept, in [0, 1]; required by ties, dare-*, magnitude-prune.
        majority_sign: PEFT's ``majority_sign_method``, ``"total"`` or ``"frequency"``.
        rank: PEFT's ``svd_rank`` for the SVD methods; ``None`` (or 0) means the largest module
            rank here. PEFT uses the largest configured ``r`` of the adapters, which differs when
            an adapter lacks this module or has a ``rank_pattern``: pass that value then.
        generator_seed: seed for DARE's draws, see above.
        clamp: PEFT's ``svd_clamp`` quantile, or ``None`` for no clamping.
        full_matrices: PEFT's ``svd_full_matrices`` (its default True; False is cheaper and equal
            to round-off, but not guaranteed bit-identical).

    Returns:
        ``(B', A')``: what PEFT stores as the new adapter's ``lora_B`` and ``lora_A`` for this
        module (for ``cat``, before PEFT's zero padding to the sum of the configured ranks).
    """
    if method not in PEFT_COMBINATION_TYPES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(PEFT_COMBINATION_TYPES)}")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    _check_modules(modules)
    if len(modules) == 1:
        method = "linear"  # PEFT: "if there is only one adapter, we can only use linear merging"
    if method in _NEEDS_DENSITY and density is None:
        raise ValueError(f"method {method!r} needs a density in [0, 1]")
    present = [module for module in modules if module[1].shape[0] > 0]
    if not present:
        raise ValueError("every module is a zero-rank placeholder: nothing to combine")
    if method == "linear":
        return _peft_linear(present)
    if method == "cat":
        return _peft_cat(present)
    new_rank = rank or max(A.shape[0] for _, A, _, _ in modules)
    if new_rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    # no more components than the update has (PEFT would slice U and Vh to different ranks and fail)
    new_rank = min(new_rank, present[0][0].shape[0], present[0][1].shape[1])
    if generator_seed is None or not method.startswith("dare"):
        return _peft_svd(present, method, new_rank, density, majority_sign, clamp, full_matrices)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return _peft_svd(present, method, new_rank, density, majority_sign, clamp, full_matrices)


def combine_modules(
    modules: Sequence[LoraModule | None],
    weights: Sequence[float],
    method: str,
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
    seed: int | None = None,
) -> LoraModule:
    """One module of ``combine``: the module of each adapter (None where an adapter lacks it) combined
    with ``weights`` by ``method`` (``cat`` and ``svd``: :func:`combine_cat`, :func:`combine_svd`; the
    others: :func:`combine_peft`). The result has scale 1 (alpha = its rank), no bias, no magnitude.

    Parameter LoRAs (MoE experts) are combined expert by expert (expert e of each adapter with expert e of
    the others; PEFT's ``add_weighted_adapter`` refuses them, loractl applies its arithmetic per expert) and
    restacked in PEFT's layout.

    Raises:
        ValueError: ranks that ``method`` cannot combine, or a rank or density it needs.
    """
    ref = next(m for m in modules if m is not None)
    if ref.experts > 1:
        kw = dict(rank=rank, density=density, majority_sign=majority_sign, seed=seed)
        experts = [
            combine_modules([m.expert(e) if m is not None else None for m in modules], weights, method, **kw)  # type: ignore[arg-type]
            for e in range(ref.experts)
        ]
        return stack_experts(ref, experts)
    b_ref, a_ref = ref.matrices()
    parts: list[Module] = []
    for m, w in zip(modules, weights):
        if m is None:
            parts.append((b_ref.new_zeros(b_ref.shape[0], 0), a_ref.new_zeros(0, a_ref.shape[1]), 1.0, w))
        else:
            b2, a2 = m.matrices()
            parts.append((b2, a2, m.scale, w))
    present = [p for p in parts if p[1].shape[0] > 0]
    if method == "cat":
        nb, na = combine_cat(present)
    elif method == "svd":
        if rank is None:
            raise ValueError("method svd needs a rank")
        nb, na = combine_svd(present, rank)
    else:
        nb, na = combine_peft(parts, method, density=density, majority_sign=majority_sign, rank=rank, generator_seed=seed)
    return replace(ref.with_factors(nb, na, alpha=float(nb.shape[1])), bias=None, magnitude=None)
