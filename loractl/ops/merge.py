"""Merge arithmetic: ``W' = W + w · s · B · A`` per module, exactly as PEFT computes it.

PEFT's ``LoraLayer.get_delta_weight`` (peft/tuners/lora/layer.py) computes the update in float32
on CPU (half-precision factors are upcast; ``PeftModel.from_pretrained`` autocasts adapter factors
to float32 anyway), multiplies by the scale *after* the product, and adds it into the base weight
in place, letting torch promote: ``W += (B @ A) * s`` (one rounding to W's dtype). Embeddings cast
the update to W's dtype before adding (two roundings). DoRA (``variants.DoraLinearVariant``):
``W' = (m / ‖W + ΔW‖_row) · (W + ΔW)``, the norm per output row (per embedding column, per conv
output channel). Using the same torch operations in the same order is what makes ``loractl merge``
equal PEFT's ``merge_and_unload`` bit for bit; the tests compare against PEFT itself.

LoRAs on parameters (PEFT ``target_parameters``: MoE experts, routers) are ``expert`` contributions: one
expert's update (PEFT's einsum on that expert's slice of the stacked factors, :mod:`loractl.ops.experts`),
rows of it for one base tensor (gate or up half of ``gate_up_proj``), added into the tensor or its slice
``[index]`` of a fused ``[E, ., .]`` tensor as ``ParamWrapper.merge`` adds: the update rounded to the
tensor's dtype first, then added (two roundings). One expert's float32 update is held at a time (the last
few are kept, so gate and up of one expert share one product).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import torch.nn.functional as F

from .. import native
from ..adapter import LoraModule
from ..errors import UnsupportedAdapterError
from . import experts as experts_ops
from . import residual as residual_ops

_T = TypeVar("_T")

#: elements per chunk of the element-wise passes: small enough to stay in the CPU's cache
CHUNK_ELEMENTS = 1 << 16


class NonFiniteBlock(ArithmeticError):
    """A row block of :func:`fused_merge` / :func:`fused_unmerge` came out with a NaN or an infinity.

    Raised as soon as the block is computed (the check runs on the block while it is in the cache),
    leaving the output partly written: the caller redoes the tensor on the general path, where the
    result is compared with the original element by element (the original may hold infinities of
    its own, which a merge keeps).

    Attributes:
        row: the first row of the block.
    """

    def __init__(self, row: int) -> None:
        super().__init__(f"a NaN or infinity in the row block at row {row}")
        self.row = row


def all_finite(t: torch.Tensor) -> bool:
    """A screen for NaN and infinity in ``t``: one sum per cache-sized chunk, in ``t``'s dtype. NaN
    and ±inf propagate through a sum, which costs a tenth of ``isfinite().all()``. True means every
    value is finite; False means one may not be (a finite chunk whose sum overflows the dtype, e.g.
    |sum| > 65504 in float16, reads as False), for an exact ``isfinite`` comparison to settle."""
    if not t.is_floating_point():
        return True
    return all(math.isfinite(float(c.sum())) for (c,) in _chunks(t))


def _chunks(*tensors: torch.Tensor):
    """Matching slices along dim 0 of same-shaped tensors, about :data:`CHUNK_ELEMENTS` elements each.

    Element-wise arithmetic gives the same bits whatever the chunking; doing each pass on a
    cache-sized slice instead of the whole tensor saves the trips to memory between passes.
    """
    rows = tensors[0].shape[0] if tensors[0].dim() else 1
    if tensors[0].dim() == 0 or rows == 0:
        yield tensors
        return
    per_row = max(1, tensors[0][0].numel())
    step = max(1, CHUNK_ELEMENTS // per_row)
    for r0 in range(0, rows, step):
        yield tuple(t[r0 : r0 + step] for t in tensors)


def add_(w: torch.Tensor, d: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``w += d`` (``w -= d`` with ``sign=-1``) in place, exactly as torch's in-place op rounds it:
    computed in the promoted dtype, then rounded once to w's dtype."""
    promoted = torch.promote_types(w.dtype, d.dtype)
    for wc, dc in _chunks(w, d):
        acc = wc if promoted == w.dtype else wc.to(promoted)
        if sign == 1:
            acc.add_(dc)
        else:
            acc.sub_(dc)
        if acc is not wc:
            wc.copy_(acc)
    return w


