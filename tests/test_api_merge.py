"""loractl merge equals PEFT's merge_and_unload bit for bit; unmerge with the receipt restores the base exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, peft_merged, read_st, same_bits, save_base

from loractl import api
from loractl.errors import InputError, UnsupportedAdapterError
from loractl.ops import merge as merge_ops
from loractl.provenance import file_sha256

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
    "bert": ("bert", {}, dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])),
    "bert-embeddings": ("bert", {}, dict(r=4, lora_alpha=16, target_modules=["word_embeddings", "key"])),
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


def _setup(tmp_path: Path, case: str, dtype: torch.dtype, n_adapters: int = 1, std: float = 0.3):
    arch, over, lora = CASES[case]
    model = build_model(arch, dtype, seed=0, **over)
    base = save_base(model, tmp_path / "base", max_shard_size="20KB")
    adapters = [
        make_adapter(model, tmp_path / f"ad{i}", seed=10 + i, std=std, **lora) for i in range(n_adapters)
    ]
    return arch, base, adapters


def _assert_all_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> int:
    changed = 0
    for k, t in ours.items():
        assert k in theirs, k
        assert same_bits(t, theirs[k].contiguous()), (
            f"{k}: max diff {(t.double() - theirs[k].double()).abs().max()}"
        )
    return changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_bit_for_bit(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, case, dtype)
    out = tmp_path / "merged"
    result = api.merge(base, adapters, out)
    assert len(list(base.glob("model-*.safetensors"))) >= 2, "the test base should be sharded"
    ref = peft_merged(base, adapters, dtype, arch)
    theirs = ref.state_dict()
    ours = read_st(out)
    before = read_st(base)
    _assert_all_equal(ours, theirs)
    assert any(not same_bits(ours[k], before[k]) for k in ours), "the merge changed nothing"
    assert result.tensors_changed > 0
    # the merged model loads with transformers and computes what PEFT's merged model computes
    import transformers as tf

    cls = type(ref)
    mine = cls.from_pretrained(out, dtype=dtype).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        a = mine(input_ids=ids)[0]
        b = ref(input_ids=ids)[0]
    assert torch.equal(a, b)
    assert isinstance(mine, tf.PreTrainedModel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_adapters_equal_peft_merging_both(tmp_path: Path, dtype: torch.dtype) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", dtype, n_adapters=2)
    api.merge(base, adapters, tmp_path / "merged")
    _assert_all_equal(read_st(tmp_path / "merged"), peft_merged(base, adapters, dtype, arch).state_dict())


def test_output_layout_matches_base(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.bfloat16)
    out = tmp_path / "merged"
    api.merge(base, adapters, out)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    idx_in = json.loads((base / "model.safetensors.index.json").read_text())
    idx_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_in["weight_map"]
    tensors = read_st(out)
    assert idx_out["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    before = read_st(base)
    assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in before.items()
    }
    from safetensors import safe_open

    with safe_open(out / shards[0], "pt") as f:
        meta = f.metadata()
    assert meta["loractl.operation"] == "merge"
    recorded = json.loads(meta["loractl.adapters"])
    assert recorded[0]["sha256"] == file_sha256(api.load_adapter(adapters[0]).files)
    assert meta["format"] == "pt"  # the input's own metadata is kept


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    "case",
    ["llama-plain", "llama-dora", "llama-embedding", "llama-modules-to-save", "gpt2-dora", "llama-lora-bias"],
)
def test_unmerge_with_receipt_is_bit_exact(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    # updates of realistic size (|ΔW| about 1% of |W|, as trained adapters): the receipt stays small
    arch, base, adapters = _setup(
        tmp_path, case, dtype, n_adapters=2 if case == "llama-plain" else 1, std=0.03
    )
    weights = [1.0, -0.7] if len(adapters) == 2 else None
    merged = tmp_path / "merged"
    res = api.merge(base, adapters, merged, weights=weights)
    assert res.receipt == merged / "loractl.receipt"
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    if case != "llama-modules-to-save":  # that one must keep the whole replaced head
        assert res.receipt_bytes < base_bytes / 4, (res.receipt_bytes, base_bytes)
    restored = tmp_path / "restored"
    r = api.unmerge(merged, adapters, restored, weights=weights)
    assert r.exact
    before, after = read_st(base), read_st(restored)
    assert before.keys() == after.keys()
    for k in before:
        assert same_bits(before[k], after[k]), k
    assert not (restored / "loractl.receipt").exists()
    # transformers, vLLM and diffusers loaders glob *.safetensors: the receipt is not one
    assert not any(p.name.startswith("loractl") for p in merged.glob("*.safetensors"))


def test_receipt_keeps_whole_tensors_when_most_values_do_not_come_back(tmp_path: Path, monkeypatch) -> None:
    """An update far larger than the weights leaves almost no value recoverable by subtraction: the
    receipt then stores those tensors whole (re-read from the base, since the merge overwrote its
    buffer in place) and unmerge is still exact."""
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.bfloat16, std=30.0)
    merged = tmp_path / "merged"
    calls: list[bool] = []
    real = merge_ops.fused_merge
    monkeypatch.setattr(
        merge_ops, "fused_merge", lambda *a, **k: calls.append(k.get("residual", False)) or real(*a, **k)
    )
    api.merge(base, adapters, merged)
    assert calls and all(calls)  # the in-place row-block path with the receipt's residuals
    keys = read_st(merged / "loractl.receipt").keys()
    assert any(k.endswith("::full") for k in keys), sorted(keys)[:5]
    api.unmerge(merged, adapters, tmp_path / "restored")
    before, after = read_st(base), read_st(tmp_path / "restored")
    for k in before:
        assert same_bits(before[k], after[k]), k


def test_unmerge_without_receipt_subtracts(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.float32)
    api.merge(base, adapters, tmp_path / "merged", receipt=False)
    assert not (tmp_path / "merged" / "loractl.receipt").exists()
    r = api.unmerge(tmp_path / "merged", adapters, tmp_path / "restored")
    assert not r.exact
    before, after = read_st(base), read_st(tmp_path / "restored")
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-5)


def test_unmerge_without_receipt_refuses_dora(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-dora", torch.float32)
    api.merge(base, adapters, tmp_path / "merged", receipt=False)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        api.unmerge(tmp_path / "merged", adapters, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_unmerge_refuses_receipt_of_other_adapters(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.float32, n_adapters=2)
    api.merge(base, adapters[:1], tmp_path / "merged")
    with pytest.raises(InputError, match="receipt"):
        api.unmerge(tmp_path / "merged", adapters[1:], tmp_path / "restored")


def test_weight_scales_the_update(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.float32)
    api.merge(base, adapters, tmp_path / "m1")
    api.merge(base, adapters, tmp_path / "mhalf", weights=[0.5])
    b, m1, mh = read_st(base), read_st(tmp_path / "m1"), read_st(tmp_path / "mhalf")
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        mh[k].double() - b[k].double(), 0.5 * (m1[k].double() - b[k].double()), atol=1e-5, rtol=0
    )


def test_dtype_and_reshard(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.float32)
    out = tmp_path / "m"
    api.merge(base, adapters, out, dtype="bf16", shard_size="1GB")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    t = read_st(out)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    ref = read_st(tmp_path / "m2") if False else None
    assert ref is None
    # merged in fp32 then rounded once: equal to the fp32 merge cast to bf16
    api.merge(base, adapters, tmp_path / "m32")
    t32 = read_st(tmp_path / "m32")
    for k in t:
        assert same_bits(t[k], t32[k].to(torch.bfloat16)), k
    # the receipt restores the fp32 original even across the dtype change
    api.unmerge(out, adapters, tmp_path / "back")
    before, back = read_st(base), read_st(tmp_path / "back")
    for k in before:
        assert same_bits(before[k], back[k]), k


def test_single_file_base_and_conv_equal_peft(tmp_path: Path) -> None:
    """A single .safetensors base (not transformers) with Conv2d layers, against PEFT on the same module."""
    import copy

    import peft
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 1)
            self.fc = torch.nn.Linear(8, 4)

    torch.manual_seed(0)
    net = Net()
    base_file = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base_file)
    ad = make_adapter(net, tmp_path / "ad", r=2, lora_alpha=3, target_modules=["conv1", "conv2", "fc"])
    out = tmp_path / "merged.safetensors"
    res = api.merge(base_file, [ad], out)
    assert res.receipt == tmp_path / "merged.safetensors.loractl.receipt"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(net), ad)
    theirs = pm.merge_and_unload().state_dict()
    ours = read_st(out)
    for k in ours:
        assert same_bits(ours[k], theirs[k]), k
    api.unmerge(out, [ad], tmp_path / "back.safetensors")
    before, back = read_st(base_file), read_st(tmp_path / "back.safetensors")
    assert all(same_bits(before[k], back[k]) for k in before)


def test_base_key_prefixes_are_resolved(tmp_path: Path) -> None:
    """Adapter names ``model.layers.N...`` against a base saved without the ``model.`` prefix."""
    from safetensors.torch import save_file

    model = build_model("llama", torch.float32)
    sd = {k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "bare.safetensors")
    ad = make_adapter(model, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj"])
    api.merge(tmp_path / "bare.safetensors", [ad], tmp_path / "m.safetensors")
    ours = read_st(tmp_path / "m.safetensors")
    save_base(model, tmp_path / "full")
    api.merge(tmp_path / "full", [ad], tmp_path / "mfull")
    full = read_st(tmp_path / "mfull")
    for k, v in ours.items():
        assert same_bits(v, full[k if k in full else "model." + k]), k


def test_tied_lm_head_merges_into_embedding(tmp_path: Path) -> None:
    model = build_model("gpt2", torch.float32)
    base = save_base(model, tmp_path / "base")
    assert "lm_head.weight" not in read_st(base)
    ad = make_adapter(model, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["lm_head"])
    api.merge(base, [ad], tmp_path / "m")
    ref = peft_merged(base, [ad], torch.float32, "gpt2").state_dict()
    ours = read_st(tmp_path / "m")
    assert same_bits(ours["transformer.wte.weight"], ref["transformer.wte.weight"])
    assert not same_bits(ours["transformer.wte.weight"], read_st(base)["transformer.wte.weight"])


def test_pissa_adapter_is_refused(tmp_path: Path) -> None:
    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.float32)
    cfg_path = adapters[0] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = "pissa"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match="pissa"):
        api.merge(base, adapters, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "case", ["llama-plain", "llama-rslora", "llama-patterns", "bert-embeddings", "gpt2-dora"]
)
def test_inspect_scale_equals_peft_scaling(tmp_path: Path, case: str) -> None:
    import peft

    arch, base, adapters = _setup(tmp_path, case, torch.float32)
    info = api.inspect(adapters, base=base).adapters[0]
    model = build_model(arch, torch.float32, seed=0, **CASES[case][1])
    pm = peft.PeftModel.from_pretrained(model, adapters[0])
    theirs = {
        name.removeprefix("base_model.model."): (
            mod.scaling["default"],
            mod.r["default"],
            mod.lora_alpha["default"],
        )
        for name, mod in pm.named_modules()
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling
    }
    ours = {m.name: (m.scale, m.rank, m.alpha) for m in info.module_list}
    assert ours.keys() == theirs.keys()
    for name, (s, r, a) in theirs.items():
        assert ours[name] == (s, r, a), name
    assert info.base is not None and info.base.coverage.matched == len(ours)
    assert info.base.coverage.unmatched == [] and info.base.coverage.shape_mismatch == []
    assert info.base.coverage.complete


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_block_merge_equals_peft_on_larger_layers(
    tmp_path: Path, dtype: torch.dtype, monkeypatch
) -> None:
    """Layers large enough for many row blocks: the fused single-threaded path is taken and still
    gives PEFT's bits (the merge checks this per shape before using it)."""

    calls = []
    real = merge_ops.fused_merge
    monkeypatch.setattr(merge_ops, "fused_merge", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = build_model(
        "llama",
        dtype,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=64,
    )
    base = save_base(model, tmp_path / "base")
    ad = make_adapter(model, tmp_path / "ad", std=0.05, r=16, lora_alpha=32, target_modules=LLAMA_ALL)
    threads = torch.get_num_threads()
    api.merge(base, [ad], tmp_path / "m")
    assert torch.get_num_threads() == threads  # restored
    assert calls and max(s[0] for s in calls) > merge_ops.row_block(512)  # several row blocks
    ours = read_st(tmp_path / "m")
    theirs = peft_merged(base, [ad], dtype, "llama").state_dict()
    for k, v in ours.items():
        assert same_bits(v, theirs[k].contiguous()), k
    api.unmerge(tmp_path / "m", [ad], tmp_path / "back")
    before, back = read_st(base), read_st(tmp_path / "back")
    assert all(same_bits(before[k], back[k]) for k in before)


def test_unmerge_refuses_a_merged_model_changed_after_the_merge(tmp_path: Path) -> None:
    """The receipt records a checksum of every original it restores: a merged model edited after the
    merge is refused (nothing written) instead of being 'restored' to the wrong bits."""
    from safetensors.torch import load_file, save_file

    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.bfloat16)
    merged = tmp_path / "merged"
    api.merge(base, adapters, merged)
    shard = sorted(merged.glob("model-*.safetensors"))[0]
    sd = load_file(shard)
    k = next(k for k in sd if "q_proj" in k)
    sd[k] = (sd[k].float() + 0.5).to(sd[k].dtype)
    shard.unlink()
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(InputError, match="does not come back to the original"):
        api.unmerge(merged, adapters, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_receipts_of_format_1_still_unmerge(tmp_path: Path) -> None:
    """Receipts written before the checksum became tensor_sum64 (format 1: a crc32 per tensor) are
    still read: the same merge with its receipt rewritten as format 1 unmerges bit for bit, and a
    wrong crc32 is still caught."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loractl.io.receipt import tensor_crc32

    arch, base, adapters = _setup(tmp_path, "llama-plain", torch.bfloat16)
    merged = tmp_path / "merged"
    api.merge(base, adapters, merged)
    receipt = merged / "loractl.receipt"
    with safe_open(receipt, "pt") as f:
        meta, parts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    originals = read_st(base)
    crcs = {k: tensor_crc32(originals[k]) for k in json.loads(meta.pop("sum64"))}
    meta.update({"loractl.receipt": "1", "crc32": json.dumps(crcs)})
    receipt.unlink()
    save_file(parts, receipt, metadata=meta)
    api.unmerge(merged, adapters, tmp_path / "back")
    back = read_st(tmp_path / "back")
    assert all(same_bits(originals[k], back[k]) for k in originals)
    meta["crc32"] = json.dumps({k: v ^ 1 for k, v in crcs.items()})
    receipt.unlink()
    save_file(parts, receipt, metadata=meta)
    with pytest.raises(InputError, match="does not come back to the original"):
        api.unmerge(merged, adapters, tmp_path / "back2")


def test_sum64_tells_changed_and_reordered_tensors() -> None:
    """tensor_sum64 changes when one element changes, when two elements swap, and covers a tail that
    is not a whole 64-bit word."""
    from loractl.io.receipt import tensor_sum64

    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(1000, 37, generator=g).to(torch.bfloat16), torch.randn(7, generator=g)):
        ref = tensor_sum64(t)
        assert ref == tensor_sum64(t.clone())
        one = t.clone()
        one.view(-1)[-1] = one.view(-1)[-1] * 2 + 1
        swapped = t.clone()
        swapped.view(-1)[[0, 5]] = t.view(-1)[[5, 0]]
        assert tensor_sum64(one) != ref and tensor_sum64(swapped) != ref
