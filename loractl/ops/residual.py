"""Receipts' arithmetic: what rounding lost, so an unmerge can restore the base bit for bit.

Merging rounds ``W + ΔW`` to W's dtype, so subtracting ΔW again gives back W only up to rounding.
:func:`encode` compares the subtraction's result with the original bit for bit and keeps the
positions that differ with their original values (or the whole original when that is smaller);
:func:`decode` puts them back.
"""

from __future__ import annotations

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened and viewed as integers of the same width (so NaN payloads and -0.0 compare exactly)."""
    return t.reshape(-1).view(_BITS[t.element_size()])


def encode(original: torch.Tensor, reconstructed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The corrections that turn ``reconstructed`` into ``original``.

    Returns:
        ``{}`` when they are equal bit for bit; ``{"idx", "val"}`` (flat positions, original values)
        when few differ; ``{"full"}`` (the original) when that is smaller or the dtypes differ.
    """
    if original.dtype != reconstructed.dtype or original.shape != reconstructed.shape:
        return {"full": original.contiguous()}
    diff = (bits(original) != bits(reconstructed)).nonzero().reshape(-1)
    n = diff.numel()
    if n == 0:
        return {}
    idx_dtype = torch.int32 if original.numel() < 2**31 else torch.int64
    sparse = n * (idx_dtype.itemsize + original.element_size())
    if sparse >= original.numel() * original.element_size():
        return {"full": original.contiguous()}
    return {"idx": diff.to(idx_dtype), "val": original.reshape(-1)[diff].contiguous()}


def from_positions(original: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`encode`'s corrections when the differing flat positions are already known."""
    n = positions.numel()
    if n == 0:
        return {}
    idx_dtype = torch.int32 if original.numel() < 2**31 else torch.int64
    if n * (idx_dtype.itemsize + original.element_size()) >= original.numel() * original.element_size():
        return {"full": original.contiguous()}
    return {"idx": positions.to(idx_dtype), "val": original.reshape(-1)[positions].contiguous()}


def decode(reconstructed: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply :func:`encode`'s corrections to ``reconstructed`` (in place where possible)."""
    if "full" in parts:
        return parts["full"]
    if "idx" in parts:
        flat = bits(reconstructed)
        flat[parts["idx"].long()] = bits(parts["val"])
    return reconstructed
