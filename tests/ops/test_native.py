"""The native kernels (loractl/_kernels.c) against the torch and numpy code they stand in for, bit for bit.

- :func:`native.merge_block` against torch's rounding (``(w.float() + d).to(w.dtype)``, PEFT's ``W += ΔW``;
  ``w + d.to(w.dtype)``, PEFT's ``ParamWrapper``) and :func:`residual.encode_block` of torch's unmerge, on
  values chosen to hit every rounding case: random bit patterns, subnormals, ±0, ties, cancellation, a
  change of binade; block sizes off every vector width; in place; NaN/Inf refused;
- :func:`receipt.tensor_sum64` with and without the kernels;
- whole merges (dense bf16 and fp32, a MoE expert adapter) with ``LORACTL_NATIVE=0`` and without: the same
  shard and receipt bytes, the kernel path really taken, PEFT's bits, and unmerge exact.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, make_adapter, read_st, same_bits, save_peft_merged

from loractl import api, native
from loractl.io import receipt
from loractl.ops import residual

INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def test_the_kernels_are_built_where_a_compiler_is() -> None:
    """Every other test here needs the kernels: an install with a C compiler must have built them (so that
    none of this file is skipped in CI without anyone noticing)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here: loractl runs on its torch path (tested everywhere else)")
    assert native.library_path() is not None, "pip install -e . did not build loractl/_kernels.c"
    assert native.enabled()


