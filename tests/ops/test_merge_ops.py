"""The row-block merge's shortcuts give exactly PEFT's bits, and are not taken where they would not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loractl.adapter import LoraModule
from loractl.ops import merge as merge_ops
from loractl.ops import residual


def _module(scale_alpha: float, magnitude: float, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        name="m",
        kind="linear",
        down=torch.randn(4, 96, generator=g) * magnitude,
        up=torch.randn(200, 4, generator=g) * magnitude,
        alpha=scale_alpha,
    )


@pytest.mark.parametrize("alpha", [4.0, 8.0, 16.0, 6.0, 2.0])  # s = 1, 2, 4 (folded); 1.5, 0.5 (not)
def test_folded_scale_gives_peft_bits(alpha: float) -> None:
    m = _module(alpha, 0.05)
    ref = merge_ops.delta_weight(m)
    folded = merge_ops._fused_factors(m, 1.0)[2] is None
    assert folded == (alpha in (4.0, 8.0, 16.0))
    assert merge_ops.fused_product_equals(m, 1.0, ref)


def test_scale_is_not_folded_when_products_would_be_subnormal() -> None:
    """Factors so small that b·a underflows float32: PEFT's order loses bits there, folding would not,
    so the fold is refused (and the check against PEFT's product still holds)."""
    m = _module(16.0, 1e-20)  # |b·a| ≈ 1e-40 < 2^-126
    assert merge_ops._fused_factors(m, 1.0)[2] == 4.0
    assert merge_ops.fused_product_equals(m, 1.0, merge_ops.delta_weight(m))


def test_fold_decision_is_recomputed_for_new_factors() -> None:
    m = _module(16.0, 0.05)
    assert merge_ops._fused_factors(m, 1.0)[2] is None
    m.down = m.down * 1e-20  # new tensors: the cached decision must not be reused
    m.up = m.up * 1e-20
    assert merge_ops._fused_factors(m, 1.0)[2] == 4.0


def _receipt_case(stride: int, seed: int = 3) -> tuple[torch.Tensor, LoraModule]:
    """A bf16 weight with some tiny entries (so that a few differences are far beyond a unit in the
    last place: the escape path) and a module whose update is large next to them."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(200, 96, generator=g)
    w0.view(-1)[::stride] *= 1e-6
    return w0.to(torch.bfloat16), _module(8.0, 0.3, seed=seed + 1)


@pytest.mark.parametrize(("scale", "stride"), [(1.0, 37), (1e-3, 401)])  # dense; sparse (gaps over 255)
def test_fused_merge_in_place_with_residual_gives_the_receipts_corrections(
    monkeypatch, scale, stride
) -> None:
    """Merging in place, block by block on two threads (row blocks of 32 rows), still gives PEFT's bits
    and, encoded as it goes, exactly the corrections the whole-tensor encoder derives from the original
    and an unmerge's result; and they turn that result back into the original."""
    monkeypatch.setattr(merge_ops, "CHUNK_ELEMENTS", 96 * 32)
    assert merge_ops.row_block(96) == 32
    w0, m = _receipt_case(stride)
    m.up = m.up * scale
    expected = w0.clone()
    expected += merge_ops.delta_weight(m)  # PEFT's W += ΔW
    w = w0.clone()
    parts = merge_ops.fused_merge(w, m, 1.0, out=w, residual=True)
    assert torch.equal(w.view(torch.int16), expected.view(torch.int16))
    back = (w.float() - merge_ops.delta_weight(m)).to(torch.bfloat16)  # unmerge without a receipt
    oracle = residual.encode(w0, back)
    assert parts is not None and sorted(parts) == sorted(oracle) == ["d8", "gap8", "gapbig", "valbig"]
    for k in oracle:
        assert parts[k].dtype == oracle[k].dtype and torch.equal(parts[k], oracle[k]), k
    assert parts["valbig"].numel() > 0  # the escape path was taken
    if scale < 1:
        assert parts["gapbig"].numel() > 0  # and gaps too long for a byte
    fixed = residual.decode(back.clone(), parts)
    assert torch.equal(fixed.view(torch.int16), w0.view(torch.int16))


def test_residual_join_across_blocks_and_whole_tensor_fallback() -> None:
    """Chunks join with the gap between blocks computed from the previous block's last difference
    (a gap of 255 or more included); None when the whole original is smaller."""
    rng = np.random.default_rng(0)
    orig = rng.integers(-3000, 3000, 4000).astype(np.int16)
    rec = orig.copy()
    where = np.array([3, 10, 600, 601, 1500, 3999])
    rec[where] += np.array([1, -2, 200, 1, -1, 1], dtype=np.int16)
    chunks = [residual.encode_block(orig[i : i + 500], rec[i : i + 500], i) for i in range(0, 4000, 500)]
    parts = residual.join([c for c in chunks if c is not None], 4000, torch.bfloat16)
    t_orig = torch.from_numpy(orig).view(torch.bfloat16)
    oracle = residual.encode(t_orig, torch.from_numpy(rec).view(torch.bfloat16))
    assert parts is not None
    for k in oracle:
        assert torch.equal(parts[k], oracle[k]), k
    assert parts["gapbig"].tolist() == [589, 898, 2498]
    everything = residual.encode_block(orig, orig + 1, 0)
    assert everything is not None and residual.join([everything], 4000, torch.bfloat16) is None
    assert residual.join([], 4000, torch.bfloat16) == {}


def test_rounded_add_is_torchs_mixed_dtype_add_bit_for_bit() -> None:
    """ops.merge._rounded (widen, add in float32, narrow) gives the bits of torch.add(w, d, out=o) for
    half-precision w and float32 d, for every magnitude, signed zeros, infinities, NaN and subnormals."""
    from loractl.ops.merge import _rounded

    g = torch.Generator().manual_seed(0)
    specials_w = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 6.0e4]
    specials_d = [-0.0, 0.0, 1.0, -1.0, 1.0, 1e-41, 1e-45, 1e38]
    for dtype, exps in ((torch.bfloat16, range(-40, 38, 7)), (torch.float16, range(-8, 5))):
        for e in exps:
            w = (torch.randn(64, 257, generator=g) * 10.0**e).to(dtype)
            d = torch.randn(64, 257, generator=g) * 10.0**e * torch.rand(64, 257, generator=g)
            w.view(-1)[:8] = torch.tensor(specials_w).to(dtype)
            d.view(-1)[:8] = torch.tensor(specials_d)
            for subtract in (False, True):
                ref = torch.empty_like(w)
                (torch.sub if subtract else torch.add)(w, d, out=ref)
                got = _rounded(w, d, torch.empty_like(w), subtract=subtract)
                assert ref.dtype == dtype and torch.equal(ref.view(torch.int16), got.view(torch.int16))