def _scale_(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t * s`` in place (the same rounding as the out-of-place product), chunk by chunk."""
    for (c,) in _chunks(t):
        c.mul_(s)
    return t


def _factors32(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = m.down, m.up
    if a.dtype != torch.float64:
        a = a.float()
    if b.dtype != torch.float64:
        b = b.float()
    return a, b


def delta_weight(m: LoraModule, weight: float = 1.0) -> torch.Tensor:
    """The update ``w · s · B·A`` laid out like the base weight (PEFT's ``get_delta_weight``).

    Linear: ``transpose(B @ A, fan_in_fan_out) * s``. Embedding: ``(B @ A)ᵀ * s``. Conv 1×1:
    ``(B₂ @ A₂)`` unsqueezed; conv k×k: ``conv(Aᵀ, B)ᵀ * s`` as PEFT does.

    Args:
        m: the module.
        weight: the merge weight w (user's ratio); multiplies the scale.

    Returns:
        A float32 tensor (float64 for float64 factors) of the base weight's shape.
    """
    a, b = _factors32(m)
    s = m.scale * weight if weight != 1.0 else m.scale
    if m.kind == "embedding":
        return (b @ a).T * s
    if m.kind == "conv":
        if a.shape[2:] == (1,) * (a.dim() - 2):
            nd = a.dim() - 2
            out = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], a.shape[1])
            return out.reshape(*out.shape, *([1] * nd)) * s
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
        return conv(a.transpose(0, 1), b).transpose(0, 1) * s
    prod = b @ a
    if m.fan_in_fan_out:
        return prod.T * s
    return _scale_(prod, s)  # the product is ours: scale it in place


def dora_factor(m: LoraModule, w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's ``m / ‖W₀ + ΔW‖`` (PEFT ``DoraLinearLayer.get_weight_norm`` and friends), shaped to broadcast.

    Args:
        m: a module with a magnitude vector.
        w0: the base weight before any adapter was merged into it.
        delta: :func:`delta_weight` of ``m``.
    """
    assert m.magnitude is not None
    mag = m.magnitude.float() if m.magnitude.dtype != torch.float64 else m.magnitude
    if m.kind == "embedding":
        weight = w0.T + 1 * delta.T
        norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)
        return (mag / norm).view(1, -1)
    if m.kind == "conv":
        weight = w0 + 1 * delta
        dims = tuple(range(1, weight.dim()))
        norm = weight.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
        return (mag / norm).view(-1, *([1] * (w0.dim() - 1)))
    fifo = m.fan_in_fan_out
    wt = w0.T if fifo else w0
    weight = wt + 1 * (delta.T if fifo else delta)
    norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)
    factor = (mag / norm).view(-1, 1)
    return factor.T if fifo else factor


def apply_delta(
    w: torch.Tensor, m: LoraModule, delta: torch.Tensor, factor: torch.Tensor | None
) -> torch.Tensor:
    """Merge one module into ``w`` in place where PEFT does, and return the merged weight."""
    if factor is not None:
        return (factor * (w + delta)).to(w.dtype)
    if m.kind == "embedding":
        w += delta.to(w.dtype)
        return w
    return add_(w, delta)


def unapply_delta(
    w: torch.Tensor, m: LoraModule, delta: torch.Tensor, factor: torch.Tensor | None
) -> torch.Tensor:
    """The inverse of :func:`apply_delta` up to rounding: subtract (rounding once), or divide then subtract."""
    if factor is not None:
        return (w / factor - delta).to(w.dtype)
    return add_(w, delta, sign=-1)


def bias_delta(m: LoraModule, weight: float = 1.0) -> torch.Tensor:
    """``lora_B.bias · s`` (PEFT ``lora_bias``), added to the base bias."""
    assert m.bias is not None
    b = m.bias.float() if m.bias.dtype != torch.float64 else m.bias
    return b * (m.scale * weight if weight != 1.0 else m.scale)


def fused_eligible(m: LoraModule) -> bool:
    """Modules whose merge :func:`fused_merge` computes: plain linear layers (no DoRA, no transposed
    weight); their update is a plain matrix product, so it can be formed row block by row block."""
    return m.kind == "linear" and not m.fan_in_fan_out and not m.is_dora


def row_block(cols: int) -> int:
    """Rows per block of :func:`fused_merge`: about :data:`CHUNK_ELEMENTS` elements, a multiple of 32."""
    return max(32, (CHUNK_ELEMENTS // max(1, cols)) // 32 * 32)


_scratch_local = threading.local()


def _scratch(name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor of ``shape``, reused across calls (fresh memory costs page faults)."""
    cache: dict[tuple[str, torch.dtype], torch.Tensor] = _scratch_local.__dict__.setdefault("bufs", {})
    n = shape[0] * shape[1]
    buf = cache.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = cache[(name, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


#: smallest positive normal float32
_TINY32 = 2.0**-126


def _fused_factors(m: LoraModule, weight: float) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(A', B, s')`` with ``B @ A'`` then ``* s'`` (skipped when ``s'`` is None) giving the bits of
    ``(B @ A) * s``.

    When ``s`` is a power of two ≥ 1 it is folded into A: ``A·s`` is exact, every product and partial
    sum of ``B @ (A·s)`` is then exactly ``s`` times that of ``B @ A``, and ``(B @ A) * s`` rounds
    nothing, so both give the same bits. That holds unless a product ``b·a`` is subnormal (it lost bits
    in PEFT's order) or something overflows; both are ruled out from the factors' extreme magnitudes
    before folding, and the caller's check (:func:`fused_ok`) compares the result with PEFT's order.
    """
    a, b = _factors32(m)
    s = m.scale * weight if weight != 1.0 else m.scale
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        return a, b, s
    mant, _ = math.frexp(s)
    if mant != 0.5 or s < 1.0:
        return a, b, s
    if s == 1.0:
        return a, b, None
    # the magnitude check, once per module (it is most of this function's time), not per call
    key = (s, m.down.data_ptr(), m.up.data_ptr())
    cached = m.__dict__.get("_foldable")
    if cached is not None and cached[0] == key:
        foldable = cached[1]
    else:
        aa, ba = a.abs(), b.abs()
        a_max, b_max = float(aa.max()) if aa.numel() else 0.0, float(ba.max()) if ba.numel() else 0.0
        a_min = float(aa[aa > 0].min()) if bool((aa > 0).any()) else 1.0
        b_min = float(ba[ba > 0].min()) if bool((ba > 0).any()) else 1.0
        bound = a_max * b_max * s * max(1, a.shape[0])
        foldable = math.isfinite(bound) and bound < 2.0**120 and a_min * b_min >= _TINY32
        m.__dict__["_foldable"] = (key, foldable)
    return (a * s, b, None) if foldable else (a, b, s)


def _block_update(
    a: torch.Tensor, b: torch.Tensor, s: float | None, r0: int, n: int, name: str = "delta"
) -> torch.Tensor:
    """Rows ``r0 … r0+n`` of the update ``(B @ A) * s`` (``s`` None: already folded into A), in this
    thread's scratch block ``name``: the one place the row-block products are formed."""
    dc = _scratch(name, (n, a.shape[1]), a.dtype)
    torch.mm(b[r0 : r0 + n], a, out=dc)
    if s is not None:
        dc.mul_(s)
    return dc


def _rounded(w: torch.Tensor, d: torch.Tensor, out: torch.Tensor, subtract: bool = False) -> torch.Tensor:
    """``out = w + d`` (``w - d``) computed as torch's ``torch.add(w, d, out=out)`` computes it for a
    half-precision ``w`` and a float32 ``d``: promoted to float32, added, rounded once to ``out``'s
    dtype, the same bits, NaN payloads included (tests/ops/test_merge_ops.py checks it). Spelled as a
    widening copy into this thread's float32 scratch block, an in-place float32 add and a narrowing
    copy, each a vectorised kernel: torch's mixed-dtype add takes a scalar path that is 4-5x slower,
    and it was most of a merge's arithmetic."""
    if w.dtype == d.dtype:
        return torch.sub(w, d, out=out) if subtract else torch.add(w, d, out=out)
    acc = _scratch("acc", tuple(w.shape), d.dtype)  # type: ignore[arg-type]
    acc.copy_(w)
    if subtract:
        acc.sub_(d)
    else:
        acc.add_(d)
    return out.copy_(acc)


def fused_product_equals(m: LoraModule, weight: float, ref: torch.Tensor) -> bool:
    """Does the update of :func:`fused_merge` (B·A in row blocks, then scaled, on this thread) have the
    bits of ``ref`` (PEFT's :func:`delta_weight`)? Compared block by block, so the update is never
    held whole a second time."""
    a, b, s = _fused_factors(m, weight)
    rows, cols = b.shape[0], a.shape[1]
    if tuple(ref.shape) != (rows, cols) or ref.dtype != a.dtype:
        return False
    step = row_block(cols)
    itype = _INT[ref.element_size()]
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        blk = _block_update(a, b, s, r0, n, "check")
        if not torch.equal(blk.view(itype), ref[r0 : r0 + n].view(itype)):
            return False
    return True


def fused_merge(
    w0: torch.Tensor, m: LoraModule, weight: float, out: torch.Tensor, residual: bool = False
) -> dict[str, torch.Tensor] | None:
    """``out = w0 + w·s·(B·A)`` rounded exactly as PEFT's ``W += (B @ A) * s``, one row block at a time.

    Each merged block is checked for NaN/Inf while it is in the cache; one that has any raises
    :class:`NonFiniteBlock` (the caller decides, on the general path, whether the original held them).

    Each block's product, scaling and addition happen while the block is in the CPU's cache, instead
    of three passes over whole tensors in memory; the addition is the very torch op of PEFT's
    ``W += ΔW`` (computed in the promoted dtype, rounded once to W's). The product of a row block
    equals the same rows of the whole product only when the BLAS computes them alike; callers check
    that first (see :func:`fused_ok`) and use :func:`delta_weight` where it does not hold. The two
    halves of the rows are done on two threads (torch and numpy let go of the GIL); a block's bits do
    not depend on the thread that computes it.

    Args:
        w0: the base weight [out, in]; left unchanged unless ``out`` is ``w0``.
        m: a module for which :func:`fused_eligible` is true.
        weight: the merge weight.
        out: where the merged weight goes (same dtype and shape as ``w0``; may be ``w0``).
        residual: also work out what a receipt needs: where subtracting the update again (as an
            unmerge does) does not give ``w0`` back bit for bit, and ``w0``'s values there. Each block
            is merged into a scratch block, compared, encoded (:func:`residual.encode_block`: about
            two bytes a difference) and only then copied over, so ``out`` may be ``w0``.

    Returns:
        With ``residual``: the receipt's corrections for this tensor, as :func:`residual.join` gives
        them ({} when nothing differs, None when storing the whole original would be smaller); else
        None.
    """
    a, b, s = _fused_factors(m, weight)
    rows, cols = w0.shape
    step = row_block(cols)
    itype = _INT[w0.element_size()]
    w_int = w0.reshape(-1).view(itype).numpy()  # numpy's compare and flatnonzero are ~7x torch's here

    in_place = out.data_ptr() == w0.data_ptr()
    one_pass = native.merges(w0.dtype) and w0.is_contiguous() and out.is_contiguous()

    def rows_from(start: int, stop: int) -> list[residual_ops.Chunk]:
        chunks: list[residual_ops.Chunk] = []
        for r0 in range(start, stop, step):
            n = min(step, stop - r0)
            dc = _block_update(a, b, s, r0, n)
            wc, oc = w0[r0 : r0 + n], out[r0 : r0 + n]
            if one_pass:  # the same bits in one sweep (loractl/_kernels.c)
                _kernel_block(chunks, wc, dc, oc, r0, r0 * cols, round_d=False, diffs=residual)
                continue
            if not residual:
                _rounded(wc, dc, oc)
                if not all_finite(oc):
                    raise NonFiniteBlock(r0)
                continue
            mc = _scratch("merged", (n, cols), w0.dtype) if in_place else oc
            _rounded(wc, dc, mc)
            if not all_finite(mc):
                raise NonFiniteBlock(r0)
            rc = _scratch("rec", (n, cols), w0.dtype)
            _rounded(mc, dc, rc, subtract=True)  # what an unmerge without the receipt computes
            chunk = residual_ops.encode_block(
                w_int[r0 * cols : (r0 + n) * cols], rc.view(-1).view(itype).numpy(), r0 * cols
            )
            if chunk is not None:
                chunks.append(chunk)
            if in_place:
                oc.copy_(mc)
        return chunks

    parts = _on_two_threads(rows, step, rows_from)
    if not residual:
        return None
    return residual_ops.join([c for part in parts for c in part], w0.numel(), w0.dtype)


def _kernel_block(
    chunks: list[residual_ops.Chunk],
    w: torch.Tensor,
    d: torch.Tensor,
    out: torch.Tensor,
    row: int,
    at: int,
    *,
    round_d: bool,
    diffs: bool,
) -> None:
    """One row block (first row ``row``, first flat position ``at`` in its tensor) merged by the native
    kernel (:func:`native.merge_block`); its receipt corrections, if any, appended to ``chunks``.

    Raises:
        NonFiniteBlock: a merged value is NaN or infinite.
    """
    found = native.merge_block(w, d, out, round_d=round_d, diffs=diffs)
    if found is None:
        raise NonFiniteBlock(row)
    if found:
        first, last, *arrays = found
        chunks.append(residual_ops.Chunk(at + first, at + last, *arrays))


_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()


def _on_two_threads(rows: int, step: int, work: Callable[[int, int], _T]) -> list[_T]:
    """``work(start, stop)`` over ``range(rows)`` split at a multiple of ``step`` into two halves, one on
    a helper thread and one on the caller's; the results in row order. Small ranges stay on one thread."""
    global _helper
    blocks = -(-rows // step)
    if blocks < 4:
        return [work(0, rows)]
    mid = (blocks // 2) * step
    with _helper_lock:
        if _helper is None:
            # one torch thread there, as on the caller's side: the row-block products were checked
            # single-threaded (a new thread would otherwise start its own team of OpenMP threads)
            _helper = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="loractl-compute",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        later = _helper.submit(work, mid, rows)
    try:
        first = work(0, mid)
    except BaseException:
        wait([later])  # the other half writes into the same output: let it finish before anyone reuses it
        raise
    return [first, later.result()]


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fused_unmerge(m_w: torch.Tensor, m: LoraModule, weight: float, out: torch.Tensor) -> torch.Tensor:
    """``out = m_w − w·s·(B·A)`` rounded as :func:`unapply_delta` rounds it, one row block at a time
    (the inverse of :func:`fused_merge`, with the same row-block products and the same NaN/Inf check)."""
    a, b, s = _fused_factors(m, weight)
    rows, cols = m_w.shape
    step = row_block(cols)

    def rows_from(start: int, stop: int) -> None:
        for r0 in range(start, stop, step):
            n = min(step, stop - r0)
            oc = out[r0 : r0 + n]
            _rounded(m_w[r0 : r0 + n], _block_update(a, b, s, r0, n), oc, subtract=True)
            if not all_finite(oc):
                raise NonFiniteBlock(r0)

    _on_two_threads(rows, step, rows_from)
    return out


# --------------------------------------------------------------------------------------------
# whole tensors: every contribution to one base tensor, in merge order
# --------------------------------------------------------------------------------------------
@dataclass
class Contribution:
    """One change to one base tensor.

    Attributes:
        adapter: the adapter's position in the merge.
        kind: ``lora`` (add the module's update), ``bias`` (add ``lora_B.bias``·s to a bias),
            ``replace`` (a saved full tensor) or ``expert`` (add one expert's update of a parameter
            LoRA, :func:`expert_update`, rounded first as PEFT's ``ParamWrapper`` does).
        weight: the merge weight of the adapter.
        module: the LoRA module, for ``lora``, ``bias`` and ``expert``.
        tensor: the replacement, for ``replace``.
        expert: for ``expert``: e, whose factors give the update (0 for a 2-D parameter).
        index: for ``expert``: the slice ``[index]`` of a fused ``[E, ., .]`` tensor the update goes
            to; None for the whole tensor (a per-expert or 2-D one).
        rows: for ``expert``: the rows of the expert's update this tensor holds (gate: the first
            half of ``gate_up_proj``'s, up: the second); None for all.
        transposed: for ``expert``: the parameter is ``[E, in, out]`` (``is_transposed``): the update
            is ``(B_e @ A_e)ᵀ``.
        single: for ``expert``: a 2-D parameter (router): PEFT's ``lora.Linear`` product, not the
            experts' einsum.
    """

    adapter: int
    kind: str
    weight: float
    module: LoraModule | None = None
    tensor: torch.Tensor | None = None
    expert: int = 0
    index: int | None = None
    rows: slice | None = None
    transposed: bool = False
    single: bool = False


class _Recent:
    """The last few values computed for a key, kept while the key's first part (a module) is alive: a
    parameter LoRA's float32 factors, and its experts' updates (gate and up of one expert are two base
    tensors, merged one after the other, from one product)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[tuple, object, torch.Tensor | list]] = []
        self.lock = threading.Lock()

    def get(self, owner: object, key: tuple, make: Callable[[], _T]) -> _T:
        with self.lock:
            for i, (k, o, v) in enumerate(self.items):
                if o is owner and k == key:
                    self.items.insert(0, self.items.pop(i))
                    return v  # type: ignore[return-value]
        value = make()
        with self.lock:
            self.items.insert(0, (key, owner, value))  # type: ignore[arg-type]
            del self.items[self.size :]
        return value


    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_FACTORS = _Recent(2)
_UPDATES = _Recent(2)


def forget() -> None:
    """Let go of the factors and updates :func:`expert_update` kept (at the end of a merge or unmerge)."""
    _FACTORS.clear()
    _UPDATES.clear()


def expert_update(c: Contribution) -> torch.Tensor:
    """The update an ``expert`` contribution adds: expert ``c.expert``'s ``w·s·(B_e @ A_e)`` in float32 (PEFT's
    einsum on its slice of the stacked factors, upcast whole first as PEFT loads them; transposed for an
    ``is_transposed`` parameter; ``lora.Linear``'s product for a 2-D one), rows ``c.rows`` of it."""
    m = c.module
    assert m is not None
    n = max(1, m.experts)
    s = m.scale * c.weight if c.weight != 1.0 else m.scale

    def compute() -> torch.Tensor:
        factors = _FACTORS.get(m, ("factors", id(m.down), id(m.up)), lambda: experts_ops.expert_factors(m.down, m.up, n))
        a_e, b_e = factors[c.expert]
        return experts_ops.expert_delta(a_e, b_e, s, c.transposed, single=c.single)

    delta = _UPDATES.get(m, (id(m.down), id(m.up), c.expert, s, c.transposed, c.single), compute)
    return delta if c.rows is None else delta[c.rows]


#: the receipt's parts of one tensor, by part name (:mod:`loractl.ops.residual`, ``dora<k>``)
Parts = dict[str, torch.Tensor]


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).bits > torch.finfo(b).bits


def merged_tensor(
    w0: torch.Tensor,
    contributions: Sequence[Contribution],
    out_dtype: torch.dtype,
    *,
    inplace: bool = False,
    deltas: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply the contributions to ``w0`` (a copy, or ``w0`` itself with ``inplace``), in order, exactly
    as PEFT merges them in turn. ``deltas`` collects each LoRA update by position, for reuse."""
    compute = out_dtype if _wider(out_dtype, w0.dtype) else w0.dtype
    dora = any(c.module is not None and c.module.is_dora for c in contributions)
    w = w0 if inplace and compute == w0.dtype and not dora else w0.to(compute, copy=True)
    base_c = w0.to(compute) if compute != w0.dtype else w0
    for pos, c in enumerate(contributions):
        if c.kind == "replace":
            assert c.tensor is not None
            w = c.tensor.to(compute, copy=True)
        elif c.kind == "bias":
            assert c.module is not None
            w += bias_delta(c.module, c.weight)
        elif c.kind == "expert":
            delta = expert_update(c)
            if deltas is not None:
                deltas[pos] = delta
            experts_ops.merge_(w if c.index is None else w[c.index], delta)
        else:
            assert c.module is not None
            delta = delta_weight(c.module, c.weight)
            if deltas is not None:
                deltas[pos] = delta
            factor = dora_factor(c.module, base_c, delta) if c.module.is_dora else None
            w = apply_delta(w, c.module, delta, factor)
    return w.to(out_dtype) if w.dtype != out_dtype else w


def unmerged_tensor(
    m: torch.Tensor,
    contributions: Sequence[Contribution],
    orig_dtype: torch.dtype,
    factors: dict[int, torch.Tensor] | None = None,
    deltas: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Remove the contributions from a merged tensor, last first (exact up to rounding).

    Args:
        m: the merged tensor.
        contributions: as merged.
        orig_dtype: the base tensor's dtype.
        factors: DoRA factors by contribution position (from a receipt).
        deltas: the updates by position, when the caller has them (else recomputed, to the same bits).

    Raises:
        UnsupportedAdapterError: a DoRA contribution without its factors.
    """
    compute = m.dtype if _wider(m.dtype, orig_dtype) else orig_dtype
    w = m.to(compute, copy=True)
    for pos in range(len(contributions) - 1, -1, -1):
        c = contributions[pos]
        if c.kind == "replace":
            continue  # only a receipt can restore a replaced tensor
        assert c.module is not None
        if c.kind == "bias":
            w -= bias_delta(c.module, c.weight)
            continue
        if c.kind == "expert":
            delta = deltas[pos] if deltas is not None and pos in deltas else expert_update(c)
            experts_ops.unmerge_(w if c.index is None else w[c.index], delta)
            continue
        delta = deltas[pos] if deltas is not None and pos in deltas else delta_weight(c.module, c.weight)
        factor = None
        if c.module.is_dora:
            if factors is None or pos not in factors:
                raise UnsupportedAdapterError(
                    f"module {c.module.name!r} is DoRA: its merge divides by norms of the original weight, "
                    "which cannot be recovered by subtraction",
                    hint="unmerge with the receipt that merge wrote",
                )
            factor = factors[pos]
        w = unapply_delta(w, c.module, delta, factor)
    return w.to(orig_dtype) if w.dtype != orig_dtype else w


def dora_factors(
    w0: torch.Tensor, contribs: Sequence[Contribution], deltas: dict[int, torch.Tensor] | None = None
) -> dict[int, torch.Tensor]:
    """DoRA's per-row factors by contribution position (the updates reused from ``deltas`` when given)."""
    out: dict[int, torch.Tensor] = {}
    for pos, c in enumerate(contribs):
        if c.kind == "lora" and c.module is not None and c.module.is_dora:
            delta = deltas[pos] if deltas and pos in deltas else delta_weight(c.module, c.weight)
            out[pos] = dora_factor(c.module, w0, delta)
    return out


def fused_ok(changes: Iterable[Sequence[Contribution]]) -> bool:
    """Can this merge run single-threaded with row-block products (:func:`fused_merge`) and still give
    PEFT's bits? It can when, for every distinct module shape, that way of computing the update gives
    the same bits as PEFT's whole product at the default thread count: checked here on one real
    module of each shape (the BLAS picks its kernels by shape, not by value). On success the process
    is left at one torch thread (the caller restores it); merges with DoRA, whose norms are
    reductions, keep the default threads."""
    threads = torch.get_num_threads()
    samples: dict[tuple, Contribution] = {}
    for contribs in changes:
        for c in contribs:
            if c.kind == "expert" and c.module is not None:  # computed on one thread too, once fused_ok holds
                m = c.module
                key = ("expert", tuple(m.up.shape), tuple(m.down.shape), m.up.dtype, m.down.dtype, c.transposed, c.single)
                samples.setdefault(key, replace(c, rows=None))
                continue
            if c.kind != "lora" or c.module is None:
                continue
            if c.module.is_dora:
                return False
            m = c.module
            key = (m.kind, tuple(m.up.shape), tuple(m.down.shape), m.fan_in_fan_out, m.up.dtype, m.down.dtype)
            samples.setdefault(key, c)
    for c in samples.values():  # one shape at a time: a 7B MLP update is 180 MB in float32
        if not _same_bits_on_one_thread(c, threads):
            torch.set_num_threads(threads)
            return False
    torch.set_num_threads(1)
    return True


def _same_bits_on_one_thread(c: Contribution, threads: int) -> bool:
    """Does one thread compute ``c``'s update (by row blocks where :func:`fused_eligible`, whole
    otherwise) with the bits of PEFT's whole product on ``threads`` threads?"""
    m = c.module
    assert m is not None
    if c.kind == "expert":
        torch.set_num_threads(threads)
        ref = expert_update(c)
        torch.set_num_threads(1)
        forget()
        return torch.equal(residual_ops.bits(expert_update(c).contiguous()), residual_ops.bits(ref.contiguous()))
    torch.set_num_threads(threads)
    ref = delta_weight(m, c.weight)
    torch.set_num_threads(1)
    if fused_eligible(m):
        return fused_product_equals(m, c.weight, ref)
    got = delta_weight(m, c.weight)  # computed whole, as merged_tensor does, but on one thread
    return got.shape == ref.shape and torch.equal(
        residual_ops.bits(got.contiguous()), residual_ops.bits(ref.contiguous())
    )


def one_fused_lora(contribs: Sequence[Contribution]) -> bool:
    """A tensor changed by exactly one LoRA module that the row-block path computes."""
    return (
        len(contribs) == 1
        and contribs[0].kind == "lora"
        and contribs[0].module is not None
        and fused_eligible(contribs[0].module)
    )


def one_expert(w0: torch.Tensor, contribs: Sequence[Contribution]) -> bool:
    """Is the tensor changed by one expert's update alone (into the whole tensor or one slice ``[index]``),
    a case for :func:`expert_in_one_pass`?"""
    if len(contribs) != 1 or contribs[0].kind != "expert" or contribs[0].module is None:
        return False
    c = contribs[0]
    target = w0 if c.index is None else w0[c.index]
    delta = expert_update(c)  # kept: the merge asks for it again
    return delta.dtype == torch.float32 and delta.shape == target.shape and target.is_contiguous()


def expert_in_one_pass(w0: torch.Tensor, c: Contribution, receipt: bool) -> Parts | None:
    """``w0`` (bfloat16 or float32, contiguous; :func:`one_expert` true) merged in place with expert contribution ``c`` as
    :func:`experts_ops.merge_` merges it (the update rounded to w0's dtype, then added), by the native
    kernel, one row block at a time on two threads; with ``receipt``, the receipt's corrections for the
    tensor as :func:`merge_tensor`'s general path finds them (None: the whole original is smaller).
    Raises :class:`NonFiniteBlock` when a merged value is NaN or infinite (w0 is then partly merged)."""
    target = w0 if c.index is None else w0[c.index]
    delta = expert_update(c)
    d = delta.contiguous().reshape(target.shape[0], -1) if target.dim() else delta.reshape(1, 1)
    t2 = target.reshape(d.shape)
    offset = (target.data_ptr() - w0.data_ptr()) // w0.element_size()
    rows, cols = t2.shape
    step = row_block(cols)
    rounded = w0.dtype != torch.float32  # PEFT's ParamWrapper rounds the update to a half-precision W's dtype

    def rows_from(start: int, stop: int) -> list[residual_ops.Chunk]:
        chunks: list[residual_ops.Chunk] = []
        for r0 in range(start, stop, step):
            blk = t2[r0 : r0 + step]
            _kernel_block(chunks, blk, d[r0 : r0 + step], blk, r0, offset + r0 * cols, round_d=rounded, diffs=receipt)
        return chunks

    parts = _on_two_threads(rows, step, rows_from)
    if not receipt:
        return None
    return residual_ops.join([c for part in parts for c in part], w0.numel(), w0.dtype)


def merge_tensor(
    w0: torch.Tensor,
    contribs: Sequence[Contribution],
    out_dtype: torch.dtype,
    *,
    fused: bool,
    receipt: bool,
    original: Callable[[], torch.Tensor],
    check: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, Parts | None]:
    """A merge's job for one base tensor: the merged tensor and, with ``receipt``, what an unmerge
    needs to give ``w0`` back bit for bit (the residual parts, DoRA's factors, or the whole original).

    Args:
        w0: the base tensor read (a buffer the merge may write into).
        contribs: its contributions in merge order ([] for a tensor only cast to ``out_dtype``).
        out_dtype: the dtype written.
        fused: the merge may compute a single plain LoRA by row blocks (see :func:`fused_ok`).
        receipt: also return the receipt's parts.
        original: reads ``w0`` again (when most values differ the whole original is the smaller
            record; when a row block comes out with NaN/Inf the tensor is redone on the general
            path; the row-block path has overwritten the buffer by then).
        check: called with the merged tensor on the general path (the row-block path checks each
            block itself and raises :class:`NonFiniteBlock`), to refuse NaN/Inf the base did not hold.
    """
    in_place: Callable[[], Parts | None] | None = None  # a merge by row blocks, into w0
    if w0.dtype == out_dtype:
        if fused and one_fused_lora(contribs):
            c = contribs[0]
            assert c.module is not None
            in_place = functools.partial(fused_merge, w0, c.module, c.weight, out=w0, residual=receipt)
        elif native.merges(w0.dtype) and one_expert(w0, contribs):
            in_place = functools.partial(expert_in_one_pass, w0, contribs[0], receipt)
    if in_place is not None:
        try:
            parts = in_place()
        except NonFiniteBlock:  # w0 is partly merged: redo it whole, and check it
            w0 = original()
        else:
            if receipt and parts is None:  # most values differ: the whole original is smaller
                parts = {"full": original()}
            return w0, parts
    if not receipt:  # nothing needs the original: merge into the buffer just read
        merged = merged_tensor(w0, contribs, out_dtype, inplace=True)
        if check is not None:
            check(merged)
        return merged, None
    deltas: dict[int, torch.Tensor] = {}
    merged = merged_tensor(w0, contribs, out_dtype, deltas=deltas)
    if check is not None:
        check(merged)
    if any(c.kind == "replace" for c in contribs):
        return merged, {"full": w0}
    factors = dora_factors(w0, contribs, deltas)
    restored = unmerged_tensor(merged, contribs, w0.dtype, factors, deltas)
    parts = residual_ops.encode(w0, restored)
    for pos, f in factors.items():
        parts[f"dora{pos}"] = f.contiguous()
    return merged, parts


def unmerge_tensor(
    m: torch.Tensor,
    contribs: Sequence[Contribution],
    orig_dtype: torch.dtype,
    parts: Parts,
    *,
    fused: bool,
    merged: Callable[[], torch.Tensor],
    check: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """An unmerge's job for one merged tensor: the updates subtracted (last first), then the receipt's
    ``parts`` applied (``{}`` without a receipt: the subtraction, close but not exact). ``merged``
    reads ``m`` again (after a row block came out with NaN/Inf); ``check`` is called with the result."""
    if "full" in parts:
        return parts["full"]
    factors = {int(k[4:]): v for k, v in parts.items() if k.startswith("dora")}
    rec: torch.Tensor | None = None
    if fused and one_fused_lora(contribs) and m.dtype == orig_dtype:
        c = contribs[0]
        assert c.module is not None
        try:
            rec = fused_unmerge(m, c.module, c.weight, out=m)
        except NonFiniteBlock:  # m is partly unmerged: redo it whole, and check it
            m = merged()
    if rec is None:
        rec = unmerged_tensor(m, contribs, orig_dtype, factors)
    restored = residual_ops.decode(rec, parts)
    if check is not None:
        check(restored)
    return restored
