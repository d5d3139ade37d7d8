"""loractl.ops.verify: loractl's and PEFT's merges pass (bit for bit, and by the rounding bound alone);
a module left unmerged, a merge at the wrong weight, a stray change and a NaN are found and named.

Merged models are real: ``api.merge`` and PEFT's ``merge_and_unload`` over tiny transformers models
(tests/conftest.py); the checks run tensor by tensor as ``loractl verify`` will.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, peft_merged, read_st, same_bits, save_base

from loractl import api
from loractl.adapter import LoraModule
from loractl.io.base import open_base
from loractl.ops import merge as merge_ops
from loractl.ops import verify
from loractl.plan import plan_merge

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # name: (arch, model overrides, LoraConfig kwargs)
    "llama-plain": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    "llama-rslora": (
        "llama",
        {},
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    ),
    "llama-patterns": (
        "llama",
        {},
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_ALL,
            rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
            alpha_pattern={r"layers\.0\..*proj": 3, "up_proj": 5},
        ),
    ),
    "llama-dora": (
        "llama",
        {},
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    ),
    "llama-embedding": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-embedding-dora": (
        "llama",
        {},
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"]),
    ),
    "llama-lora-bias": (
        "llama",
        {"attention_bias": True},
        dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]),
    ),
    "llama-modules-to-save": (
        "llama",
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
    "gpt2-fan-in-fan-out": (
        "gpt2",
        {},
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
    "gpt2-dora": (
        "gpt2",
        {},
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn"]),
    ),
}


def _setup(tmp_path: Path, case: str, dtype: torch.dtype, n_adapters: int = 1, **model_over):
    arch, over, lora = CASES[case]
    model = build_model(arch, dtype, seed=0, **{**over, **model_over})
    base = save_base(model, tmp_path / "base")
    adapters = [make_adapter(model, tmp_path / f"ad{i}", seed=10 + i, **lora) for i in range(n_adapters)]
    return arch, base, adapters


def _peft(base: Path, adapters: list[Path], dtype: torch.dtype, arch: str) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, tensors by the names the base has (save_pretrained leaves out a tied
    head, GPT-2's ``lm_head.weight``, which the state dict lists)."""
    names = read_st(base).keys()
    state = peft_merged(base, adapters, dtype, arch).state_dict()
    return {k: state[k].contiguous() for k in names}


def _changes(base: Path, adapters: list[Path], weights: list[float] | None = None) -> dict[str, list]:
    """What each base tensor gets, as the merge plans it (loractl.plan.plan_merge)."""
    loaded = [api.load_adapter(a) for a in adapters]
    with open_base(base) as b:
        plan = plan_merge(b, loaded, weights or [1.0] * len(loaded))
    assert not plan.unmatched
    return plan.changes


def _verify(
    merged: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    changes: dict[str, list],
    exact: bool = True,
) -> dict[str, verify.TensorCheck]:
    """Every tensor of the base checked, as ``loractl verify`` will: changed ones against their changes."""
    missing, extra = verify.missing_and_extra(merged, base)
    assert (missing, extra) == ([], [])
    out = {}
    for k, w in base.items():
        m = merged[k].contiguous()
        out[k] = (
            verify.check_changed(m, w, changes[k], exact=exact)
            if k in changes
            else verify.check_untouched(m, w)
        )
    return out


def _assert_all_ok(
    checks: dict[str, verify.TensorCheck], changed: dict[str, list], exact: str | None
) -> None:
    for k, c in checks.items():
        assert c.ok, (k, c)
        if k in changed:
            assert c.exact == exact, (k, c)
            if exact is None:  # judged by the bound: every element within it
                assert c.outside == 0 and c.max_excess <= 0, (k, c)


