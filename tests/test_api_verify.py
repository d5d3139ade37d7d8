"""``api.verify`` end to end on real merged folders: loractl's ``merge`` and PEFT's ``merge_and_unload`` +
``save_pretrained`` pass (bf16 and fp32, DoRA, rsLoRA, rank/alpha patterns, a base in another dtype,
a 4-bit base); a module left unmerged, a merge at weight 2 checked against weight 1, a stray change
in a norm, a NaN, a missing, extra or reshaped tensor are found, each named by its module.

The arithmetic of each tensor's check is tested in tests/ops/test_verify.py; here the files, the
plan, the streaming pairs and the findings.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, read_st, save_base, save_peft_merged
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.errors import InputError, ShapeMismatchError, UsageError

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # name: (arch, model overrides, LoraConfig kwargs)
    "plain": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    "rslora": (
        "llama",
        {},
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    ),
    "patterns": (
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
    "dora": ("llama", {}, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "lora-bias": (
        "llama",
        {"attention_bias": True},
        dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj"]),
    ),
    "modules-to-save": (
        "llama",
        {},
        dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    ),
    "gpt2-fan-in-fan-out": (  # Conv1D weights, and a tied head that save_pretrained leaves out
        "gpt2",
        {},
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn", "c_fc"]),
    ),
}
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])


def _setup(tmp: Path, case: str = "plain", dtype: torch.dtype = BF16, n: int = 1) -> tuple[Path, list[Path]]:
    arch, over, lora = CASES[case]
    model = build_model(arch, dtype, seed=0, **over)
    base = save_base(model, tmp / "base")
    return base, [make_adapter(model, tmp / f"ad{i}", seed=10 + i, **lora) for i in range(n)]


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the merged folder ``src`` with its tensors changed by ``edit`` (safetensors' own writer)."""
    shutil.copytree(src, dst)
    (f,) = dst.glob("*.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


def _by_code(r: api.VerifyResult) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in r.findings:
        out.setdefault(f.code, []).append(f)
    return out


# --------------------------------------------------------------------------------------------
# correct merges pass
# --------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_accepts_loractl_and_peft_merges(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    """Both hold exactly the bits of PEFT's order for every changed tensor (``lora_bias``: the bias too;
    ``modules_to_save``: the head replaced); the others are the base's."""
    base, ads = _setup(tmp_path, case, dtype)
    ours = tmp_path / "ours"
    merged = api.merge(base, ads, ours)  # with its receipt inside the folder: not a tensor of the model
    assert merged.receipt is not None
    theirs = save_peft_merged(base, ads, dtype, CASES[case][0], tmp_path / "peft")
    n = len(read_st(base))
    for folder in (ours, theirs):
        r = api.verify(folder, ads, base=base)
        assert r.ok and r.findings == [], (folder, r.findings)
        t = r.tensors
        assert (t.tensors, t.changed, t.exact, t.within_bound, t.failed) == (
            n,
            merged.tensors_changed,
            t.changed,
            0,
            0,
        )
        assert t.untouched == n - t.changed
        assert t.orders == {"base": n - t.changed, "peft": t.changed}
        assert r.adapters[0].sha256 == merged.adapters[0].sha256 and r.notes == []


def test_two_adapters_with_weights(tmp_path: Path) -> None:
    """Two adapters at weights 0.7 and 1.3 (loractl's merge): PEFT's bits; at weights 1, 1 it is not that merge."""
    base, ads = _setup(tmp_path / "lora", "plain", BF16, n=2)
    api.merge(base, ads, tmp_path / "m", weights=[0.7, 1.3], receipt=False)
    r = api.verify(tmp_path / "m", ads, base=base, weights=[0.7, 1.3])
    assert r.ok and r.tensors.exact == r.tensors.changed > 0
    assert not api.verify(tmp_path / "m", ads, base=base).ok


LL2 = ["q_proj", "down_proj"]
DORA_STACKS = {  # name: (arch, LoraConfig kwargs per adapter): a DoRA module merged after another on one weight
    "dora-dora": ("llama", [dict(use_dora=True, target_modules=LL2)] * 2),
    "lora-dora": ("llama", [dict(target_modules=LL2), dict(use_dora=True, target_modules=LL2)]),
    "dora-x3": ("llama", [dict(use_dora=True, target_modules=LL2)] * 3),
    "gpt2-conv1d": (
        "gpt2",
        [dict(use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])] * 2,
    ),
    "embedding": ("llama", [dict(use_dora=True, target_modules=["embed_tokens", "q_proj"])] * 2),
}


