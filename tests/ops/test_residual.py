"""Receipts: unmerge(merge(W)) = W bit for bit, for any dtype, shape, scale and adapter layout."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loractl.adapter import LoraModule
from loractl.ops import residual
from loractl.ops.merge import Contribution, merged_tensor, unmerged_tensor
from loractl.ops.merge import dora_factors as _dora_factors

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(1, 24),
    inp=st.integers(1, 24),
    rank=st.integers(1, 6),
    dtype=st.sampled_from(list(DT)),
    std=st.sampled_from([1e-4, 1e-2, 1.0]),
    alpha=st.floats(0.5, 64),
    weight=st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3),
    fifo=st.booleans(),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unmerge_of_merge_is_identity(out, inp, rank, dtype, std, alpha, weight, fifo, dora, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn((inp, out) if fifo else (out, inp), generator=g).to(DT[dtype])
    m = LoraModule(
        name="m",
        kind="linear",
        down=torch.randn(rank, inp, generator=g) * std,
        up=torch.randn(out, rank, generator=g) * std,
        alpha=alpha,
        fan_in_fan_out=fifo,
        magnitude=(torch.rand(out, generator=g) + 0.5) if dora else None,
    )
    contribs = [Contribution(0, "lora", weight, module=m)]
    merged = merged_tensor(w0, contribs, w0.dtype)
    factors = _dora_factors(w0, contribs)
    rec = unmerged_tensor(merged, contribs, w0.dtype, factors)
    parts = residual.encode(w0, rec)
    restored = residual.decode(unmerged_tensor(merged, contribs, w0.dtype, factors), parts)
    assert torch.equal(residual.bits(restored), residual.bits(w0))
    # the corrections are never larger than the tensor itself
    nbytes = sum(t.numel() * t.element_size() for t in parts.values())
    assert nbytes <= w0.numel() * w0.element_size()


def test_encode_is_empty_when_exact_and_sparse_when_few_differ() -> None:
    w = torch.randn(100, 100).to(torch.bfloat16)
    assert residual.encode(w, w.clone()) == {}
    r = w.clone()
    r.view(-1)[[3, 500, 9999]] += 1
    r.view(-1)[4000] = float("nan")  # far from the original: its value is kept whole
    parts = residual.encode(w, r)
    assert parts["gap8"].tolist() == [3, 255, 255, 255] and parts["gapbig"].tolist() == [496, 3499, 5998]
    assert (parts["d8"] == -128).sum() >= 1 and parts["valbig"].numel() == int((parts["d8"] == -128).sum())
    assert torch.equal(residual.bits(residual.decode(r.clone(), parts)), residual.bits(w))


def test_encode_keeps_whole_tensor_when_smaller() -> None:
    w = torch.randn(10, 10)
    parts = residual.encode(w, w + 1)
    assert set(parts) == {"full"} and torch.equal(parts["full"], w)