# --------------------------------------------------------------------------------------------
# correct merges pass
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_accepts_loractl_and_peft_merges(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    """loractl's merge and PEFT's merge_and_unload: every changed tensor matches PEFT's order bit for bit,
    every other tensor is the base's; judged by the rounding bound alone they pass too."""
    arch, base, adapters = _setup(tmp_path, case, dtype)
    api.merge(base, adapters, tmp_path / "merged", receipt=False)
    ours = read_st(tmp_path / "merged")
    theirs = _peft(base, adapters, dtype, arch)
    before = read_st(base)
    changes = _changes(base, adapters)
    assert changes
    for merged in (ours, theirs):
        _assert_all_ok(_verify(merged, before, changes), changes, exact=verify.PEFT_ORDER)
        for k, ch in changes.items():  # the bound alone (how another tool's merge is judged)
            c = verify.check_changed(merged[k], before[k], ch, exact=False)
            assert c.ok and c.outside == 0, (k, c)
    # the exact recomputation is the merge's own arithmetic (ops.merge.merged_tensor), bit for bit
    for k, ch in changes.items():
        assert same_bits(verify.peft_order(before[k], ch, dtype), merge_ops.merged_tensor(before[k], ch, dtype)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_adapters_merged_in_turn(tmp_path: Path, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", dtype, n_adapters=2)
    api.merge(base, adapters, tmp_path / "merged", weights=[0.7, 1.3], receipt=False)
    changes = _changes(base, adapters, [0.7, 1.3])
    before = read_st(base)
    _assert_all_ok(_verify(read_st(tmp_path / "merged"), before, changes), changes, verify.PEFT_ORDER)
    theirs = _peft(base, adapters, dtype, arch)
    one_one = _changes(base, adapters)
    _assert_all_ok(_verify(theirs, before, one_one), one_one, verify.PEFT_ORDER)
    _assert_all_ok(_verify(theirs, before, one_one, exact=False), one_one, None)


@pytest.mark.parametrize("case", ["llama-dora", "gpt2-dora"])
def test_accepts_peft_merging_two_dora_adapters_in_turn(tmp_path: Path, case: str) -> None:
    """PEFT merges a DoRA adapter into a weight that holds another by unmerging it, taking the norm and
    merging it again (``_unmerged_base_weight``): more roundings than loractl's order, so other bits.
    The exact check replays PEFT (``peft``) and loractl (``loractl``); the bound alone accepts both
    (rows for Llama, columns of GPT-2's Conv1D: the whole tensor at once)."""
    for dtype in (torch.float32, torch.bfloat16):
        arch, base, adapters = _setup(tmp_path / str(dtype), case, dtype, n_adapters=2)
        theirs, before, changes = _peft(base, adapters, dtype, arch), read_st(base), _changes(base, adapters)
        assert all(verify.replays(c) for c in changes.values())
        _assert_all_ok(_verify(theirs, before, changes), changes, verify.PEFT_ORDER)
        _assert_all_ok(_verify(theirs, before, changes, exact=False), changes, None)
        api.merge(base, adapters, tmp_path / str(dtype) / "merged", receipt=False)
        ours = read_st(tmp_path / str(dtype) / "merged")
        checks = _verify(ours, before, changes)
        assert all(c.ok for c in checks.values())
        assert {checks[k].exact for k in changes} <= {verify.PEFT_ORDER, verify.LORACTL_ORDER}
        assert any(checks[k].exact == verify.LORACTL_ORDER for k in changes)  # bits PEFT does not write
        _assert_all_ok(_verify(ours, before, changes, exact=False), changes, None)


def _fp32_then_cast(
    base: dict[str, torch.Tensor], changes: dict[str, list], dtype: torch.dtype, accurate: bool
):
    """A merge computed in float32 (or, ``accurate``, its update in float64: another GEMM's bits) and
    cast once to ``dtype``: how mergekit or a hand-written merge does it."""
    out = {}
    for k, w in base.items():
        if k not in changes:
            out[k] = w.to(dtype)
            continue
        acc = w.to(torch.float64 if accurate else torch.float32)
        for c in changes[k]:
            if c.kind == "replace":  # PEFT saved the embedding layer with the adapter
                acc = c.tensor.to(acc.dtype)
                continue
            m = c.module
            if accurate:
                m = LoraModule(
                    m.name, m.kind, m.down.double(), m.up.double(), m.alpha, m.rslora, m.fan_in_fan_out
                )
            acc = acc + verify.update_rows(m, c.weight, 0, w.shape[0]).to(acc.dtype)
        out[k] = acc.to(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accepts_a_merge_done_in_fp32_then_cast(tmp_path: Path, dtype: torch.dtype) -> None:
    """An embedding merged in float32 and cast once (PEFT rounds its update first: two roundings) has the
    ``fp32`` order's bits; a merge whose update has other bits (float64 here) is accepted by the bound."""
    arch, base, adapters = _setup(tmp_path, "llama-embedding", dtype)
    before, changes = read_st(base), _changes(base, adapters)
    checks = _verify(_fp32_then_cast(before, changes, dtype, accurate=False), before, changes)
    assert all(c.ok for c in checks.values())
    if dtype == torch.bfloat16:
        assert checks["model.embed_tokens.weight"].exact == verify.FP32_ORDER
    assert checks["model.layers.0.self_attn.q_proj.weight"].exact == verify.PEFT_ORDER  # the same bits
    other = _verify(_fp32_then_cast(before, changes, dtype, accurate=True), before, changes)
    assert all(c.ok for c in other.values()), other
    judged = [c for k, c in other.items() if k in changes and c.exact is None]
    if dtype == torch.float32:
        assert judged, "the float64 update should differ from PEFT's in some bits"
    assert all(c.outside == 0 for c in judged)


def test_bf16_merged_model_of_an_fp32_base(tmp_path: Path) -> None:
    """A base in another dtype than the merge: PEFT loading the fp32 checkpoint as bf16 and merging
    (``peft`` order: the base cast first), ``loractl merge --dtype bf16`` and an fp32 merge cast to bf16
    (``fp32`` order: merged in fp32, cast once); untouched tensors are the base cast by ``Tensor.to``.
    The reverse (bf16 base, ``--dtype fp32``) is the ``peft`` order."""
    arch, base, adapters = _setup(tmp_path, "llama-embedding", torch.float32)
    before, changes = read_st(base), _changes(base, adapters)
    peft_bf16 = {
        k: v.contiguous() for k, v in peft_merged(base, adapters, torch.bfloat16, arch).state_dict().items()
    }
    checks = _verify(peft_bf16, before, changes)
    _assert_all_ok(checks, changes, verify.PEFT_ORDER)
    assert all(checks[k].exact == "cast" for k in before if k not in changes)
    api.merge(base, adapters, tmp_path / "bf16", dtype="bf16", receipt=False)
    _assert_all_ok(_verify(read_st(tmp_path / "bf16"), before, changes), changes, verify.FP32_ORDER)
    peft_fp32 = _peft(base, adapters, torch.float32, arch)
    cast = {k: v.to(torch.bfloat16).contiguous() for k, v in peft_fp32.items()}
    _assert_all_ok(_verify(cast, before, changes), changes, verify.FP32_ORDER)
    for merged in (peft_bf16, cast):  # and both within the bound
        _assert_all_ok(_verify(merged, before, changes, exact=False), changes, None)
    # the two orders really differ somewhere, so the test tells them apart
    assert any(not same_bits(peft_bf16[k], cast[k]) for k in changes)

    _, base16, ads16 = _setup(tmp_path / "b16", "llama-plain", torch.bfloat16)
    api.merge(base16, ads16, tmp_path / "fp32", dtype="fp32", receipt=False)
    ch16 = _changes(base16, ads16)
    _assert_all_ok(_verify(read_st(tmp_path / "fp32"), read_st(base16), ch16), ch16, verify.PEFT_ORDER)


# --------------------------------------------------------------------------------------------
# what is wrong is found, and named
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_finds_a_module_left_unmerged(tmp_path: Path, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", dtype)
    api.merge(base, adapters, tmp_path / "merged", receipt=False)
    merged, before, changes = read_st(tmp_path / "merged"), read_st(base), _changes(base, adapters)
    key = "model.layers.1.self_attn.v_proj.weight"
    merged[key] = before[key].clone()
    checks = _verify(merged, before, changes)
    bad = {k: c for k, c in checks.items() if not c.ok}
    assert list(bad) == [key]
    assert bad[key].verdict == verify.NOT_MERGED
    assert bad[key].modules == ("model.layers.1.self_attn.v_proj",)
    assert bad[key].ratio == 0.0 and bad[key].outside > 0
    # PEFT #2586: a merge that left every weight as it was
    unchanged = _verify(before, before, changes)
    assert {c.verdict for k, c in unchanged.items() if k in changes} == {verify.NOT_MERGED}


def test_finds_dora_and_lora_bias_left_unmerged(tmp_path: Path) -> None:
    for case, key, verdict_module in [
        ("llama-dora", "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj"),
        ("llama-lora-bias", "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj"),
    ]:
        arch, base, adapters = _setup(tmp_path / case, case, torch.bfloat16)
        api.merge(base, adapters, tmp_path / case / "merged", receipt=False)
        merged, before, changes = read_st(tmp_path / case / "merged"), read_st(base), _changes(base, adapters)
        merged[key] = before[key].clone()
        checks = _verify(merged, before, changes)
        bad = {k: c for k, c in checks.items() if not c.ok}
        assert list(bad) == [key], (case, bad)
        assert bad[key].verdict == verify.NOT_MERGED and bad[key].modules == (verdict_module,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_2_checked_against_weight_1_is_a_wrong_scale(tmp_path: Path, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", dtype)
    api.merge(base, adapters, tmp_path / "merged", weights=[2.0], receipt=False)
    merged, before, changes = read_st(tmp_path / "merged"), read_st(base), _changes(base, adapters)
    checks = _verify(merged, before, changes)
    for k, c in checks.items():
        if k not in changes:
            assert c.ok
            continue
        assert c.verdict == verify.WRONG_SCALE, (k, c)
        assert c.ratio == pytest.approx(2.0, abs=1e-3), (k, c)
        assert c.modules == (k.removesuffix(".weight"),)
    # checked against the weight it was merged with, the same model passes
    _assert_all_ok(_verify(merged, before, _changes(base, adapters, [2.0])), changes, verify.PEFT_ORDER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_finds_a_stray_change_in_a_layernorm(tmp_path: Path, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", dtype)
    api.merge(base, adapters, tmp_path / "merged", receipt=False)
    merged, before, changes = read_st(tmp_path / "merged"), read_st(base), _changes(base, adapters)
    key = "model.layers.0.post_attention_layernorm.weight"
    assert key not in changes
    merged[key] = merged[key].clone()
    merged[key][5] += 0.25
    checks = _verify(merged, before, changes)
    bad = {k: c for k, c in checks.items() if not c.ok}
    assert list(bad) == [key]
    c = bad[key]
    assert c.verdict == verify.STRAY_CHANGE and c.outside == 1 and c.worst == (5,)
    assert c.max_abs_diff == pytest.approx(abs(float(merged[key][5]) - float(before[key][5])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_finds_a_nan(tmp_path: Path, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", dtype)
    api.merge(base, adapters, tmp_path / "merged", receipt=False)
    merged, before, changes = read_st(tmp_path / "merged"), read_st(base), _changes(base, adapters)
    q, norm = "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"
    merged[q] = merged[q].clone()
    merged[q][2, 7] = float("nan")
    merged[norm] = merged[norm].clone()
    merged[norm][3] = float("inf")
    for exact in (True, False):
        checks = _verify(merged, before, changes, exact=exact)
        bad = {k: c for k, c in checks.items() if not c.ok}
        assert set(bad) == {q, norm}
        assert bad[q].verdict == verify.NAN_INF and bad[q].nonfinite == 1
        assert bad[q].modules == ("model.layers.1.self_attn.q_proj",)
        assert bad[norm].verdict == verify.NAN_INF and bad[norm].nonfinite == 1 and bad[norm].worst == (3,)


def test_another_adapter_is_a_mismatch(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.bfloat16, n_adapters=2)
    api.merge(base, [adapters[1]], tmp_path / "merged", receipt=False)
    checks = _verify(read_st(tmp_path / "merged"), read_st(base), _changes(base, [adapters[0]]))
    changed = [c for c in checks.values() if c.modules]
    assert changed and all(c.verdict == verify.MISMATCH for c in changed), changed
    assert all(abs(c.ratio) < 0.5 and c.residual > 0.5 for c in changed)


def test_realistic_weights_wrong_scale_1_01_and_missing_module(tmp_path: Path, monkeypatch) -> None:
    """Weights of realistic size (|ΔW| about 1 % of |W|, rank 16, layers of a few hundred): PEFT's merge
    is within the bound everywhere (and equal bit for bit, found in row blocks); a merge at weight 1.01
    puts elements outside it in bf16 and fp32 and is named wrong-scale with its ratio; the base itself
    (a module left out) is not-merged."""
    calls = []
    real = verify._exact_row_blocks
    monkeypatch.setattr(verify, "_exact_row_blocks", lambda *a: calls.append(a[1].shape) or real(*a))
    sizes = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=1, num_attention_heads=4)
    for dtype in (torch.bfloat16, torch.float32):
        tmp = tmp_path / str(dtype)
        model = build_model("llama", dtype, num_key_value_heads=2, vocab_size=64, **sizes)
        base = save_base(model, tmp / "base")
        ad = make_adapter(
            model, tmp / "ad", std=0.025, r=16, lora_alpha=32, target_modules=["q_proj", "down_proj"]
        )
        before, changes = read_st(base), _changes(base, [ad])
        for k, ch in changes.items():
            delta = verify.update_rows(ch[0].module, 1.0, 0, before[k].shape[0])
            assert 0.005 < float(delta.norm() / before[k].float().norm()) < 0.02
        theirs = _peft(base, [ad], dtype, "llama")
        api.merge(base, [ad], tmp / "w101", weights=[1.01], receipt=False)
        wrong = read_st(tmp / "w101")
        for k, ch in changes.items():
            assert verify.check_changed(theirs[k], before[k], ch).exact == verify.PEFT_ORDER
            good = verify.check_changed(theirs[k], before[k], ch, exact=False)
            assert good.ok and good.outside == 0 and good.max_excess <= 0, (k, good)
            c = verify.check_changed(wrong[k], before[k], ch)
            assert c.verdict == verify.WRONG_SCALE and c.outside > 0 and c.max_excess > 0, (dtype, k, c)
            e, beta = verify.expected_and_bound(wrong[k], before[k], ch)  # the worst element is where it says
            gap = (wrong[k].double() - e).abs() - beta
            assert float(gap[c.worst]) == pytest.approx(c.max_excess) == float(gap.max())
            assert int((gap > 0).sum()) == c.outside
            assert c.ratio == pytest.approx(1.01, abs=2e-3)
            assert c.fraction > (0.01 if dtype == torch.bfloat16 else 0.9), (dtype, k, c)
            gone = verify.check_changed(before[k], before[k], ch)
            assert gone.verdict == verify.NOT_MERGED and gone.fraction > 0.5, (dtype, k, gone)
    assert calls, "the exact check should have run in row blocks"


# --------------------------------------------------------------------------------------------
# the bound itself: rigorous on adversarial values, and sharp
# --------------------------------------------------------------------------------------------
def _module(g: torch.Generator, kind: str, out_f: int, in_f: int, r: int, std: float, **kw) -> LoraModule:
    if kind == "embedding":  # weight [vocab=in_f, dim=out_f]: A [r, vocab], B [dim, r]
        a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    elif kind == "conv":
        k = kw.pop("k", 1)
        a, b = torch.randn(r, in_f, k, k, generator=g), torch.randn(out_f, r, 1, 1, generator=g)
    else:
        a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    return LoraModule("m", kind, a * std, b * std, alpha=kw.pop("alpha", 2.0 * r), **kw)


def _random_case(seed: int):
    """A random tensor, changes and merged dtype, with magnitudes from tiny updates to updates that cancel W."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    d = pick([torch.bfloat16, torch.float16, torch.float32])
    base_dtype = pick([d, torch.float32]) if d != torch.float32 else pick([torch.float32, torch.bfloat16])
    kind = pick(["linear", "linear-fifo", "embedding", "conv", "conv3"])
    out_f, in_f, r = 24, 40, pick([1, 4, 16])
    fifo = kind == "linear-fifo"
    mkind = {"linear-fifo": "linear", "conv3": "conv"}.get(kind, kind)
    extra = {"k": 3} if kind == "conv3" else {}
    rel = pick([1e-4, 1e-2, 1.0, 30.0])  # |ΔW| / |W|
    scale_w = pick([1.0, 1e-3] if d == torch.float16 else [1.0, 1e-3, 1e-30])
    # (DoRA's float32 norm of values near 1e-30 underflows to 0 in PEFT's own order: no correct merge)
    dora = pick([False, False, True]) and kind in ("linear", "linear-fifo", "embedding") and scale_w > 1e-20
    mods = []
    for _ in range(pick([1, 1, 2])):
        std = math.sqrt(rel * scale_w / (2 * math.sqrt(r)))
        m = _module(g, mkind, out_f, in_f, r, std, fan_in_fan_out=fifo, rslora=pick([False, True]), **extra)
        if dora:
            m = dataclasses.replace(m, magnitude=torch.rand(out_f, generator=g) + 0.5)
        mods.append(m)
    shape = mods[0].weight_shape
    w = torch.randn(shape, generator=g, dtype=torch.float64) * scale_w
    if pick([False, True]) and not dora:  # cancellation: W ≈ −ΔW in half the elements
        delta = sum(verify.update_rows(m, 1.0, 0, shape[0]).double() for m in mods)
        w = torch.where(torch.rand(shape, generator=g) < 0.5, -delta + w * 1e-3, w)
    w = w.to(base_dtype)
    changes = [merge_ops.Contribution(0, "lora", pick([1.0, 0.7, 1.3]), module=m) for m in mods]
    return w, changes, d


def _correct_merges(w: torch.Tensor, changes, d: torch.dtype) -> dict[str, torch.Tensor]:
    """Merges any correct tool may write: PEFT's order and the fp32-then-cast order, the exact sum
    rounded once, and an update from another GEMM (float64 product, scale folded into B) added in fp32."""
    out = {o.name: verify.peft_order(verify._prepare(w, o, d), changes, d) for o in verify.orders(w.dtype, d)}
    e, _ = verify.expected_and_bound(w.to(d), w, changes)
    out["rounded-once"] = e.to(d)
    if not any(c.module.is_dora for c in changes):
        acc = w.to(torch.float32)
        for c in changes:
            m = c.module
            s = m.scale * c.weight
            # the scale folded into B, scale 1 left: another product, other bits
            other = LoraModule(
                m.name, m.kind, m.down.double(), m.up.double() * s, m.rank, False, m.fan_in_fan_out
            )
            upd = verify.update_rows(other, 1.0, 0, w.shape[0]).float()
            if m.kind == "embedding" and w.dtype == d:  # rounded to the weight's dtype first, as PEFT does
                upd = upd.to(d)
            acc = acc + upd
        out["other-gemm"] = acc.to(d)
    return out


def test_correct_merges_are_always_within_the_bound() -> None:
    """Random tensors, dtypes (bf16, fp16, fp32 merged; base in the same or another dtype), layouts
    (linear, Conv1D, embedding, conv 1×1 and 3×3), ranks, scales (rsLoRA, weights), one or two
    adapters, DoRA, tiny and huge updates, updates cancelling W, values near the subnormals: every
    correct merge passes with every element within the bound."""
    worst = 0.0
    for seed in range(120):
        w, changes, d = _random_case(seed)
        for name, merged in _correct_merges(w, changes, d).items():
            c = verify.check_changed(merged, w, changes, exact=False)
            assert c.ok and c.outside == 0, (seed, name, d, w.dtype, changes[0].module.kind, c)
            e, beta = verify.expected_and_bound(merged, w, changes)
            fin = torch.isfinite(e)
            worst = max(worst, float(((merged.double() - e).abs()[fin] / beta[fin]).max()))
    assert 0.5 < worst <= 1.0  # the bound is reached within a factor of two


def test_bound_is_half_an_ulp_for_one_update_in_the_same_dtype() -> None:
    """Sharpness: one rank-16 update of realistic size: β is c₁·ulp(M), c₁ = ½ + 2⁻¹⁷ (bf16, double
    rounding through fp32) or ½ (fp32), plus the product's error term: far below an ulp in bf16,
    about one ulp in fp32."""
    g = torch.Generator().manual_seed(0)
    m = _module(g, "linear", 256, 512, 16, 0.025)
    assert verify.final_rounding_constant(torch.bfloat16) == pytest.approx(0.5 + 2**-17, rel=1e-9)
    assert verify.final_rounding_constant(torch.float32) == pytest.approx(0.5, rel=1e-7)
    for d in (torch.bfloat16, torch.float32):
        w = (torch.randn(256, 512, generator=g) * 0.5).to(d)
        changes = [merge_ops.Contribution(0, "lora", 1.0, module=m)]
        merged = verify.peft_order(w, changes, d)
        _, beta = verify.expected_and_bound(merged, w, changes)
        in_ulps = beta / verify.ulp(merged)
        # fp32: the worst-case product error 2·γ₂₀·|s|·|B|·|A| is itself about an ulp here
        slack = 0.01 if d == torch.bfloat16 else 1.5
        assert float(in_ulps.median()) < verify.final_rounding_constant(d) + slack


def test_ulp_is_the_spacing_above() -> None:
    """Exhaustively for bf16 (every finite non-negative value) and on samples for fp16, fp32, fp64."""
    pos = torch.arange(0, 0x7F7F, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    nxt = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(verify.ulp(pos), nxt.double() - pos.double())
    assert torch.equal(verify.ulp(-pos), verify.ulp(pos))
    h = torch.arange(0, 0x7BFF, dtype=torch.int32).to(torch.int16).view(torch.float16)
    hn = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert torch.equal(verify.ulp(h), hn.double() - h.double())
    for dt in (torch.float32, torch.float64):
        x = torch.cat([torch.tensor([0.0, 1e-45, 1e-310, 1.0, 3.0]), torch.randn(1000) * 1e3]).to(dt).abs()
        want = (torch.nextafter(x, torch.tensor(math.inf, dtype=dt)) - x).double()
        assert torch.equal(verify.ulp(x), want)


# --------------------------------------------------------------------------------------------
# the rest of the contract
# --------------------------------------------------------------------------------------------
def test_shape_dtype_names() -> None:
    g = torch.Generator().manual_seed(0)
    m = _module(g, "linear", 8, 6, 2, 0.1)
    ch = [merge_ops.Contribution(0, "lora", 1.0, module=m)]
    w = torch.randn(8, 6, generator=g)
    c = verify.check_changed(torch.zeros(6, 8), w, ch)
    assert c.verdict == verify.MISMATCH and "shape [6, 8]" in c.note
    assert verify.check_untouched(torch.zeros(3), torch.zeros(4)).verdict == verify.MISMATCH
    assert verify.check_untouched(torch.arange(5), torch.arange(5)).ok
    odd = verify.check_untouched(torch.tensor([0, 1, 7]), torch.arange(3))
    assert (
        odd.verdict == verify.STRAY_CHANGE
        and odd.outside == 1
        and odd.worst == (2,)
        and odd.max_abs_diff == 5
    )
    # a finer cast than round to nearest is not accepted: truncation toward zero is a stray change
    x = torch.tensor([1.0 + 2**-8 + 2**-12, -(1.0 + 2**-8 + 2**-12)])
    trunc = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert verify.check_untouched(x.to(torch.bfloat16), x).exact == "cast"
    assert verify.check_untouched(trunc, x).verdict == verify.STRAY_CHANGE
    assert verify.missing_and_extra(["a", "c"], ["a", "b"]) == (["b"], ["c"])