@DTYPES
@pytest.mark.parametrize("case", list(DORA_STACKS))
def test_dora_after_another_adapter_peft_and_loractl_bits(
    tmp_path: Path, case: str, dtype: torch.dtype
) -> None:
    """PEFT (0.21.2) merges a DoRA module into a weight holding earlier adapters by unmerging them, taking
    the norm and merging them again (``_unmerged_base_weight``): the same f_k·(W_{k−1} + ΔW_k) with
    f_k = m_k/‖W + ΔW_k‖ as loractl's merge, rounded more often. verify recognises each by its own bits
    (``peft``, ``loractl``) and judges neither by the bound."""
    arch, los = DORA_STACKS[case]
    model = build_model(arch, dtype, seed=0)
    base = save_base(model, tmp_path / "base")
    ads = [
        make_adapter(model, tmp_path / f"ad{i}", seed=10 + i, r=4, lora_alpha=8, **lo)
        for i, lo in enumerate(los)
    ]
    api.merge(base, ads, tmp_path / "ours", receipt=False)
    theirs = save_peft_merged(base, ads, dtype, arch, tmp_path / "peft")
    ours_t, peft_t = read_st(tmp_path / "ours"), read_st(theirs)
    differ = [k for k in peft_t if not torch.equal(ours_t[k].view(torch.uint8), peft_t[k].view(torch.uint8))]
    r = api.verify(theirs, ads, base=base)
    assert r.ok, r.findings
    assert r.tensors.orders["peft"] == r.tensors.changed and r.tensors.within_bound == 0
    r = api.verify(tmp_path / "ours", ads, base=base)
    assert r.ok, r.findings
    assert r.tensors.within_bound == 0 and r.tensors.orders.get("loractl", 0) == len(differ) > 0
    assert r.tensors.orders.get("peft", 0) == r.tensors.changed - len(differ)


def test_two_dora_adapters_compose_as_peft_forward_with_both_active(tmp_path: Path) -> None:
    """What is right for two DoRA adapters on one weight: PEFT's model with both adapters active (eval,
    no dropout) computes f₂·(f₁·(W + ΔW₁) + ΔW₂)·x (the second DoRA rescales the running output), and
    both merges compute that; the additive W + Σᵢ (fᵢ·(W + ΔWᵢ) − W) is a different model (tens of %)."""
    import peft
    import transformers as tf

    base, ads = _setup(tmp_path, "dora", FP32, n=2)
    api.merge(base, ads, tmp_path / "ours", receipt=False)
    theirs = save_peft_merged(base, ads, FP32, "llama", tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(
        tf.LlamaForCausalLM.from_pretrained(base, dtype=FP32), ads[0], adapter_name="a0"
    )
    pm.load_adapter(ads[1], adapter_name="a1")
    pm.base_model.set_adapter(["a0", "a1"])
    pm.eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 40, 7]])
    w = read_st(base)
    additive = dict(w)
    for k in (k for k in w if k.endswith(("q_proj.weight", "down_proj.weight"))):
        w0, total = w[k].double(), w[k].double().clone()
        for a in ads:
            t = read_st(a / "adapter_model.safetensors")
            pre = "base_model.model." + k[: -len(".weight")]
            delta = (t[pre + ".lora_B.weight"].double() @ t[pre + ".lora_A.weight"].double()) * 2.0
            f = t[pre + ".lora_magnitude_vector"].double() / torch.linalg.norm(w0 + delta, dim=1)
            total += f.view(-1, 1) * (w0 + delta) - w0
        additive[k] = total.float()
    save_file(additive, tmp_path / "additive.safetensors")
    shutil.copytree(base, tmp_path / "add", ignore=shutil.ignore_patterns("*.safetensors*"))
    shutil.move(tmp_path / "additive.safetensors", tmp_path / "add" / "model.safetensors")
    with torch.no_grad():
        y = pm(input_ids=ids).logits
        scale = float(y.abs().max())
        for folder, close in ((tmp_path / "ours", True), (theirs, True), (tmp_path / "add", False)):
            got = tf.LlamaForCausalLM.from_pretrained(folder, dtype=FP32).eval()(input_ids=ids).logits
            err = float((got - y).abs().max()) / scale
            assert (err < 1e-5) if close else (err > 1e-2), (folder, err)


def test_base_in_another_dtype(tmp_path: Path) -> None:
    """An fp32 base merged into a bf16 model: ``loractl merge --dtype bf16`` (merged in fp32, cast once) and
    PEFT loading the base in bf16 then merging (the base cast first) both pass, each by its exact bits;
    a bf16 base merged with ``--dtype fp32`` too."""
    base, ads = _setup(tmp_path, "rslora", FP32)
    api.merge(base, ads, tmp_path / "bf16", dtype="bf16", receipt=False)
    theirs = save_peft_merged(base, ads, BF16, "llama", tmp_path / "peft-bf16")
    n = len(read_st(base))
    for folder, order in ((tmp_path / "bf16", "fp32"), (theirs, "peft")):
        r = api.verify(folder, ads, base=base)
        assert r.ok, r.findings
        assert r.tensors.orders == {"cast": n - r.tensors.changed, order: r.tensors.changed}
        assert len(r.notes) == 1 and "F32 in the base are BF16" in r.notes[0]
    base16, ads16 = _setup(tmp_path / "b16", "plain", BF16)
    api.merge(base16, ads16, tmp_path / "fp32", dtype="fp32", receipt=False)
    r = api.verify(tmp_path / "fp32", ads16, base=base16)
    assert r.ok and r.tensors.orders["peft"] == r.tensors.changed


