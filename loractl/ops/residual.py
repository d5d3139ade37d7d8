"""Receipts' arithmetic: what rounding lost, so an unmerge can restore the base bit for bit.

Merging rounds ``W + ΔW`` to W's dtype, so subtracting ΔW again gives back W only up to rounding.
:func:`encode` compares the subtraction's result with the original bit for bit and keeps, for the
positions that differ, the gaps between them and the integer difference of the bits (a unit or two
in the last place), about two bytes a position (or the whole original when that is smaller);
:func:`decode` puts them back. :func:`encode_block` and :func:`join` build them block by block, for
a merge that works on row blocks and never holds a whole tensor's differences; :func:`encode` is
the whole tensor as one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened and viewed as integers of the same width (so NaN payloads and -0.0 compare exactly)."""
    return t.reshape(-1).view(_BITS[t.element_size()])


def encode(original: torch.Tensor, reconstructed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The corrections that turn ``reconstructed`` into ``original``, in about two bytes a position
    where they differ:

    - ``gap8`` (uint8): the gap to the previous position (255: the gap is in ``gapbig``, int64);
    - ``d8`` (int8): original − reconstructed as integers of the dtype's width, the difference of a
      unit or two in the last place that rounding leaves (-128: the value is in ``valbig``).

    ``{}`` when nothing differs; ``{"full": original}`` when that is smaller (or when the two do not
    match in dtype and shape). The whole tensor taken as one block of :func:`encode_block`.
    """
    if original.dtype != reconstructed.dtype or original.shape != reconstructed.shape:
        return {"full": original.contiguous()}
    chunk = encode_block(bits(original).numpy(), bits(reconstructed).numpy(), 0)
    parts = join([chunk] if chunk is not None else [], original.numel(), original.dtype)
    return {"full": original.contiguous()} if parts is None else parts


@dataclass
class Chunk:
    """The corrections of one block of positions, in :func:`encode`'s layout, except that the first
    position's gap (which depends on the block before) is left to :func:`join`."""

    first: int  # flat position of the first difference
    last: int  # and of the last
    gap8: np.ndarray  # uint8, for the positions after the first
    gapbig: np.ndarray  # int64
    d8: np.ndarray  # int8, for every position
    valbig: np.ndarray  # the originals' bits (signed integers of the dtype's width) where d8 is -128


def encode_block(original: np.ndarray, reconstructed: np.ndarray, offset: int) -> Chunk | None:
    """The corrections for one block of a tensor, from the bits (signed integers of the dtype's width,
    flat) of the original and of the reconstruction there; ``offset`` is the block's first flat
    position. None when they agree. Blocks are encoded as they come, so that only about two bytes a
    difference are kept, never the positions or values themselves (see :func:`join`)."""
    flat = np.flatnonzero(reconstructed != original)
    if not flat.size:
        return None
    gaps = np.diff(flat) - 1
    o = original[flat]
    d = o.astype(np.int64) - reconstructed[flat].astype(np.int64)
    esc = (d < -127) | (d > 127)
    return Chunk(
        first=offset + int(flat[0]),
        last=offset + int(flat[-1]),
        gap8=np.minimum(gaps, 255).astype(np.uint8),
        gapbig=gaps[gaps >= 255],
        d8=np.where(esc, -128, d).astype(np.int8),
        valbig=o[esc],
    )


def join(chunks: list[Chunk], numel: int, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The corrections of :func:`encode` from the chunks of a tensor's blocks, in order ({} when
    nothing differs, None when the whole original would be smaller: the caller stores it as ``full``)."""
    if not chunks:
        return {}
    gap8: list[np.ndarray] = []
    gapbig: list[np.ndarray] = []
    last = -1
    for c in chunks:
        g = c.first - last - 1
        gap8 += [np.array([min(g, 255)], np.uint8), c.gap8]
        gapbig += [np.array([g] if g >= 255 else [], np.int64), c.gapbig]
        last = c.last
    n = sum(c.d8.size for c in chunks)
    big = np.concatenate(gapbig)
    valbig = np.concatenate([c.valbig for c in chunks])
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if 2 * n + 8 * big.size + itemsize * valbig.size >= numel * itemsize:
        return None
    return {
        "gap8": torch.from_numpy(np.concatenate(gap8)),
        "gapbig": torch.from_numpy(big),
        "d8": torch.from_numpy(np.concatenate([c.d8 for c in chunks])),
        "valbig": torch.from_numpy(valbig).view(dtype),
    }


def decode(reconstructed: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply :func:`encode`'s corrections to ``reconstructed`` (in place where possible)."""
    if "full" in parts:
        return parts["full"]
    if "gap8" not in parts:
        return reconstructed
    gap8 = parts["gap8"]
    gaps = gap8.long()
    gaps[gap8 == 255] = parts["gapbig"].long()
    positions = torch.cumsum(gaps + 1, 0) - 1
    flat = bits(reconstructed)
    d8 = parts["d8"]
    fixed = flat[positions].long() + d8.long()
    esc = d8 == -128
    if bool(esc.any()):
        fixed[esc] = bits(parts["valbig"]).long()
    flat[positions] = fixed.to(flat.dtype)
    return reconstructed
