"""The row-block merge's shortcuts give exactly PEFT's bits, and are not taken where they would not."""

from __future__ import annotations

import pytest
import torch

from loractl.adapter import LoraModule
from loractl.ops import merge as merge_ops


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


def test_fused_merge_in_place_with_residual_keeps_the_originals(monkeypatch) -> None:
    """Merging in place still reports, at every position an unmerge would miss (and only there), the
    original value; with row blocks of 32 rows, so both threads take part."""
    monkeypatch.setattr(merge_ops, "CHUNK_ELEMENTS", 96 * 32)
    assert merge_ops.row_block(96) == 32
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(200, 96, generator=g).to(torch.bfloat16)
    m = _module(8.0, 0.3, seed=4)
    expected = w0.clone()
    expected += merge_ops.delta_weight(m)  # PEFT's W += ΔW
    w = w0.clone()
    pos, rec_at, orig_at = merge_ops.fused_merge(w, m, 1.0, out=w, residual=True)
    assert torch.equal(w.view(torch.int16), expected.view(torch.int16))
    assert pos.numel() > 0
    assert torch.equal(orig_at.view(torch.int16), w0.view(-1)[pos].view(torch.int16))
    back = (w.float() - merge_ops.delta_weight(m)).to(torch.bfloat16).view(-1)
    assert torch.equal(rec_at.view(torch.int16), back[pos].view(torch.int16))
    differs = (back.view(torch.int16) != w0.view(-1).view(torch.int16)).nonzero().view(-1)
    assert torch.equal(differs, pos)
