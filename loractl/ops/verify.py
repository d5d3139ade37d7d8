"""Is a merged tensor what a correct merge gives? The arithmetic of ``loractl verify`` (issue #14).

For a tensor the adapters change, a correct merge holds ``E = W + Σ wᵢ·ΔWᵢ`` (``ΔW = s·B·A`` in
the base weight's layout; DoRA, ``lora_bias`` and ``modules_to_save`` as :mod:`.merge` applies them),
rounded to the merged model's dtype. :func:`check_changed` decides, strongest answer first:

1. **exact**: the merge is recomputed in PEFT's order (what PEFT's ``merge_and_unload`` and
   ``loractl merge`` write, bit for bit) and, where the merged dtype is not the base's, also as a
   merge computed in float32 then cast once; equal bits → ``ok``. For one plain LoRA module on a
   linear weight this runs in row blocks kept in the CPU's cache (:func:`.merge.fused_merge`'s way),
   which is what makes it cheaper than merging and then comparing.
2. **bound**: otherwise (another tool's merge: other GEMM, other order, other dtype handling) every
   element must satisfy ``|M − E| ≤ β``, the largest error any correct merge may make (derived in
   docs/merge.md, "verify: the rounding bound"); ``E`` is computed in float64. For one LoRA module
   β = c₁·ulp_d(M) + 2·γ_{r+4}·(|w·s|·|B|·|A|) with ``γ_n = n·u₃₂/(1 − n·u₃₂)`` (Higham, *Accuracy
   and Stability of Numerical Algorithms*, §3.1 and Thm 3.5 for the product of inner length r);
   several modules, embeddings (whose update PEFT rounds before adding), DoRA and a base in another
   dtype add the terms :func:`_expect_block` derives.

A tensor no adapter touches must equal the base bit for bit, or the base cast to the merged dtype by
``Tensor.to`` (round to nearest even, as transformers, PEFT and safetensors cast): :func:`check_untouched`.

Outside the bound, the least-squares ratio ``c = ⟨M − W, E − W⟩ / ⟨E − W, E − W⟩`` (float64 sums
over row blocks) tells a merge at the wrong weight (``wrong-scale``: the residual after fitting c is
within the rounding) from a module left out (``not-merged``: M is the base, or c ≈ 0) and from
anything else (``mismatch``). Non-finite values where the expected value is finite are ``nan-inf``.

Tensors in, small results out: no files, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..adapter import LoraModule
from . import merge as merge_ops

OK = "ok"
NOT_MERGED = "not-merged"
WRONG_SCALE = "wrong-scale"
STRAY_CHANGE = "stray-change"
NAN_INF = "nan-inf"
MISMATCH = "mismatch"
MISSING = "missing"
EXTRA = "extra"

#: order names in :attr:`TensorCheck.exact`
PEFT_ORDER = "peft"  # PEFT's merge_and_unload, loractl merge: the base in the merged dtype, updates in turn
#: loractl merge where its bits are not PEFT's (a DoRA module merged after another on one weight)
LORACTL_ORDER = "loractl"
FP32_ORDER = "fp32"  # the whole merge in float32 (or the base's wider dtype), cast once to the merged dtype

#: a fitted ratio closer to 0 than this, with the residual within rounding, means nothing was merged
NOT_MERGED_RATIO = 0.05
#: wrong-scale needs |c − 1| beyond this many standard deviations of what rounding can move c by
SCALE_SIGMAS = 5.0


class Change(Protocol):
    """One change to one base tensor, as ``api.Contribution`` describes it (matched structurally)."""

    kind: str  # "lora", "bias" or "replace"
    weight: float
    module: LoraModule | None
    tensor: torch.Tensor | None


@dataclass(frozen=True)
class TensorCheck:
    """What :func:`check_changed` or :func:`check_untouched` found for one tensor.

    Attributes:
        verdict: ``ok``, ``not-merged``, ``wrong-scale``, ``stray-change``, ``nan-inf`` or ``mismatch``.
        exact: the order whose bits the merged tensor has (``peft``, ``loractl``, ``fp32``; ``base`` or ``cast`` for an
            untouched tensor), or None when it was judged by the rounding bound (or failed).
        ratio: the least-squares c of ``M − W ≈ c·(E − W)``; None when it was not needed (an exact
            match) or is undefined (the expected change is zero).
        residual: ``‖(M − W) − c·(E − W)‖ / ‖E − W‖`` after that fit.
        outside: elements outside the bound (changed tensors) or different from the base (untouched).
        elements: the tensor's elements.
        max_excess: the largest ``|M − E| − β`` (≤ 0 when every element is within the bound); None
            when the bound was not needed (an exact match, an untouched tensor) or no element is finite.
        max_abs_diff: the largest ``|M − E|`` (changed) or ``|M − W|`` (untouched), finite elements.
        worst: the index of the element with the largest excess (or difference), or None.
        nonfinite: elements that are NaN/±inf in the merged tensor where the expected value is finite.
        modules: the adapter modules that change this tensor (their names), for findings.
        note: one line for a human when the verdict needs it (shape, dtype).
    """

    verdict: str
    exact: str | None = None
    ratio: float | None = None
    residual: float | None = None
    outside: int = 0
    elements: int = 0
    max_excess: float | None = None
    max_abs_diff: float = 0.0
    worst: tuple[int, ...] | None = None
    nonfinite: int = 0
    modules: tuple[str, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    @property
    def fraction(self) -> float:
        """The fraction of elements outside the bound (or different from the base)."""
        return self.outside / self.elements if self.elements else 0.0


# --------------------------------------------------------------------------------------------
# floating-point facts
# --------------------------------------------------------------------------------------------
#: significand bits (with the implicit one): the unit roundoff is 2^-p
_P = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}
_EXP = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: relative slack on every rounding term (covers the float64 arithmetic of the bound itself)
_SLACK = 1.0 + 2.0**-10


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p: round to nearest moves a value by at most u times its magnitude (normal range)."""
    return 2.0 ** -_P[dtype]


def smallest_subnormal(dtype: torch.dtype) -> float:
    """η, the spacing of the subnormals: round to nearest moves a value by at most η/2 there."""
    return float(torch.finfo(dtype).smallest_normal) * 2.0 ** (1 - _P[dtype])


