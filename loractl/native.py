"""The optional native kernels (``loractl/_kernels.c``), through ctypes.

``pip install`` compiles them when a C compiler is there (setup.py: an optional extension; without a
compiler the install still succeeds). Everything they do, the torch and numpy code beside their callers
does too, bit for bit (tests/ops/test_native.py compares the two); they only do it in one pass over
memory instead of five or six: a merge that writes a receipt spent most of its time in those passes.
``LORACTL_NATIVE=0`` in the environment turns them off (the benchmarks time both ways).

- :func:`merge_block`: ``out = round(w + d)`` for a bfloat16 or float32 block, NaN/Inf refused, and with
  ``diffs`` the positions where ``round(out - d)`` misses ``w`` (what a receipt stores);
- :func:`sum64`: the sums of :func:`loractl.io.receipt.tensor_sum64`.

Calls through ctypes let go of the GIL, so the merge's two compute threads run them side by side.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

#: the kernels' source, where it lies beside the package (an editable install, a source tree)
SOURCE = Path(__file__).with_name("_kernels.c")
_lib: ctypes.CDLL | None = None
_loaded = False
_lock = threading.Lock()
_local = threading.local()


def stale() -> bool:
    """Is there a compiled library that is not used because it was built from another ``_kernels.c``
    (a working tree changed since ``pip install -e .``: run it again)?"""
    return library_path() is not None and _load() is None


def library_path() -> Path | None:
    """The compiled kernels beside this module, if the install built them."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_kernels{suffix}"
        if p.is_file():
            return p
    return None


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        path = library_path()
        if path is None:
            return None
        try:
            lib = ctypes.CDLL(str(path))
            lib.loractl_source_sha256.restype = ctypes.c_char_p
            built_from = lib.loractl_source_sha256().decode()
        except (OSError, AttributeError):
            return None
        if SOURCE.is_file() and hashlib.sha256(SOURCE.read_bytes()).hexdigest() != built_from:
            return None  # built from another version of the source: its functions may not be these
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib.loractl_merge_bf16.argtypes = [p, p, p, i64, i32, i32, p, p, p, p, p]
        lib.loractl_merge_bf16.restype = i64
        lib.loractl_merge_f32.argtypes = [p, p, p, i64, i32, p, p, p, p, p]
        lib.loractl_merge_f32.restype = i64
        lib.loractl_sum64.argtypes = [p, i64, ctypes.c_uint64, p]
        lib.loractl_sum64.restype = None
        _lib = lib
        return lib


def enabled() -> bool:
    """Are the kernels built, loadable, and not turned off (``LORACTL_NATIVE=0``)?"""
    return os.environ.get("LORACTL_NATIVE", "1") != "0" and _load() is not None


def merges(dtype: torch.dtype) -> bool:
    """Does :func:`merge_block` take a base of this dtype (and are the kernels on)?"""
    import torch

    return dtype in (torch.bfloat16, torch.float32) and enabled()


def _scratch(n: int, itemsize: int) -> tuple[np.ndarray, ...]:
    """This thread's buffers for the corrections of up to ``n`` differences."""
    import numpy as np

    bufs = _local.__dict__.get("bufs")
    if bufs is None or bufs[1].size < n or bufs[3].itemsize != itemsize:
        ints = {2: np.int16, 4: np.int32}[itemsize]
        bufs = _local.bufs = (
            np.empty(n + 1, np.uint8),  # a spare byte first: the kernel writes gap8[-1] (loractl/_kernels.c)
            np.empty(n, np.int8),
            np.empty(n, np.int64),
            np.empty(n, ints),
            np.empty(4, np.int64),
        )
    return bufs


def merge_block(
    w: torch.Tensor, d: torch.Tensor, out: torch.Tensor, *, round_d: bool = False, diffs: bool = False
) -> tuple | None:
    """``out = round(w + d)`` as torch's ``out.copy_(w.float() + d)`` rounds it (``round_d``: ``d`` rounded
    to w's dtype first, as ``w + d.to(w.dtype)``), one pass. ``w`` and ``out`` are contiguous, of the same
    bfloat16 or float32 dtype and size (``out`` may be ``w``); ``d`` is contiguous float32 of that size.

    Returns None when a merged value is NaN or infinite (``out`` is then partly written). Else, with
    ``diffs``, the receipt's corrections for the positions where ``round(out - d)`` (what an unmerge
    computes) misses ``w``'s bits, in the fields of :class:`loractl.ops.residual.Chunk`: ``(first, last,
    gap8, gapbig, d8, valbig)`` (positions counted from the block's start; ``valbig`` as signed integers
    of the dtype's width), or ``()`` when there are none; without ``diffs``, ``()``."""
    lib = _load()
    assert lib is not None, "merge_block called without the native kernels"
    n = w.numel()
    if not (w.is_contiguous() and out.is_contiguous() and d.is_contiguous()) or out.numel() != n or d.numel() != n:
        raise ValueError("merge_block takes contiguous blocks of one size")
    gap8, d8, gapbig, valbig, info = _scratch(max(n, 1) if diffs else 1, w.element_size())
    bufs = (gap8.ctypes.data + 1, d8.ctypes.data, gapbig.ctypes.data, valbig.ctypes.data, info.ctypes.data)
    args = (w.data_ptr(), d.data_ptr(), out.data_ptr(), n)
    if w.element_size() == 2:
        k = lib.loractl_merge_bf16(*args, int(round_d), int(diffs), *bufs)
    else:
        k = lib.loractl_merge_f32(*args, int(diffs), *bufs)
    if k < 0:
        return None
    if k == 0:
        return ()
    first, last, nbig, nval = (int(x) for x in info)
    return first, last, gap8[1:k].copy(), gapbig[:nbig].copy(), d8[:k].copy(), valbig[:nval].copy()


def sum64(words: np.ndarray, first: int, sums: list[int]) -> None:
    """Add to ``sums`` = [s1, s2] the sums of :func:`loractl.io.receipt.tensor_sum64` over ``words``
    (uint64, contiguous) whose first is word number ``first`` of the tensor."""
    import numpy as np

    lib = _load()
    assert lib is not None, "sum64 called without the native kernels"
    acc = np.zeros(2, np.uint64)
    lib.loractl_sum64(words.ctypes.data, words.size, first, acc.ctypes.data)
    sums[0] += int(acc[0])
    sums[1] += int(acc[1])
