"""Merge arithmetic of LoRA on MoE experts (PEFT ``target_parameters``, ``lora.ParamWrapper``).

A LoRA on a fused experts parameter ``P`` of shape ``[E, d1, d2]`` is stored as two stacked factors,
``lora_A`` ``[r·E, in]`` and ``lora_B`` ``[out, r·E]``, stacked differently
(``ParamWrapper.get_delta_weight``, peft/tuners/lora/layer.py)::

    weight_A = lora_A.reshape(E, r, in)          # row e·r + k is (expert e, rank k): expert-major
    weight_B = lora_B.reshape(out, r, E)         # column k·E + e is (rank k, expert e): rank-major
    delta = einsum("o r e, e r i -> e o i", weight_B, weight_A) * scaling   # [E, out, in]
    delta = einsum("o r e, e r i -> e i o", weight_B, weight_A) * scaling   # is_transposed: [E, in, out]
    param.data += delta.to(param.dtype)

so expert e's factors are ``A_e = lora_A[e·r:(e+1)·r]`` and ``B_e = lora_B[:, e::E]``, and its update
is ``Δ_e = (B_e @ A_e) · s`` in float32, transposed when the experts class says ``is_transposed``
(``P`` is then ``[E, in, out]``). A 2-D parameter (a router ``gate.weight``, DBRX's stacked ``w1``)
has ``num_experts == 1`` and goes through ``lora.Linear.get_delta_weight``: ``(B @ A) · s``.

The merge rounds twice: ``Δ`` is rounded to the parameter's dtype first (``.to(param.dtype)``,
float16/bfloat16/float32 only), then added in that dtype; ``lora.Linear`` rounds once. Several
adapters are added one after the other, each rounded.

Bit for bit: PEFT computes every expert in one ``einsum``, which on CPU runs one ``bmm``; torch's
``bmm`` uses a plain loop instead of BLAS for small matrices (``r·out·in < 400``), so ``B_e @ A_e``
(always BLAS) differs from PEFT there. :func:`expert_delta` runs PEFT's own ``einsum`` on the one
expert's slice, which takes the same path as the full one for every size (the per-matrix sizes
decide the path, not the batch). Tensors in, tensors out: no files, no printing.
"""

from __future__ import annotations

import torch

#: the parameter dtypes PEFT rounds the update to before adding (``peft.utils.constants.ALLOWED_COMPUTE_DTYPES``)
ROUNDED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """PEFT's factors when merging: half and 8-bit floats upcast to float32 (``cast_adapter_dtype``), float64 kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rank_per_expert(lora_a: torch.Tensor, num_experts: int) -> int:
    """``r`` of ``lora_A`` ``[r·E, in]`` (``ValueError`` if E does not divide its rows)."""
    rows = int(lora_a.shape[0])
    if num_experts < 1 or rows % num_experts:
        raise ValueError(f"lora_A has {rows} rows, not a multiple of {num_experts} experts")
    return rows // num_experts


def expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each expert's ``(A_e, B_e)``: ``A_e = lora_A[e·r:(e+1)·r]`` ``[r, in]`` (expert-major) and
    ``B_e = lora_B[:, e::E]`` ``[out, r]`` (rank-major), PEFT's ``ParamWrapper.get_delta_weight`` layout.

    Views into the factors (float32 ones: half-precision factors are upcast once, whole, as PEFT does
    when it loads them, so the views have PEFT's strides).

    Args:
        lora_a: ``[r·E, in]``.
        lora_b: ``[out, r·E]``.
        num_experts: E (1 for a 2-D parameter).

    Raises:
        ValueError: the factors do not split into E experts of one rank (callers check first).
    """
    r = rank_per_expert(lora_a, num_experts)
    if lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"lora_B is {list(lora_b.shape)}, lora_A {list(lora_a.shape)}: not r·E = {r}·{num_experts}"
        )
    a, b = _fp32(lora_a), _fp32(lora_b)
    return [(a[e * r : (e + 1) * r], b[:, e::num_experts]) for e in range(num_experts)]


def expert_delta(
    a_e: torch.Tensor, b_e: torch.Tensor, scale: float, transposed: bool = False, *, single: bool = False
) -> torch.Tensor:
    """Expert e's update ``Δ_e = (B_e @ A_e) · s``, in the orientation of ``P[e]`` (float32; float64 factors
    give float64).

    Args:
        a_e, b_e: one expert's factors from :func:`expert_factors`.
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), r the rank per expert, a Python float.
        transposed: the parameter is ``[E, in, out]`` (``is_transposed``): the update is ``(B_e @ A_e)ᵀ``.
        single: the parameter has one "expert" (a 2-D parameter): PEFT's ``lora.Linear`` product ``(B @ A) · s``.

    Returns:
        ``[out, in]`` (``[in, out]`` when transposed); a view of PEFT's product when transposed.
    """
    a, b = _fp32(a_e), _fp32(b_e)
    if single:
        return (b @ a) * scale
    # the expert's slice of PEFT's einsum: [out, r, 1] and [1, r, in] with the strides of the full reshapes
    spec = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    # scaled in place: the same bits as PEFT's ``* scale``, without a second tensor of the update's size
    return torch.einsum(spec, b.unsqueeze(2), a.unsqueeze(0))[0].mul_(scale)


def merge_(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``w += Δ`` as PEFT's ``ParamWrapper.merge``: Δ rounded to w's dtype first (float16/bfloat16/float32),
    then added in w's dtype — two roundings. ``w`` may be a view (a row block of a per-expert tensor, one
    expert of a fused one); it is updated in place and returned."""
    if w.dtype in ROUNDED_DTYPES:
        delta = delta.to(w.dtype)
    return w.add_(delta)


def unmerge_(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`merge_` up to rounding (``ParamWrapper.unmerge``: ``w -= Δ.to(w.dtype)``); a
    receipt (ops/residual.py) restores the bits rounding lost."""
    if w.dtype in ROUNDED_DTYPES:
        delta = delta.to(w.dtype)
    return w.sub_(delta)