def test_4bit_base_is_compared_dequantized(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    model = build_model("llama", BF16, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    bf16 = save_base(model, tmp_path / "bf16")
    cfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=BF16, bnb_4bit_quant_type="nf4")
    q = tf.LlamaForCausalLM.from_pretrained(bf16, quantization_config=cfg, device_map="cpu", dtype=BF16)
    q.save_pretrained(tmp_path / "q4")
    ad = make_adapter(
        model, tmp_path / "ad", std=0.05, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]
    )
    api.merge(tmp_path / "q4", [ad], tmp_path / "merged")
    r = api.verify(tmp_path / "merged", [ad], base=tmp_path / "q4")
    assert r.ok, r.findings
    assert r.tensors.exact == r.tensors.changed == 2 and r.tensors.tensors == len(read_st(bf16))
    assert any("4-bit" in n for n in r.notes)
    # the bf16 original is not that base: its q_proj is not the dequantized one
    assert not api.verify(tmp_path / "merged", [ad], base=bf16).ok


# --------------------------------------------------------------------------------------------
# what is wrong is found, and named by its module
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_bf16(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    tmp = tmp_path_factory.mktemp("merged")
    base, ads = _setup(tmp, "plain", BF16)
    api.merge(base, ads, tmp / "merged", receipt=False)
    return base, ads, tmp / "merged"


def test_finds_a_module_left_unmerged(tmp_path: Path, merged_bf16) -> None:
    base, ads, merged = merged_bf16
    key = "model.layers.1.self_attn.v_proj.weight"
    w = read_st(base)[key]
    bad = _edited(merged, tmp_path / "bad", lambda t: t.__setitem__(key, w.clone()))
    r = api.verify(bad, ads, base=base)
    assert not r.ok and r.tensors.failed == 1
    (f,) = r.findings
    assert (f.code, f.module, f.tensor) == ("not-merged", "model.layers.1.self_attn.v_proj", key)
    assert (
        f.message == f"tensor {key!r} equals the base: module 'model.layers.1.self_attn.v_proj' is not merged"
    )


@DTYPES
def test_weight_2_checked_against_weight_1_is_a_wrong_scale(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ads = _setup(tmp_path, "plain", dtype)
    api.merge(base, ads, tmp_path / "w2", weights=[2.0], receipt=False)
    r = api.verify(tmp_path / "w2", ads, base=base, weights=[1.0])
    assert not r.ok
    assert {f.code for f in r.findings} == {"wrong-scale"}
    assert len(r.findings) == r.tensors.changed == r.tensors.failed == 14
    for f in r.findings:
        assert f.ratio == pytest.approx(2.0, abs=1e-2), f
        assert f.tensor == f.module + ".weight" and f.module.split(".")[-1] in LLAMA_ALL
        assert f"holds {f.ratio:.4g}× the expected update" in f.message and "instead of 1?" in f.message
    assert api.verify(tmp_path / "w2", ads, base=base, weights=2).ok


def test_finds_a_stray_change_in_a_layernorm(tmp_path: Path, merged_bf16) -> None:
    base, ads, merged = merged_bf16
    key = "model.layers.0.post_attention_layernorm.weight"

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][5] += 0.25

    r = api.verify(_edited(merged, tmp_path / "bad", edit), ads, base=base)
    (f,) = r.findings
    assert (f.code, f.module, f.tensor, f.outside) == (
        "stray-change",
        "model.layers.0.post_attention_layernorm",
        key,
        1,
    )
    assert (
        "changed by no adapter, yet 1 of 32 values differ from the base" in f.message
        and "at [5]" in f.message
    )


def test_finds_a_nan_and_an_inf(tmp_path: Path, merged_bf16) -> None:
    base, ads, merged = merged_bf16
    q, norm = "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[q], t[norm] = t[q].clone(), t[norm].clone()
        t[q][2, 7] = float("nan")
        t[norm][3] = float("inf")

    r = api.verify(_edited(merged, tmp_path / "bad", edit), ads, base=base)
    assert {(f.code, f.module) for f in r.findings} == {
        ("nan-inf", "model.layers.1.self_attn.q_proj"),
        ("nan-inf", "model.norm"),
    }
    assert all("1 NaN/Inf values" in f.message for f in r.findings)


def test_missing_extra_and_reshaped_tensors(tmp_path: Path, merged_bf16) -> None:
    base, ads, merged = merged_bf16
    gone, up = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"

    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[gone]
        t["model.extra.weight"] = torch.ones(3, dtype=BF16)
        t[up] = t[up][:-1].clone()

    bad = _edited(merged, tmp_path / "bad", edit)
    r = api.verify(bad, ads, base=base)
    codes = _by_code(r)
    assert sorted(codes) == ["extra", "missing", "shape-mismatch"]
    (m,) = codes["missing"]
    assert (m.module, m.tensor) == ("model.layers.0.mlp.down_proj", gone)
    assert "missing (module 'model.layers.0.mlp.down_proj' changes it)" in m.message
    assert (codes["extra"][0].module, codes["extra"][0].tensor) == ("model.extra", "model.extra.weight")
    (s,) = codes["shape-mismatch"]
    assert s.module == "model.layers.1.mlp.up_proj" and "[47, 32] but the base's" in s.message
    assert r.findings[:2] == [m, codes["extra"][0]]  # missing and extra first
    assert r.tensors.tensors == len(read_st(base)) - 1 and r.tensors.failed == 1


# --------------------------------------------------------------------------------------------
# bad input: as merge refuses it
# --------------------------------------------------------------------------------------------
def test_adapter_that_does_not_fit_the_base_is_refused(tmp_path: Path, merged_bf16) -> None:
    base, ads, merged = merged_bf16
    other = build_model("llama", BF16, hidden_size=48, num_attention_heads=4)
    wrong = make_adapter(other, tmp_path / "wrong", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(
        ShapeMismatchError, match=r"wrong.*module 'model\.layers\.0\.self_attn\.q_proj'.*\[48, 48\]"
    ):
        api.verify(merged, [wrong], base=base)
    with pytest.raises(UsageError, match="2 --weight values for 1 adapters"):
        api.verify(merged, ads, base=base, weights=[1, 2])
    with pytest.raises(InputError, match="no such file"):
        api.verify(tmp_path / "nowhere", ads, base=base)


def test_unmatched_modules_need_allow_partial(tmp_path: Path, merged_bf16) -> None:
    base, ads, merged = merged_bf16
    bert = build_model("bert", FP32)
    stray = make_adapter(bert, tmp_path / "bert-ad", r=2, lora_alpha=4, target_modules=["query"])
    with pytest.raises(InputError, match="match no base weight") as e:
        api.verify(merged, [ads[0], stray], base=base)
    assert e.value.cli_hint is not None and "--allow-partial to verify the rest" in e.value.cli_hint
    r = api.verify(merged, [ads[0], stray], base=base, allow_partial=True)
    assert r.ok and any("not checked" in n for n in r.notes)


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------
def test_streams_one_pair_ahead_and_compares_untouched_tensors_in_chunks(
    tmp_path: Path, merged_bf16, monkeypatch
) -> None:
    """Pairs are read at most one ahead of the check (two pairs in memory at most); a tensor no adapter
    changes is compared as bytes a chunk at a time and never read whole unless a byte differs, and a
    difference in its last chunk is still found."""
    from loractl import verifying

    base, ads, merged = merged_bf16
    events: list[tuple[str, str]] = []
    read_pair, changed, untouched = (
        verifying._read_pair,
        verifying.verify_ops.check_changed,
        verifying.verify_ops.check_untouched,
    )

    def logged(kind: str, f: Callable) -> Callable:
        def run(*a, **k):
            events.append((kind, a[-1] if kind == "read" else ""))
            return f(*a, **k)

        return run

    monkeypatch.setattr(verifying, "COMPARE_CHUNK", 16)
    monkeypatch.setattr(verifying, "_read_pair", logged("read", read_pair))
    monkeypatch.setattr(verifying.verify_ops, "check_changed", logged("check", changed))
    monkeypatch.setattr(verifying.verify_ops, "check_untouched", logged("check", untouched))
    r = api.verify(merged, ads, base=base)
    assert r.ok and r.tensors.untouched == 7
    reads = [n for k, n in events if k == "read"]
    assert len(reads) == r.tensors.changed == 14  # the untouched ones: compared in 16-byte chunks only
    ahead = 0
    for kind, _ in events:
        ahead += 1 if kind == "read" else -1
        assert ahead <= 2  # the pair being checked and the next one

    key = "model.norm.weight"  # untouched, 32 bf16 values: 4 chunks; change the last value

    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][-1] += 1.0

    events.clear()
    r = api.verify(_edited(merged, tmp_path / "bad", edit), ads, base=base)
    assert [(f.code, f.tensor) for f in r.findings] == [("stray-change", key)] and "at [31]" in r.findings[
        0
    ].message
    assert key in [n for k, n in events if k == "read"]  # read whole only once a byte differed