def gamma(n: int, u: float = 2.0**-24) -> float:
    """Higham's γₙ = n·u / (1 − n·u): a sum of n rounded operations is within γₙ·Σ|terms| of exact."""
    nu = n * u
    if nu >= 0.5:
        return math.inf
    return nu / (1.0 - nu)


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of ``t``'s dtype just above ``|t|`` (float64, same shape): 2^(e−p+1) for
    2^e ≤ |t| < 2^(e+1), η for zero and subnormals. From the bits: the exponent field alone is 2^e."""
    itype, mask = _EXP[t.dtype]
    p2 = (t.contiguous().view(itype) & mask).view(t.dtype).to(torch.float64)
    return p2.mul_(2.0 ** (1 - _P[t.dtype])).clamp_min_(smallest_subnormal(t.dtype))


def final_rounding_constant(dtype: torch.dtype) -> float:
    """c₁: a correct merge's last rounding into ``dtype`` moves it by at most c₁·ulp(M).

    ½ for one rounding to nearest; a narrower dtype is reached through float32 (torch adds bf16 and
    fp32 in fp32, then rounds): double rounding adds ½·ulp₃₂ ≤ 2^-(24−p+1)·ulp_d. The last term covers
    the float64 rounding of the expected value itself (≤ 2·u₆₄·|E|).
    """
    p = _P[dtype]
    c = 0.5 + (2.0 ** -(24 - p + 1) if p < 24 else 0.0)
    return c + 2.0 * 2.0**-53 / unit_roundoff(dtype)


def exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Does ``dst`` hold every value of ``src`` (so casting loses nothing)?"""
    if src == dst:
        return True
    if not (src.is_floating_point and dst.is_floating_point):
        return False
    if dst == torch.float64:
        return True
    return dst == torch.float32 and src in (torch.bfloat16, torch.float16)


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).bits > torch.finfo(b).bits


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_INT[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _module_names(changes: Sequence[Change]) -> tuple[str, ...]:
    names: list[str] = []
    for c in changes:
        if c.module is not None and c.module.name not in names:
            names.append(c.module.name)
    return tuple(names)


# --------------------------------------------------------------------------------------------
# 1. the exact recomputation
# --------------------------------------------------------------------------------------------
def peft_order(w0: torch.Tensor, changes: Sequence[Change], out_dtype: torch.dtype) -> torch.Tensor:
    """The changes applied to ``w0`` in turn exactly as ``loractl merge`` merges them (:func:`loractl.ops.
    merge.merged_tensor`): PEFT's bits, except where :func:`replays` (then :func:`peft_replay` gives
    PEFT's). ``w0`` is not changed."""
    return merge_ops.merged_tensor(w0, changes, out_dtype)  # type: ignore[arg-type]


def replays(changes: Sequence[Change]) -> bool:
    """Does PEFT replay earlier adapters around a DoRA norm here: a DoRA module merged into a weight
    that an earlier LoRA module (since the last replacement) changed already?"""
    earlier = False
    for c in changes:
        if c.kind == "replace":
            earlier = False
        elif c.kind == "lora" and c.module is not None:
            if c.module.is_dora and earlier:
                return True
            earlier = True
    return False


def peft_replay(w0: torch.Tensor, changes: Sequence[Change], out_dtype: torch.dtype) -> torch.Tensor:
    """PEFT's own bits (0.21.2) where :func:`replays`: to merge DoRA module k into a weight that holds
    modules 1..k−1, ``LoraLayer._unmerged_base_weight`` unmerges those, last first (plain LoRA:
    ``W −= ΔW.to(W.dtype)``; DoRA: ``(W / f − ΔW).to(W.dtype)`` with its cached factor), takes the
    norm of what is left (W̃ ≈ W), merges 1..k−1 again (each DoRA factor now from W̃) and then k:
    ``f_k·(W + ΔW_k)`` with ``f_k = m_k/‖W̃ + ΔW_k‖``. The same formula as :func:`peft_order` (the norm of
    the original weight), rounded more often. ``w0`` is not changed."""
    compute = out_dtype if _wider(out_dtype, w0.dtype) else w0.dtype
    w = w0.to(compute, copy=True)
    done: list[tuple[LoraModule, torch.Tensor, torch.Tensor | None]] = []  # merged modules, their factors
    for c in changes:
        if c.kind == "replace":
            assert c.tensor is not None
            w, done = c.tensor.to(compute, copy=True), []
        elif c.kind == "bias":
            assert c.module is not None
            w += merge_ops.bias_delta(c.module, c.weight)
        else:
            m = c.module
            assert m is not None
            delta = merge_ops.delta_weight(m, c.weight)
            factor = None
            if m.is_dora:
                norm_of = w
                if done:
                    for dm, dd, df in reversed(done):
                        if df is None:
                            w -= dd.to(w.dtype)
                        else:
                            w = merge_ops.unapply_delta(w, dm, dd, df)
                    norm_of = w.clone()
                    again = []
                    for dm, dd, _ in done:
                        df = merge_ops.dora_factor(dm, norm_of, dd) if dm.is_dora else None
                        w = merge_ops.apply_delta(w, dm, dd, df)
                        again.append((dm, dd, df))
                    done = again
                factor = merge_ops.dora_factor(m, norm_of, delta)
            w = merge_ops.apply_delta(w, m, delta, factor)
            done.append((m, delta, factor))
    return w.to(out_dtype) if w.dtype != out_dtype else w


@dataclass(frozen=True)
class _Order:
    """A way a correct merge may have been computed: the base cast to the merged dtype first
    (``lossy``), and the dtype the updates are added in."""

    name: str
    lossy: bool
    compute: torch.dtype


def orders(base_dtype: torch.dtype, merged_dtype: torch.dtype) -> list[_Order]:
    """The orders :func:`check_changed` recomputes bit for bit, PEFT's first.

    - ``peft``: the base as PEFT loads it for a merged model of that dtype (``from_pretrained(dtype=
      merged)``): cast first when the merged dtype cannot hold it, then merged in the wider of the
      two (``loractl merge`` and ``loractl merge --dtype`` wider than the base do exactly this).
    - ``fp32``: the base kept in float32 (or its own wider dtype), the merge done there, cast once at
      the end (mergekit, a hand-written merge, ``loractl merge --dtype`` narrower than the base).
      Listed only when it differs from ``peft``.
    """
    lossy = not exact_cast(base_dtype, merged_dtype)
    prepared = merged_dtype if lossy else base_dtype
    out = [_Order(PEFT_ORDER, lossy, merged_dtype if _wider(merged_dtype, prepared) else prepared)]
    wide = torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype
    fp32 = _Order(FP32_ORDER, False, merged_dtype if _wider(merged_dtype, wide) else wide)
    if (fp32.lossy, fp32.compute) != (out[0].lossy, out[0].compute):
        out.append(fp32)
    return out


def _prepare(base: torch.Tensor, order: _Order, merged_dtype: torch.dtype) -> torch.Tensor:
    if order.lossy:
        return base.to(merged_dtype)
    return base.to(order.compute) if _wider(order.compute, base.dtype) else base


#: (factor shapes and dtypes, scale folded, torch threads) -> do row-block products have the bits of
#: PEFT's whole product here? Checked once per shape, as ``api._fused_ok`` does before a merge.
_ROW_BLOCKS_ARE_PEFT: dict[tuple, bool] = {}


def _row_blocks_are_peft(m: LoraModule, weight: float) -> bool:
    s = m.scale * weight if weight != 1.0 else m.scale
    folded = math.frexp(s)[0] == 0.5 and s >= 1.0
    threads = torch.get_num_threads()
    key = (tuple(m.down.shape), tuple(m.up.shape), m.down.dtype, m.up.dtype, folded, threads)
    known = _ROW_BLOCKS_ARE_PEFT.get(key)
    if known is None:
        ref = merge_ops.delta_weight(m, weight)
        torch.set_num_threads(1)
        try:
            known = merge_ops.fused_product_equals(m, weight, ref)
        finally:
            torch.set_num_threads(threads)
        del ref
        _ROW_BLOCKS_ARE_PEFT[key] = known
    return known


def _rounding_chain(o: _Order, update_dtype: torch.dtype, d: torch.dtype) -> tuple:
    """How an order rounds ``W + ΔW`` for one plain update: the sum in the promoted dtype, then to the
    compute dtype, then to d, leaving out the roundings into a dtype that holds the value already."""
    chain: list[torch.dtype] = []
    for t in (torch.promote_types(o.compute, update_dtype), o.compute, d):
        if chain and exact_cast(chain[-1], t):
            continue
        chain.append(t)
    return (o.lossy, tuple(chain))


def _exact_row_blocks(
    merged: torch.Tensor, base: torch.Tensor, m: LoraModule, weight: float, candidates: list[_Order]
) -> str | None:
    """The first of ``candidates`` whose merge has the bits of ``merged``, computed one row block at a
    time in cache (the product ``B[rows]·A``, scaled, added with one rounding, compared), on two
    threads; a half stops at its first block that no candidate matches."""
    a, b, s = merge_ops._fused_factors(m, weight)
    rows, cols = base.shape
    step = merge_ops.row_block(cols)
    d = merged.dtype
    seen: set[tuple] = set()
    distinct = []
    for o in candidates:  # orders that round a single update the same way give the same bits: try one
        key = _rounding_chain(o, a.dtype, d)
        if key not in seen:
            seen.add(key)
            distinct.append(o)
    candidates = distinct
    itype = _INT[merged.element_size()]

    def half(start: int, stop: int) -> set[str]:
        alive = {o.name for o in candidates}
        for r0 in range(start, stop, step):
            n = min(step, stop - r0)
            dc = merge_ops._block_update(a, b, s, r0, n)
            wc, mc = base[r0 : r0 + n], merged[r0 : r0 + n]
            for o in candidates:
                if o.name not in alive:
                    continue
                if not o.lossy and o.compute == base.dtype == d:  # the common case, as the merge does it
                    got = merge_ops._scratch("verify", (n, cols), d)
                    merge_ops._rounded(wc, dc, got)  # torch.add's bits, through a float32 scratch block
                else:
                    x = wc.to(d) if o.lossy else wc
                    got = torch.add(x.to(o.compute) if x.dtype != o.compute else x, dc)
                    got = got.to(o.compute).to(d)
                if not torch.equal(got.view(itype), mc.view(itype)):
                    alive.discard(o.name)
            if not alive:
                break
        return alive

    with _OneTorchThread():  # the row-block products were checked single-threaded
        parts = merge_ops._on_two_threads(rows, step, half)
    alive = set.intersection(*parts)
    return next((o.name for o in candidates if o.name in alive), None)


def exact_match(merged: torch.Tensor, base: torch.Tensor, changes: Sequence[Change]) -> str | None:
    """The order (:func:`orders`) whose merge of ``base`` has exactly the bits of ``merged``, or None."""
    candidates = orders(base.dtype, merged.dtype)
    one = changes[0] if len(changes) == 1 else None
    if (
        one is not None
        and one.kind == "lora"
        and one.module is not None
        and merge_ops.fused_eligible(one.module)
        and base.dim() == 2
        and merged.is_contiguous()
        and base.is_contiguous()
        and _row_blocks_are_peft(one.module, one.weight)
    ):
        return _exact_row_blocks(merged, base, one.module, one.weight, candidates)
    replay = replays(changes)
    for o in candidates:
        w = _prepare(base, o, merged.dtype)
        if replay:  # PEFT's bits, then loractl's
            got = peft_replay(w, changes, merged.dtype)
            if _same_bits(got.contiguous(), merged.contiguous()):
                return o.name
        got = peft_order(w, changes, merged.dtype)
        if _same_bits(got.contiguous(), merged.contiguous()):
            return LORACTL_ORDER if replay and o.name == PEFT_ORDER else o.name
        del got
    return None


# --------------------------------------------------------------------------------------------
# 2. the expected value in float64 and the rounding bound, one row block at a time
# --------------------------------------------------------------------------------------------
def _factors(m: LoraModule, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = merge_ops._factors32(m)
    return (a.abs(), b.abs()) if absolute else (a, b)


def update_rows(m: LoraModule, weight: float, r0: int, r1: int, absolute: bool = False) -> torch.Tensor:
    """Rows ``r0:r1`` of :func:`.merge.delta_weight` (the base weight's layout), float32; with
    ``absolute``, the same rows of ``|w·s|·|B|·|A|`` (the scale of the update's rounding error)."""
    a, b = _factors(m, absolute)
    s = m.scale * weight
    if absolute:
        s = abs(s)
    if m.kind == "embedding" or (m.kind == "linear" and m.fan_in_fan_out):
        return (b @ a[:, r0:r1]).T * s  # the weight's rows are the product's columns
    if m.kind == "conv":
        if a.shape[2:] == (1,) * (a.dim() - 2):
            nd = a.dim() - 2
            out = b[r0:r1].reshape(r1 - r0, b.shape[1]) @ a.reshape(a.shape[0], a.shape[1])
            return out.reshape(*out.shape, *([1] * nd)) * s
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
        return conv(a.transpose(0, 1), b[r0:r1]).transpose(0, 1) * s
    return (b[r0:r1] @ a) * s


def _dora_by_column(m: LoraModule) -> bool:
    """DoRA's norm runs down the stored weight's columns (GPT-2 Conv1D, embeddings), not along rows."""
    return m.kind == "embedding" or (m.kind == "linear" and m.fan_in_fan_out)


def _gemm_error(m: LoraModule) -> tuple[float, float]:
    """``(ρ, α)`` with G = ρ·T + α bounding how far two merges' updates (ours and theirs) may be apart.

    Each is within γ_{r+4}·T_exact + (r+4)·η₃₂ of the exact ``w·s·B·A``: r products and r−1 sums (any
    order, FMA or not: Higham Thm 3.5), the scale's multiply, the scale and the weight each rounded
    to float32 once, a scaled factor; η₃₂ per operation that may underflow into the subnormals. T as
    computed (float32, all terms ≥ 0) is ≥ (1 − γ_{r+1})·T_exact.
    """
    r = m.rank
    rho = 2.0 * gamma(r + 4) / (1.0 - gamma(r + 1)) * _SLACK
    return rho, 2.0 * (r + 4) * smallest_subnormal(torch.float32)


def _gemm_term(m: LoraModule, weight: float, r0: int, r1: int) -> torch.Tensor:
    """G for rows r0:r1, float64 [n, cols]."""
    rho, alpha = _gemm_error(m)
    t = update_rows(m, weight, r0, r1, absolute=True).reshape(r1 - r0, -1).to(torch.float64)
    return t.mul_(rho).add_(alpha)


@dataclass
class _Dora:
    """DoRA's factor m/‖W + ΔW‖ for the whole tensor, when the norm runs down columns (prepass)."""

    factor: torch.Tensor  # [1, cols], float64
    rel: torch.Tensor  # [1, cols]: the norm's relative perturbation from the update's error
    nu: torch.Tensor  # [1, cols]: the norm


@dataclass
class _Expect:
    base: torch.Tensor  # W, float64 [n, cols]
    change: torch.Tensor  # E − W, float64 [n, cols]
    bound: torch.Tensor  # β without the final rounding's c₁·ulp(M), float64 [n, cols]

    @property
    def expected(self) -> torch.Tensor:
        return self.base + self.change


def _rows2d(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of ``t`` as [n, cols] (a 1-D tensor: its elements r0:r1 as one column)."""
    return t[r0:r1].reshape(r1 - r0, -1)


def _base_cast_term(w64: torch.Tensor, base_dtype: torch.dtype, d: torch.dtype) -> torch.Tensor | None:
    """|fl_d(W) − W| ≤ u_d·|W| + η_d/2: PEFT loading a wider base in the merged dtype rounds it first."""
    if exact_cast(base_dtype, d):
        return None
    return w64.abs().mul_(unit_roundoff(d) * _SLACK).add_(smallest_subnormal(d) / 2)


@dataclass
class _Step:
    """One LoRA change as :func:`_expect_block` applied it, for PEFT's replay around a later DoRA norm."""

    g: torch.Tensor  # G
    before: torch.Tensor  # E before it
    after: torch.Tensor  # E after it
    dora: _DoraStep | None = None


@dataclass
class _DoraStep:
    f: torch.Tensor  # m/‖W + ΔW‖, broadcastable
    x: torch.Tensor  # E before + ΔW
    nu: torch.Tensor  # ‖W + ΔW‖, broadcastable
    n: int  # elements in the norm
    dim: int  # the norm's axis in the [n, cols] block: 1 (rows) or 0 (columns)


def _replay(
    steps: list[_Step], beta: torch.Tensor, u: float, half_eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT (0.21.2) merges a DoRA adapter into a weight that already holds others by unmerging those
    (last first), taking the norm of what is left (W̃ ≈ W) and merging them again
    (``LoraLayer._unmerged_base_weight``): each step rounds once more. Returns (β of the value merged
    again, β of W̃). Unmerging DoRA divides by f (the cached norm: f's own error δ·|x|) and subtracts
    ΔW in float32; merging DoRA again takes a new norm of W̃ + ΔW."""
    b = beta
    for st in reversed(steps):
        if st.dora is not None:
            dora = st.dora
            fa = dora.f.abs()
            delta_f = gamma(dora.n + 6) * _SLACK
            b = b / fa + delta_f * (dora.x.abs() + b / fa) + st.g + (dora.x.abs() + b / fa) * (2 * 2.0**-24)
        else:
            b = b + st.g
        b = b + (st.before.abs() + b) * u + half_eta
    b_w = b
    for st in steps:
        if st.dora is not None:
            dora = st.dora
            rel = torch.linalg.vector_norm(b_w + st.g, dim=dora.dim, keepdim=True) / dora.nu
            delta_f = gamma(dora.n + 6) * _SLACK + rel
            b = dora.f.abs() * (b + st.g + delta_f * (dora.x.abs() + b + st.g))
        else:
            b = b + st.g
        b = b + (st.after.abs() + b) * u + half_eta
    return b, b_w


def _expect_block(
    base: torch.Tensor,
    changes: Sequence[Change],
    d: torch.dtype,
    r0: int,
    r1: int,
    columns: dict[int, _Dora],
) -> _Expect:
    """E (float64) and β without the last rounding, for rows r0:r1, following each change in turn.

    With ``u = u_d·(1 + 2⁻¹⁰)``, ``η = η_d`` (d the merged dtype) and ``T = |w·s|·|B|·|A|`` per module:

    - start: E = W; β = β₀ = u·|W| + η/2 if d cannot hold the base's values (cast first), else 0;
    - replace R: E = R; β = u·|R| + η/2 if d cannot hold R's values, else 0;
    - lora_bias b: E += w·s·b; β += 2·γ₃·|w·s·b|;
    - LoRA: E += ΔW; β += G = 2·γ_{r+4}·T/(1 − γ_{r+1}) + 2(r+4)·η₃₂ (:func:`_gemm_error`); an
      embedding's update is rounded to the weight's dtype before it is added (PEFT): β += u·(|ΔW| + G) + η/2;
    - DoRA, f = m/‖W + ΔW‖ (float64; per row, or per column for Conv1D and embeddings):
      E = f·(E + ΔW); β = |f|·(β + G + δ·(|E + ΔW| + β + G)) with δ = γ_{n+6} + ‖β_W + G‖/‖W + ΔW‖
      over the norm's n elements (its sum of squares, sqrt, division, the add before it and the
      multiply after it; the perturbation of the norm by the update's error and by β_W, the error of
      the weight the norm is taken of: β₀, or after earlier adapters PEFT's replay, :func:`_replay`);
    - after every change but the last, the running value is rounded (PEFT: to the weight's dtype,
      the merged dtype at worst): β += u·(|E| + β) + η/2. The last rounding, c₁·ulp(M), is the caller's.
    """
    u = unit_roundoff(d) * _SLACK
    half_eta = smallest_subnormal(d) / 2
    w64 = _rows2d(base, r0, r1).to(torch.float64)
    beta0 = _base_cast_term(w64, base.dtype, d)
    e = w64.clone()
    beta = beta0.clone() if beta0 is not None else torch.zeros_like(w64)
    steps: list[_Step] = []
    last = len(changes) - 1
    for i, c in enumerate(changes):
        if c.kind == "replace":
            assert c.tensor is not None
            e = _rows2d(c.tensor, r0, r1).to(torch.float64)
            cast = _base_cast_term(e, c.tensor.dtype, d)
            beta = cast if cast is not None else torch.zeros_like(e)
            steps = []
        elif c.kind == "bias":
            assert c.module is not None
            bd = merge_ops.bias_delta(c.module, c.weight)[r0:r1].reshape(r1 - r0, -1).to(torch.float64)
            e = e + bd
            beta = beta + bd.abs() * (2.0 * gamma(3) * _SLACK)
        else:
            m = c.module
            assert m is not None
            delta = update_rows(m, c.weight, r0, r1).reshape(r1 - r0, -1).to(torch.float64)
            g = _gemm_term(m, c.weight, r0, r1)
            before = e
            if m.is_dora:
                b_w = beta0 if beta0 is not None else torch.zeros_like(w64)
                if steps:
                    beta, b_w = _replay(steps, beta, u, half_eta)
                dim = 0 if _dora_by_column(m) else 1
                n = _norm_length(base, m)
                if i in columns:
                    f, rel, nu = columns[i].factor, columns[i].rel, columns[i].nu
                else:  # rows, or columns of a block that is the whole tensor
                    nu = torch.linalg.vector_norm(w64 + delta, dim=dim, keepdim=True)
                    rel = torch.linalg.vector_norm(b_w + g, dim=dim, keepdim=True) / nu
                    mag = _magnitude(m)
                    f = (mag.view(1, -1) if dim == 0 else mag[r0:r1].view(-1, 1)) / nu
                delta_f = gamma(n + 6) * _SLACK + rel
                x = e + delta
                beta = f.abs() * (beta + g + delta_f * (x.abs() + beta + g))
                e = f * x
                steps.append(_Step(g, before, e, _DoraStep(f, x, nu, n, dim)))
            else:
                e = e + delta
                beta = beta + g
                if m.kind == "embedding":
                    beta = beta + (delta.abs() + g) * u + half_eta
                steps.append(_Step(g, before, e))
        if i != last:
            beta = beta + (e.abs() + beta) * u + half_eta
    if len(changes) == 1 and changes[0].kind == "lora" and not changes[0].module.is_dora:  # type: ignore[union-attr]
        return _Expect(w64, delta, beta)  # E − W is the update itself: no cancellation
    return _Expect(w64, e - w64, beta)


def _magnitude(m: LoraModule) -> torch.Tensor:
    assert m.magnitude is not None
    return m.magnitude.to(torch.float64)


def _norm_length(base: torch.Tensor, m: LoraModule) -> int:
    """How many elements DoRA's norm adds up: a row's (linear, conv) or a column's (Conv1D, embedding)."""
    if _dora_by_column(m):
        return int(base.shape[0])
    return int(base[0].numel()) if base.dim() else 1


def _column_dora(
    base: torch.Tensor, changes: Sequence[Change], d: torch.dtype, step: int
) -> dict[int, _Dora]:
    """Prepass for DoRA modules whose norm runs down columns: the sums of squares of ``W + ΔW`` and of
    the norm's perturbation, per column, accumulated over row blocks in float64."""
    out: dict[int, _Dora] = {}
    todo = []
    earlier = False  # a LoRA change before this one (since the last replacement): PEFT replays it
    for i, c in enumerate(changes):
        if c.kind == "replace":
            earlier = False
        elif c.kind == "lora" and c.module is not None:
            if c.module.is_dora and _dora_by_column(c.module) and not earlier:
                todo.append((i, c.module))
            earlier = True
    if not todo:
        return out
    rows = base.shape[0]
    cols = base[0].numel()
    sums = {
        i: (torch.zeros(cols, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64)) for i, _ in todo
    }
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w64 = _rows2d(base, r0, r1).to(torch.float64)
        beta0 = _base_cast_term(w64, base.dtype, d)
        for i, m in todo:
            delta = update_rows(m, changes[i].weight, r0, r1).reshape(r1 - r0, -1).to(torch.float64)
            g = _gemm_term(m, changes[i].weight, r0, r1)
            pert = g if beta0 is None else g + beta0
            sx, sp = sums[i]
            sx += (w64 + delta).square().sum(dim=0)
            sp += pert.square().sum(dim=0)
    for i, m in todo:
        sx, sp = sums[i]
        nu = sx.sqrt()
        out[i] = _Dora((_magnitude(m) / nu).view(1, -1), (sp.sqrt() / nu).view(1, -1), nu.view(1, -1))
    return out


def _block_rows(base: torch.Tensor, changes: Sequence[Change]) -> int:
    """Rows per block: about :data:`.merge.CHUNK_ELEMENTS` elements; the whole tensor when PEFT's replay
    (:func:`_replay`) takes a norm down the columns of a weight that other adapters changed first."""
    rows = base.shape[0] if base.dim() else 1
    earlier = column = replay = False
    for c in changes:
        if c.kind == "replace":
            earlier = False
        elif c.kind == "lora" and c.module is not None:
            column |= c.module.is_dora and _dora_by_column(c.module)
            replay |= c.module.is_dora and earlier
            earlier = True
    if column and replay:
        return rows
    return merge_ops.row_block(max(1, base.numel() // max(1, rows)))


def expected_and_bound(
    merged: torch.Tensor, base: torch.Tensor, changes: Sequence[Change]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole tensor's E (float64) and elementwise bound β (float64), shaped like ``base``: what
    :func:`check_changed` compares block by block (for tests and diagnostics; it holds whole tensors)."""
    rows = base.shape[0] if base.dim() else 1
    step = _block_rows(base, changes)
    b = base if base.dim() else base.reshape(1)
    mm = merged if merged.dim() else merged.reshape(1)
    columns = _column_dora(b, changes, merged.dtype, step)
    es, bs = [], []
    c1 = final_rounding_constant(merged.dtype)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        ex = _expect_block(b, changes, merged.dtype, r0, r1, columns)
        es.append(ex.expected)
        bs.append(ex.bound + c1 * ulp(_rows2d(mm, r0, r1)))
    return torch.cat(es).reshape(base.shape), torch.cat(bs).reshape(base.shape)


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------
@dataclass
class _Tally:
    """Counts and float64 sums over row blocks (two halves of the rows add theirs up)."""

    elements: int = 0
    outside: int = 0
    nonfinite: int = 0
    max_excess: float = -math.inf
    max_abs: float = 0.0
    worst: int | None = None  # flat index of the largest excess
    s_rd: float = 0.0  # ⟨M − W, E − W⟩
    s_dd: float = 0.0  # ⟨E − W, E − W⟩
    s_rr: float = 0.0  # ⟨M − W, M − W⟩
    s_bb: float = 0.0  # ⟨β, β⟩
    s_bd: float = 0.0  # Σ (β·(E − W))²

    def add(self, o: _Tally) -> None:
        self.elements += o.elements
        self.outside += o.outside
        self.nonfinite += o.nonfinite
        if o.max_excess > self.max_excess:
            self.max_excess, self.worst = o.max_excess, o.worst
        self.max_abs = max(self.max_abs, o.max_abs)
        self.s_rd += o.s_rd
        self.s_dd += o.s_dd
        self.s_rr += o.s_rr
        self.s_bb += o.s_bb
        self.s_bd += o.s_bd


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _tally_block(tally: _Tally, m_blk: torch.Tensor, ex: _Expect, c1: float, offset: int) -> None:
    """Add one row block's comparison of M with E and its sums to ``tally``."""
    r = m_blk.to(torch.float64).sub_(ex.base)  # M − W
    change = ex.change
    err = (r - change).abs_()  # |M − E|
    beta = ulp(m_blk).mul_(c1).add_(ex.bound)
    if not bool(torch.isfinite(err).all()):  # NaN/inf in M, W or E: the careful way
        _tally_nonfinite(tally, m_blk, ex, beta, offset)
        return
    excess = err - beta
    k = int(torch.argmax(excess.reshape(-1)))
    top = float(excess.reshape(-1)[k])
    tally.elements += err.numel()
    tally.outside += int((excess > 0).sum())
    if top > tally.max_excess:
        tally.max_excess, tally.worst = top, offset + k
    tally.max_abs = max(tally.max_abs, float(err.max()))
    tally.s_rd += _dot(r, change)
    tally.s_dd += _dot(change, change)
    tally.s_rr += _dot(r, r)
    tally.s_bb += _dot(beta, beta)
    bd = beta.mul_(change)
    tally.s_bd += _dot(bd, bd)


def _tally_nonfinite(
    tally: _Tally, m_blk: torch.Tensor, ex: _Expect, beta: torch.Tensor, offset: int
) -> None:
    """:func:`_tally_block` for a block with NaN or ±inf somewhere: non-finite merged values where the
    expected value is finite are counted (unless a correct merge may overflow there: |E| + β beyond
    the dtype's largest value, same sign); where the expected value is not finite (the base holds
    NaN/inf), the merged value must not be finite either; sums over the finite elements only."""
    m64 = m_blk.to(torch.float64)
    e = ex.expected
    fin_m, fin_e = torch.isfinite(m64), torch.isfinite(e)
    both = fin_m & fin_e & torch.isfinite(ex.base)
    big = float(torch.finfo(m_blk.dtype).max)
    may_overflow = fin_e & torch.isinf(m64) & ((e.abs() + beta) >= big) & (torch.sign(m64) == torch.sign(e))
    err = torch.where(both, (m64 - e).abs(), 0.0)
    excess = torch.where(both, err - beta, -math.inf)
    out = (excess > 0) | (~fin_e & fin_m)
    tally.elements += m64.numel()
    tally.outside += int(out.sum())
    tally.nonfinite += int((fin_e & ~fin_m & ~may_overflow).sum())
    k = int(torch.argmax(excess.reshape(-1)))
    top = float(excess.reshape(-1)[k])
    if top > tally.max_excess:
        tally.max_excess, tally.worst = top, offset + k
    tally.max_abs = max(tally.max_abs, float(err.max()))
    r = torch.where(both, m64 - ex.base, 0.0)
    change = torch.where(both, ex.change, 0.0)
    bb = torch.where(both, beta, 0.0)
    tally.s_rd += _dot(r, change)
    tally.s_dd += _dot(change, change)
    tally.s_rr += _dot(r, r)
    tally.s_bb += _dot(bb, bb)
    bd = bb.mul_(change)
    tally.s_bd += _dot(bd, bd)


def _abs_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """|A| and |B| in float32, kept on the module (the bound needs them for every block)."""
    key = (m.down.data_ptr(), m.up.data_ptr())
    cached = m.__dict__.get("_abs_factors")
    if cached is None or cached[0] != key:
        a, b = _factors(m, absolute=True)
        cached = m.__dict__["_abs_factors"] = (key, a, b)
    return cached[1], cached[2]


def _single(changes: Sequence[Change]) -> LoraModule | None:
    """The module, when the changes are one plain LoRA module on a 2-D weight (the common case)."""
    if len(changes) != 1 or changes[0].kind != "lora":
        return None
    m = changes[0].module
    if m is None or m.is_dora or m.kind == "conv":
        return None
    return m


def _tally_single(
    tally: _Tally,
    m_blk: torch.Tensor,
    w_blk: torch.Tensor,
    m: LoraModule,
    weight: float,
    r0: int,
    r1: int,
    c1: float,
    offset: int,
) -> bool:
    """:func:`_expect_block` and :func:`_tally_block` for one plain LoRA module, in place in this thread's
    scratch blocks (fresh memory per operation costs page faults) and without the NaN handling:
    returns False, leaving ``tally`` alone, when something is not finite (the caller goes the careful way)."""
    n, cols = m_blk.shape
    d = m_blk.dtype
    u = unit_roundoff(d) * _SLACK
    half_eta = smallest_subnormal(d) / 2
    f64 = torch.float64
    delta = merge_ops._scratch("v-delta", (n, cols), f64)
    beta = merge_ops._scratch("v-beta", (n, cols), f64)
    r = merge_ops._scratch("v-r", (n, cols), f64)
    err = merge_ops._scratch("v-err", (n, cols), f64)
    s = m.scale * weight
    rho, alpha = _gemm_error(m)
    if m.kind == "linear" and not m.fan_in_fan_out:
        a, b = merge_ops._factors32(m)
        aa, ba = _abs_factors(m)
        p32 = merge_ops._scratch("v-p32", (n, cols), a.dtype)
        torch.mm(b[r0:r1], a, out=p32)
        delta.copy_(p32).mul_(s)  # the update in float64 from the float32 product (G covers both)
        torch.mm(ba[r0:r1], aa, out=p32)
        beta.copy_(p32).mul_(abs(s) * rho).add_(alpha)
    else:
        delta.copy_(update_rows(m, weight, r0, r1).reshape(n, cols))
        beta.copy_(update_rows(m, weight, r0, r1, absolute=True).reshape(n, cols)).mul_(rho).add_(alpha)
    if m.kind == "embedding":  # PEFT rounds the update to the weight's dtype before adding it
        err.copy_(delta).abs_().add_(beta).mul_(u).add_(half_eta)
        beta.add_(err)
    if not exact_cast(w_blk.dtype, d):  # the base cast to the merged dtype first
        err.copy_(w_blk).abs_().mul_(u).add_(half_eta)
        beta.add_(err)
    # c₁·ulp(M): the exponent field alone is 2^e (0 for zero and subnormals: + c₁·η covers those)
    itype, mask = _EXP[d]
    pow2 = merge_ops._scratch("v-pow2", (n, cols), itype)
    torch.bitwise_and(m_blk.view(itype), mask, out=pow2)
    beta.add_(pow2.view(d), alpha=c1 * 2.0 ** (1 - _P[d])).add_(c1 * smallest_subnormal(d))
    r.copy_(m_blk).sub_(w_blk)  # M − W
    torch.sub(r, delta, out=err).abs_()  # |M − E|
    if not math.isfinite(float(err.sum())):
        return False
    top_abs = float(err.max())
    excess = err.sub_(beta)
    top = float(excess.max())
    tally.elements += n * cols
    if top > 0:
        tally.outside += int(torch.count_nonzero(excess > 0))
    if top > tally.max_excess:
        tally.max_excess, tally.worst = top, offset + int(torch.argmax(excess.reshape(-1)))
    tally.max_abs = max(tally.max_abs, top_abs)
    tally.s_rd += _dot(r, delta)
    tally.s_dd += _dot(delta, delta)
    tally.s_rr += _dot(r, r)
    tally.s_bb += _dot(beta, beta)
    bd = beta.mul_(delta)
    tally.s_bd += _dot(bd, bd)
    return True


class _OneTorchThread:
    """torch at one thread inside (each half of the rows runs on its own thread, as the merge does:
    with more, every small op waits for a team of threads that a busy machine may not schedule)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


def _index(flat: int | None, shape: torch.Size) -> tuple[int, ...] | None:
    if flat is None:
        return None
    idx = []
    for n in reversed(shape):
        idx.append(flat % n)
        flat //= n
    return tuple(reversed(idx))


def _mismatched_shape(
    merged: torch.Tensor, base: torch.Tensor, modules: tuple[str, ...]
) -> TensorCheck | None:
    if tuple(merged.shape) != tuple(base.shape):
        return TensorCheck(
            MISMATCH, elements=merged.numel(), modules=modules,
            note=f"shape {list(merged.shape)}, the base's is {list(base.shape)}",
        )  # fmt: skip
    return None


def check_changed(
    merged: torch.Tensor, base: torch.Tensor, changes: Sequence[Change], *, exact: bool = True
) -> TensorCheck:
    """Is ``merged`` a correct merge of ``changes`` into ``base``?

    First the exact recomputation (:func:`exact_match`: PEFT's order, and a float32 merge cast once when
    the dtypes differ); then, only when the bits differ, every element against the rounding bound
    (:func:`_expect_block`, :func:`final_rounding_constant`) in row blocks, with the least-squares
    ratio and the verdict.

    Args:
        merged: the tensor of the merged model (its own dtype: bf16, fp16, fp32 or fp64).
        base: the base tensor (maybe another dtype; a 4-bit base: dequantized).
        changes: what the adapters do to it, in merge order (``api.Contribution``s: ``lora`` with a
            module and weight, ``bias``, ``replace`` with a tensor).
        exact: try the exact recomputation first (False: judge by the bound alone, as for a merge
            written by another tool).

    Returns:
        A :class:`TensorCheck`: ``ok`` (``exact`` names the order when the bits match), ``nan-inf``,
        ``not-merged``, ``wrong-scale`` (with ``ratio``) or ``mismatch``.
    """
    modules = _module_names(changes)
    bad = _mismatched_shape(merged, base, modules)
    if bad is not None:
        return bad
    if not merged.dtype.is_floating_point or merged.dtype not in _P:
        return TensorCheck(MISMATCH, elements=merged.numel(), modules=modules, note=f"dtype {merged.dtype}")
    if not changes:
        return check_untouched(merged, base)
    order = exact_match(merged, base, changes) if exact else None
    if order is not None:
        return TensorCheck(OK, exact=order, elements=merged.numel(), modules=modules)
    if any(c.kind == "expert" for c in changes):
        return _judge_experts(merged, base, modules)
    return _judge(merged, base, changes, modules)


def _judge_experts(merged: torch.Tensor, base: torch.Tensor, modules: tuple[str, ...]) -> TensorCheck:
    """The verdict on a tensor a LoRA on MoE experts changes whose bits are not a correct merge's: the
    rounding bound does not cover expert updates yet, so such a tensor is ``nan-inf``, ``not-merged``
    (equal to the base) or ``mismatch``, never ``ok`` by the bound."""
    n = merged.numel()
    nonfinite = int((~torch.isfinite(merged)).sum()) - int((~torch.isfinite(base.to(merged.dtype))).sum())
    if nonfinite > 0:
        return TensorCheck(NAN_INF, elements=n, nonfinite=nonfinite, modules=modules)
    if torch.equal(merged, base.to(merged.dtype)):
        return TensorCheck(NOT_MERGED, elements=n, modules=modules, note="equal to the base")
    return TensorCheck(
        MISMATCH,
        elements=n,
        modules=modules,
        note="not the bits of PEFT's merge of these expert LoRAs (checked exactly; no rounding bound for experts)",
    )


def _judge(
    merged: torch.Tensor, base: torch.Tensor, changes: Sequence[Change], modules: tuple[str, ...]
) -> TensorCheck:
    """Every element against the bound, the sums for the least-squares ratio, the verdict."""
    rows = base.shape[0] if base.dim() else 1
    b = base if base.dim() else base.reshape(1)
    mm = merged if merged.dim() else merged.reshape(1)
    cols = max(1, b.numel() // max(1, rows))
    step = _block_rows(b, changes)
    c1 = final_rounding_constant(merged.dtype)

    single = _single(changes)

    def rows_from(start: int, stop: int) -> _Tally:
        tally = _Tally()
        for r0 in range(start, stop, step):
            r1 = min(stop, r0 + step)
            m_blk = _rows2d(mm, r0, r1)
            if single is not None and _tally_single(
                tally, m_blk, _rows2d(b, r0, r1), single, changes[0].weight, r0, r1, c1, r0 * cols
            ):
                continue
            ex = _expect_block(b, changes, merged.dtype, r0, r1, columns)
            _tally_block(tally, m_blk, ex, c1, r0 * cols)
        return tally

    with _OneTorchThread():
        columns = _column_dora(b, changes, merged.dtype, step)
        parts = merge_ops._on_two_threads(rows, step, rows_from)
    total = parts[0]
    for p in parts[1:]:
        total.add(p)
    return _verdict(total, merged.shape, modules)


def _verdict(t: _Tally, shape: torch.Size, modules: tuple[str, ...]) -> TensorCheck:
    ratio = t.s_rd / t.s_dd if t.s_dd > 0 else None
    residual = None
    if ratio is not None:
        residual = math.sqrt(max(0.0, t.s_rr - t.s_rd * ratio)) / math.sqrt(t.s_dd)
    common = dict(
        ratio=ratio,
        residual=residual,
        outside=t.outside,
        elements=t.elements,
        max_excess=t.max_excess if math.isfinite(t.max_excess) else None,
        max_abs_diff=t.max_abs,
        worst=_index(t.worst, shape),
        nonfinite=t.nonfinite,
        modules=modules,
    )
    if t.nonfinite:
        return TensorCheck(NAN_INF, **common)  # type: ignore[arg-type]
    if t.outside == 0:
        return TensorCheck(OK, **common)  # type: ignore[arg-type]
    if t.s_rr == 0.0:
        return TensorCheck(NOT_MERGED, note="equal to the base", **common)  # type: ignore[arg-type]
    if ratio is None or residual is None:
        return TensorCheck(MISMATCH, note="the adapters change nothing here, yet it differs", **common)  # type: ignore[arg-type]
    # the fit explains M − W when what is left is within the rounding (the bound's norm, relative)
    rounding = math.sqrt(t.s_bb / t.s_dd)
    fits = residual <= rounding + 0.05 * abs(ratio)
    sigma = math.sqrt(t.s_bd) / t.s_dd
    if fits and abs(ratio) <= NOT_MERGED_RATIO:
        return TensorCheck(NOT_MERGED, **common)  # type: ignore[arg-type]
    if fits and abs(ratio - 1.0) > SCALE_SIGMAS * sigma:
        return TensorCheck(WRONG_SCALE, **common)  # type: ignore[arg-type]
    return TensorCheck(MISMATCH, **common)  # type: ignore[arg-type]


def check_untouched(merged: torch.Tensor, base: torch.Tensor) -> TensorCheck:
    """A tensor no adapter changes must be the base's, bit for bit, or the base cast to the merged
    dtype by ``Tensor.to`` (round to nearest even: how transformers' ``from_pretrained(dtype=)``, PEFT
    and ``loractl merge --dtype`` cast). NaNs compare equal to NaNs.

    Returns:
        ``ok`` (``exact``: ``base`` or ``cast``), ``nan-inf`` (non-finite where the base is finite) or
        ``stray-change`` with the count of differing elements (``outside``), the largest |M − W|
        (``max_abs_diff``) and where (``worst``).
    """
    bad = _mismatched_shape(merged, base, ())
    if bad is not None:
        return bad
    same_dtype = merged.dtype == base.dtype
    ref = base if same_dtype else base.to(merged.dtype)
    m, ref = merged.contiguous(), ref.contiguous()
    n = merged.numel()
    if torch.equal(_bits(m), _bits(ref)):
        return TensorCheck(OK, exact="base" if same_dtype else "cast", elements=n)
    rows = m.shape[0] if m.dim() else 1
    cols = max(1, n // max(1, rows))
    step = max(1, merge_ops.CHUNK_ELEMENTS // cols)
    mf, rf, bf = m.reshape(rows, cols), ref.reshape(rows, cols), base.contiguous().reshape(rows, cols)
    differ = nonfinite = 0
    max_abs, worst = 0.0, None
    floating = merged.dtype.is_floating_point and base.dtype.is_floating_point
    for r0 in range(0, rows, step):
        mc, rc = mf[r0 : r0 + step], rf[r0 : r0 + step]
        diff = (_bits(mc) != _bits(rc)).view(mc.shape)
        m64, b64 = mc.to(torch.float64), bf[r0 : r0 + step].to(torch.float64)
        if floating:
            diff &= ~(torch.isnan(m64) & torch.isnan(b64))
            nonfinite += int((~torch.isfinite(m64) & torch.isfinite(b64)).sum())
        k = int(diff.sum())
        if not k:
            continue
        differ += k
        gap = torch.where(diff & torch.isfinite(m64) & torch.isfinite(b64), (m64 - b64).abs(), -1.0)
        at = int(torch.argmax(gap.reshape(-1)))
        v = float(gap.reshape(-1)[at])
        if worst is None or v > max_abs:
            if v < 0:  # only non-finite differences here: point at the first
                at = int(torch.nonzero(diff.reshape(-1))[0])
            max_abs, worst = max(max_abs, v), r0 * cols + at
    if differ == 0:
        return TensorCheck(OK, exact="base" if same_dtype else "cast", elements=n)
    verdict = NAN_INF if nonfinite else STRAY_CHANGE
    return TensorCheck(
        verdict, outside=differ, elements=n, max_abs_diff=max_abs, worst=_index(worst, merged.shape),
        nonfinite=nonfinite,
    )  # fmt: skip


def missing_and_extra(merged: Iterable[str], base: Iterable[str]) -> tuple[list[str], list[str]]:
    """Tensor names of the base the merged model lacks (``missing``) and names it has that the base
    does not (``extra``), sorted."""
    m, b = set(merged), set(base)
    return sorted(b - m), sorted(m - b)