@pytest.mark.skipif(native.library_path() is None, reason="kernels not built (see the test above)")
def test_a_library_built_from_another_source_is_not_used(tmp_path, monkeypatch) -> None:
    """A working tree whose _kernels.c changed after ``pip install -e .`` must not call the old library's
    functions (their arguments may have changed): the torch path is used until it is rebuilt."""
    assert native.enabled() and not native.stale()
    edited = tmp_path / "_kernels.c"
    edited.write_bytes(native.SOURCE.read_bytes() + b"/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.stale() and not native.enabled() and not native.merges(torch.bfloat16)
    monkeypatch.undo()
    assert native.enabled()


needs_kernels = pytest.mark.skipif(native.library_path() is None, reason="kernels not built (see the test above)")


def _values(dtype: torch.dtype, n: int, seed: int, scale_exp: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A base block ``w`` and a float32 update ``d`` mixing every rounding case."""
    g = torch.Generator().manual_seed(seed)
    it = INT[dtype]
    bits = torch.randint(torch.iinfo(it).min, torch.iinfo(it).max, (n,), generator=g, dtype=torch.int64).to(it)
    w = bits.view(dtype).clone()
    typical = (torch.randn(n, generator=g) * 0.02).to(dtype)
    pick = torch.rand(n, generator=g)
    pick[n // 2 :] = 0.0  # the second half: typical weights only (with small updates: differences far apart)
    w = torch.where(pick < 0.5, typical, w)
    w[~torch.isfinite(w)] = 0.0  # finite bases (NaN/Inf have their own test)
    w[pick > 0.97] = -0.0
    lo, hi = scale_exp
    exps = torch.randint(lo, hi, (n,), generator=g).float()
    d = torch.randn(n, generator=g) * torch.exp2(exps)
    wf = w.float()
    ulp = torch.where(wf == 0, torch.full_like(wf, 2.0**-133), wf.abs() * 2.0 ** -(8 if dtype == torch.bfloat16 else 24))
    tie = torch.rand(n, generator=g)
    tie[n // 2 :] = 1.0  # the special cases in the first half only: the second has differences far apart
    d = torch.where(tie < 0.05, ulp / 2, d)  # ties (about: ulp here is |w|·2^-p, a tie for w a power of two)
    d = torch.where((tie > 0.05) & (tie < 0.08), -wf, d)  # cancellation to ±0
    d = torch.where((tie > 0.08) & (tie < 0.1) & (wf.abs() < 2.0**100), wf * 3, d)  # a change of binade
    d[n // 2 :: 700] = 1.37  # a few updates that swamp their weight, far apart: differences with big gaps
    d[~torch.isfinite(d)] = 0.0
    return w, d


def _reference(w: torch.Tensor, d: torch.Tensor, round_d: bool) -> tuple[torch.Tensor, residual.Chunk | None]:
    """torch's merge and unmerge of the block, and numpy's encoding of where the unmerge misses w."""
    if round_d:
        dd = d.to(w.dtype)
        m = w + dd
        r = m - dd
    else:
        m = (w.float() + d).to(w.dtype)
        r = (m.float() - d).to(w.dtype)
    return m, residual.encode_block(residual.bits(w).numpy(), residual.bits(r).numpy(), 0)


def _same_chunk(got: tuple, want: residual.Chunk | None) -> None:
    if want is None:
        assert got == ()
        return
    first, last, gap8, gapbig, d8, valbig = got
    assert (first, last) == (want.first, want.last)
    for a, b in ((gap8, want.gap8), (gapbig, want.gapbig), (d8, want.d8), (valbig, want.valbig)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "where",
    [
        [300, 554, 810, 1065],  # the first difference past the first gap byte's reach; gaps of 253, 255, 254
        [0, 255, 511, 512, 575, 576, 639, 640],  # first at 0; the edges of the sub-blocks and of their words
        [1000, 3000],  # the first in the second sub-block, the next in a later one
        [4095],  # the last element alone
    ],
    ids=["first-far", "edges", "sparse", "last"],
)
def test_merge_block_encodes_differences_wherever_they_are(dtype, where) -> None:
    n = 4096
    w = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    d = torch.zeros(n)  # no difference anywhere (w + 0 - 0 is w) ...
    d[where] = 1.37  # ... but where an update swamps its weight
    want_m, want_chunk = _reference(w, d, False)
    assert want_chunk is not None and want_chunk.first == where[0] and want_chunk.last == where[-1]
    out = torch.empty_like(w)
    got = native.merge_block(w, d, out, diffs=True)
    assert got is not None and same_bits(out, want_m)
    _same_chunk(got, want_chunk)


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 513, 4099, 70001])
@pytest.mark.parametrize(
    "dtype,round_d",
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)],
    ids=["bf16-add", "bf16-rounded-update", "fp32-add"],  # an update rounded to float32 is the update
)
@pytest.mark.parametrize("scale", [(-150, -20), (-40, 4)], ids=["small-updates", "large-updates"])
def test_merge_block_is_torchs_merge_and_encoding(n, dtype, round_d, scale) -> None:
    w, d = _values(dtype, n, seed=n, scale_exp=scale)
    want_m, want_chunk = _reference(w, d, round_d)
    out = torch.empty_like(w)
    got = native.merge_block(w, d, out, round_d=round_d, diffs=True)
    assert got is not None
    assert same_bits(out, want_m)
    _same_chunk(got, want_chunk)
    # the cases the data was made for did occur
    if n >= 4099:
        assert want_chunk is not None and want_chunk.d8.size > 10
        if scale == (-150, -20):
            assert want_chunk.gapbig.size > 0  # differences far apart
        else:
            assert (want_chunk.d8 == -128).any()  # and differences of more than 127 units
    # without diffs: the same merge, nothing else
    out2 = torch.empty_like(w)
    assert native.merge_block(w, d, out2, round_d=round_d, diffs=False) == ()
    assert same_bits(out2, want_m)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_merge_block_in_place(dtype) -> None:
    """``out`` may be ``w``: each element is read before it is written, and the corrections still name w's
    original bits."""
    w, d = _values(dtype, 5000, seed=3, scale_exp=(-40, 4))
    want_m, want_chunk = _reference(w, d, False)
    got = native.merge_block(w, d, w, diffs=True)
    assert got is not None and same_bits(w, want_m)
    _same_chunk(got, want_chunk)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bad", ["nan-update", "inf-update", "overflow"])
def test_merge_block_refuses_a_non_finite_result(dtype, bad) -> None:
    w, d = _values(dtype, 3000, seed=5, scale_exp=(-30, -10))
    if bad == "nan-update":
        d[2999] = float("nan")
    elif bad == "inf-update":
        d[1234] = float("-inf")
    else:
        w[700] = torch.finfo(dtype).max
        d[700] = torch.finfo(torch.float32).max
    assert native.merge_block(w, d, torch.empty_like(w), diffs=True) is None
    assert native.merge_block(w, d, torch.empty_like(w), diffs=False) is None


@needs_kernels
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 1001, (1 << 20) + 3])
def test_sum64_native_and_numpy_agree(n, monkeypatch) -> None:
    t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(torch.bfloat16)
    fast = receipt.tensor_sum64(t)
    monkeypatch.setenv("LORACTL_NATIVE", "0")
    assert receipt.tensor_sum64(t) == fast
    t[n // 2 :] = t[n // 2 :].flip(0)  # a reordering changes the second sum
    if n > 8 and not torch.equal(t, t.flip(0)):
        assert receipt.tensor_sum64(t) != fast


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _merge_both_ways(base: Path, adapters: list[Path], tmp: Path, monkeypatch) -> dict[str, bytes]:
    """Merge with the kernels (counting their calls) and without; the two outputs, receipts included, must be
    the same bytes. Returns the kernel path's files."""
    calls = []
    real = native.merge_block
    monkeypatch.setattr(native, "merge_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    api.merge(base, adapters, tmp / "native")
    assert calls, "the merge did not take the kernel path"
    monkeypatch.setenv("LORACTL_NATIVE", "0")
    calls.clear()
    api.merge(base, adapters, tmp / "torch")
    assert not calls
    monkeypatch.delenv("LORACTL_NATIVE")
    got, want = _files(tmp / "native"), _files(tmp / "torch")
    assert got.keys() == want.keys()
    assert [k for k in got if got[k] != want[k]] == []
    return got


def _is_peft_and_comes_back(base: Path, ad: Path, want: dict[str, torch.Tensor], tmp: Path) -> None:
    """The kernel path's merge (``tmp/native``) has PEFT's bits (``want``), and unmerge with its receipt
    gives back the base bit for bit."""
    got = read_st(tmp / "native")
    assert [k for k in want if not same_bits(got[k], want[k])] == []
    assert api.unmerge(tmp / "native", [ad], tmp / "back").exact
    back, orig = read_st(tmp / "back"), read_st(base)
    assert [k for k in orig if not same_bits(back[k], orig[k])] == []


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dense_merge_is_the_same_bytes_with_and_without_kernels(dtype, tmp_path, monkeypatch) -> None:
    """A llama whose layers are wide enough for several row blocks: the same shards and receipt either way,
    PEFT's merged tensors, and unmerge with the receipt gives the base back."""
    model = build_model("llama", dtype, hidden_size=256, intermediate_size=640, num_attention_heads=4, num_key_value_heads=4)
    base = tmp_path / "base"
    model.save_pretrained(base)
    ad = make_adapter(model, tmp_path / "ad", r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], std=0.05)
    _merge_both_ways(base, [ad], tmp_path, monkeypatch)
    _is_peft_and_comes_back(base, ad, read_st(save_peft_merged(base, [ad], dtype, "llama", tmp_path / "peft")), tmp_path)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_expert_merge_is_the_same_bytes_with_and_without_kernels(dtype, tmp_path, monkeypatch) -> None:
    """One adapter on Mixtral's experts (one update per per-expert tensor: the kernel's case): the same bytes
    either way, PEFT's merge, and the base back from the receipt."""
    from moe_factories import build_moe, make_moe_adapter, peft_moe_merged, save_moe_base

    model = build_moe("mixtral", dtype)
    base = save_moe_base(model, tmp_path / "base")
    ad = make_moe_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    _merge_both_ways(base, [ad], tmp_path, monkeypatch)
    _is_peft_and_comes_back(base, ad, read_st(peft_moe_merged(base, [ad], dtype, "mixtral", tmp_path / "peft")), tmp_path)
