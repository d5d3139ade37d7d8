"""Merging into FP8 bases (issue #13): loractl dequantizes as transformers does, merges as PEFT does,
writes bf16 (or, with --requantize, FP8 in the base's blocks), and unmerge gives back every file.

The oracles (tests/fp8_factories.py, facts in the fp8 notes): transformers'
``FineGrainedFP8Config(dequantize=True)`` then PEFT's ``merge_and_unload`` where transformers takes the
right block (every dim a multiple of its block), PEFT's merge on the reference dequantization
(compressed-tensors' and DeepSeek's rule) where it does not; transformers loads the requantized
output; compressed-tensors decompresses its own layout.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, read_st, same_bits
from fp8_factories import (
    expand_scale,
    fp8_llama,
    peft_merged_on_dequantized,
    peft_merged_on_reference,
    read_fp8_base,
    reference_dequantized,
    save_fp8_base,
    save_requantized,
    transformers_dequantized,
)
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loractl import api
from loractl.cli.app import app

BF16, F32 = torch.bfloat16, torch.float32
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


def _cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _same_files(a: Path, b: Path) -> None:
    """Folders ``a`` and ``b`` hold the same files, byte for byte."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


@pytest.fixture(scope="module")
def div(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny Llama whose dims are multiples of 128 (transformers dequantizes it right), in FP8 blocks of
    128, sharded; and a LoRA adapter on attention and MLP projections."""
    root = tmp_path_factory.mktemp("div")
    model = fp8_llama(ceil=False, seed=2)
    base = save_fp8_base(model, root / "fp8", (128, 128), max_shard_size="300KB")
    ad = make_adapter(model, root / "ad", std=0.05, r=4, lora_alpha=8, target_modules=TARGETS)
    return base, ad, model


@pytest.fixture(scope="module")
def ceil(tmp_path_factory) -> tuple[dict[tuple[int, int], Path], Path, torch.nn.Module]:
    """q_proj [200, 256], k/v [100, 256], o_proj [256, 200]: partial last blocks of 128 and of 32."""
    root = tmp_path_factory.mktemp("ceil")
    model = fp8_llama(ceil=True, seed=4)
    bases = {
        b: save_fp8_base(model, root / f"fp8-{b[0]}", b, max_shard_size="200KB")
        for b in [(128, 128), (32, 32)]
    }
    ad = make_adapter(model, root / "ad", std=0.05, r=4, lora_alpha=8, target_modules=TARGETS)
    return bases, ad, model


# --------------------------------------------------------------------------------------------
# merge, written dequantized
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, torch_dtype, block",
    [("auto", BF16, 128), ("fp32", F32, 128), ("auto", BF16, 32)],
    ids=["bf16", "fp32", "bf16-block32"],
)
def test_merge_equals_peft_on_the_model_transformers_dequantized(
    tmp_path: Path, div, dtype, torch_dtype, block
) -> None:
    import transformers as tf

    base, ad, model = div
    if block != 128:  # blocks of 32, one shard, a checkpoint made by transformers' own quantizer
        base = save_fp8_base(model, tmp_path / "fp8-32", (block, block), rule="transformers")
    res = api.merge(base, [ad], tmp_path / "m", dtype=dtype)
    ours = read_st(tmp_path / "m")
    theirs = peft_merged_on_dequantized(base, ad, torch_dtype)
    assert set(ours) == set(theirs)  # no weight_scale_inv left
    for k, v in theirs.items():
        assert same_bits(ours[k], v), k
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == {"auto": "bfloat16", "fp32": "float32"}[dtype]
    assert any("FP8 base" in n for n in res.notes) and res.receipt is not None
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch_dtype)  # an ordinary dense model
    assert type(again.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_partial_blocks_follow_weight_block_size_not_transformers(tmp_path: Path, ceil) -> None:
    bases, ad, _ = ceil
    base = bases[(128, 128)]
    res = api.merge(base, [ad], tmp_path / "m")
    ours = read_st(tmp_path / "m")
    ref = peft_merged_on_reference(base, ad, BF16)  # compressed-tensors' / DeepSeek's dequantization
    for k, v in ref.items():
        assert same_bits(ours[k], v), k
    assert any("partial last block" in n for n in res.notes)
    # transformers 5.x takes blocks of 100 rows for q_proj's 200 (grid 2): its merge is another one
    # (docs/formats.md says so); k_proj (100 rows, one block) it gets right
    tf_merge = peft_merged_on_dequantized(base, ad, BF16)
    assert not same_bits(ours[Q_PROJ], tf_merge[Q_PROJ])
    assert same_bits(ours[K_PROJ], tf_merge[K_PROJ])


# --------------------------------------------------------------------------------------------
# --requantize
# --------------------------------------------------------------------------------------------
def test_requantize_writes_the_base_layout_and_loads_in_transformers(tmp_path: Path, div) -> None:
    base, ad, _ = div
    code, out, err = _cli("merge", base, ad, "-o", tmp_path / "m", "--requantize", "--json")
    assert code == 0, err
    assert json.loads(out)["receipt"]
    written = read_st(tmp_path / "m")
    orig, block, _ = read_fp8_base(base)
    # the same tensors, dtypes and shapes as the base; config.json (quantization_config) as it was
    assert {k: (v.dtype, v.shape) for k, v in written.items()} == {
        k: (v.dtype, v.shape) for k, v in orig.items()
    }
    assert (tmp_path / "m" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    # bit for bit: PEFT's float32 merge on transformers' float32 dequantization, requantized with
    # DeepSeek's rule; the weights no adapter touches keep their bytes and scales
    merged32 = peft_merged_on_dequantized(base, ad, F32)
    expected = read_st(save_requantized(base, merged32, tmp_path / "expected"))
    for k, v in expected.items():
        assert same_bits(written[k], v), k
    for k in (K_PROJ, K_PROJ + "_scale_inv", "model.layers.0.mlp.up_proj.weight"):
        assert same_bits(written[k], orig[k]), k
    assert not same_bits(written[Q_PROJ], orig[Q_PROJ])
    # transformers loads it; each value is within FP8's rounding (half a unit: 2^-4 relative, s·2^-10 in
    # the subnormals) of the float32 merge, and, with bf16's roundings of W and ΔW, of PEFT's bf16 merge
    loaded = transformers_dequantized(tmp_path / "m", BF16)
    merged16 = peft_merged_on_dequantized(base, ad, BF16)
    w32 = reference_dequantized(base, F32)
    for k in orig:
        if not k.endswith("proj.weight"):
            continue
        m32, got = merged32[k], loaded[k].float()
        s = expand_scale(written[k + "_scale_inv"], tuple(m32.shape), block)
        fp8_half_unit = 2**-4 * m32.abs() + s * 2**-10
        assert bool(((got - m32).abs() <= fp8_half_unit + 2**-8 * got.abs()).all()), k
        bf16_roundings = 2**-7 * (w32[k].abs() + m32.abs())
        assert bool(((got - merged16[k].float()).abs() <= fp8_half_unit + bf16_roundings).all()), k


def test_requantize_refuses_what_it_cannot_write(tmp_path: Path, div) -> None:
    base, ad, model = div
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    for args, word in [
        ((dense, ad, "--requantize"), "only transformers' block-scaled FP8"),
        ((base, ad, "--requantize", "--dtype", "bf16"), "--dtype"),
    ]:
        code, _, err = _cli("merge", *args, "-o", tmp_path / "out")
        assert code == 2 and err.startswith("error: ") and word in err, err
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# the receipt: unmerge gives back every file
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "block, requantize",
    [((32, 32), False), ((32, 32), True), ((128, 128), False), ((128, 128), True)],
    ids=["32-bf16", "32-requantized", "128-bf16", "128-requantized"],
)
def test_merge_then_unmerge_gives_back_every_file_byte_for_byte(
    tmp_path: Path, ceil, block, requantize
) -> None:
    bases, ad, model = ceil
    base = bases[block]
    ad2 = make_adapter(
        model, tmp_path / "ad2", seed=9, std=0.5, r=2, lora_alpha=16, target_modules=["q_proj", "gate_proj"]
    )
    before = _digests(base)
    extra = ["--requantize"] if requantize else []
    code, _, err = _cli("merge", base, ad, ad2, "-w", "1", "-w", "0.5", "-o", tmp_path / "m", *extra)
    assert code == 0, err
    merged = read_st(tmp_path / "m")
    assert (merged[Q_PROJ].dtype == torch.float8_e4m3fn) is requantize
    code, _, err = _cli("unmerge", tmp_path / "m", ad, ad2, "-w", "1", "-w", "0.5", "-o", tmp_path / "u")
    assert code == 0, err
    _same_files(base, tmp_path / "u")  # shards (FP8 codes, scales, order, headers), index, config.json
    assert _digests(base) == before


def test_a_changed_merged_model_does_not_come_back(tmp_path: Path, ceil) -> None:
    bases, ad, _ = ceil
    api.merge(bases[(32, 32)], [ad], tmp_path / "m")
    # one value of a merged weight changed after the merge: the checksum of the FP8 codes catches it
    shard = next(p for p in sorted((tmp_path / "m").glob("*.safetensors")) if Q_PROJ in load_file(p))
    tensors = load_file(shard)
    tensors[Q_PROJ][3, 5] += 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    code, _, err = _cli("unmerge", tmp_path / "m", ad, "-o", tmp_path / "u")
    assert code == 2 and Q_PROJ in err and "does not come back" in err, err
    assert not (tmp_path / "u").exists()


def test_unmerge_of_a_requantized_merge_without_its_receipt(tmp_path: Path, div) -> None:
    base, ad, _ = div
    api.merge(base, [ad], tmp_path / "m", requantize=True, receipt=False)
    r = api.unmerge(tmp_path / "m", [ad], tmp_path / "u")
    assert not r.exact
    back, orig = read_st(tmp_path / "u"), read_st(base)
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {
        k: (v.dtype, v.shape) for k, v in orig.items()
    }
    ref = reference_dequantized(base, F32)
    got = reference_dequantized(tmp_path / "u", F32)
    for k in ref:  # subtracted in float32 and requantized: within two FP8 roundings of the base
        assert bool(((got[k] - ref[k]).abs() <= 2**-3 * ref[k].abs().amax() + 1e-6).all()), k


# --------------------------------------------------------------------------------------------
# inspect, check, convert, similarity --base
# --------------------------------------------------------------------------------------------
def test_inspect_check_convert_similarity_accept_an_fp8_base(tmp_path: Path, div) -> None:
    base, ad, model = div
    code, out, err = _cli("inspect", ad, "--base", base, "--json")
    assert code == 0, err
    fit = json.loads(out)["adapters"][0]["base"]
    assert fit["coverage"]["matched"] == len(TARGETS) and not fit["coverage"]["shape_mismatch"]
    qz = fit["quantized"]
    assert qz["method"] == "fp8" and qz["quant_types"] == ["F8_E4M3"] and qz["block"] == [128, 128]
    orig = read_st(base)
    assert qz["weights"] == sum(k.endswith("_scale_inv") for k in orig)
    assert fit["parameters"] == sum(v.numel() for k, v in orig.items() if not k.endswith("_scale_inv"))
    api.merge(base, [ad], tmp_path / "m", receipt=False)
    assert qz["merged_bytes"] == sum(v.numel() * v.element_size() for v in read_st(tmp_path / "m").values())

    code, out, err = _cli("check", ad, "--base", base, "--target", "vllm", "--json")
    assert code == 0 and json.loads(out)["ok"], out + err
    wrong = make_adapter(
        build_model(
            "llama",
            BF16,
            hidden_size=256,
            intermediate_size=256,
            num_attention_heads=4,
            head_dim=64,
            num_key_value_heads=2,
            num_hidden_layers=1,
            vocab_size=64,
        ),
        tmp_path / "wrong",
        r=4,
        lora_alpha=8,
        target_modules=["down_proj"],
    )
    code, out, _ = _cli("check", wrong, "--base", base, "--json")
    assert code == 1 and {f["code"] for f in json.loads(out)["findings"]} == {"shape-mismatch"}

    code, _, err = _cli("convert", ad, "-o", tmp_path / "kohya.safetensors", "--to", "kohya", "--base", base)
    assert code == 0, err

    # similarity --base works on the dequantized weights: the same numbers as on a dense float32 copy
    dense = tmp_path / "dense"
    dense.mkdir()
    save_file(reference_dequantized(base, F32), dense / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config")
    (dense / "config.json").write_text(json.dumps(cfg))
    code, out, err = _cli("similarity", ad, "--base", base, "--json")
    assert code == 0, err
    code2, out2, _ = _cli("similarity", ad, "--base", dense, "--json")
    fp8_mods, dense_mods = json.loads(out)["modules"], json.loads(out2)["modules"]
    assert code2 == 0 and fp8_mods == dense_mods and len(fp8_mods) == len(TARGETS)


# --------------------------------------------------------------------------------------------
# bad FP8 bases: exit 2, one line naming the file and tensor, nothing written
# --------------------------------------------------------------------------------------------
def _broken(tmp_path: Path, base: Path, how: str) -> tuple[Path, str, str]:
    """A copy of ``base`` broken ``how``; the shard and the tensor the error must name."""
    bad = tmp_path / f"bad-{how}"
    shutil.copytree(base, bad)
    shard = next(p for p in sorted(bad.glob("*.safetensors")) if Q_PROJ in load_file(p))
    tensors = load_file(shard)
    key = Q_PROJ + "_scale_inv"
    if how == "missing-scale":
        del tensors[key]
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        del index["weight_map"][key]
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file(tensors, shard, metadata={"format": "pt"})
        return bad, str(shard), Q_PROJ
    if how == "scale-shape":
        tensors[key] = tensors[key][:, :1].contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
        return bad, str(shard), key
    # the config says blocks of 64; the scales are for blocks of 128: the first scale is named
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (bad / "config.json").write_text(json.dumps(cfg))
    from loractl.io.base import open_base

    with open_base(base) as b:
        first = next(k for k in b.tensors if k.endswith("_scale_inv"))
        return bad, str(bad / b.file_of(first).path.name), first


@pytest.mark.parametrize("how", ["missing-scale", "scale-shape", "block"])
@pytest.mark.parametrize("command", ["merge", "merge --requantize", "inspect", "check", "similarity"])
def test_a_bad_fp8_base_is_refused(tmp_path: Path, div, how: str, command: str) -> None:
    base, ad, _ = div
    bad, shard, named = _broken(tmp_path, base, how)
    before = _digests(tmp_path)
    out = tmp_path / "merged"
    if command.startswith("merge"):
        code, _, err = _cli("merge", bad, ad, "-o", out, *command.split()[1:])
    else:  # check --base: an unreadable base is an input error (exit 2), not a finding (exit 1)
        code, _, err = _cli(command, ad, "--base", bad)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[0].startswith("error: ") and len(lines) <= 2 and "Traceback" not in err, err
    assert shard in lines[0] and repr(named) in lines[0], err
    assert not out.exists() and _digests(tmp_path) == before  # nothing written, nothing changed


# --------------------------------------------------------------------------------------------
# compressed-tensors' FP8 (llm-compressor)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme, block", [("FP8_BLOCK", (32, 32)), ("FP8_DYNAMIC", None)], ids=["block32", "channel"]
)
def test_compressed_tensors_fp8_merge_and_unmerge(tmp_path: Path, scheme: str, block) -> None:
    pytest.importorskip("compressed_tensors")
    import peft
    import transformers as tf
    from fp8_factories import save_ct_fp8_base

    model = fp8_llama(ceil=True, seed=6)
    ad = make_adapter(model, tmp_path / "ad", std=0.05, r=4, lora_alpha=8, target_modules=TARGETS)
    base = save_ct_fp8_base(fp8_llama(ceil=True, seed=6), tmp_path / "ct", scheme, block)
    before = _digests(base)
    api.merge(base, [ad], tmp_path / "m")
    ours = read_st(tmp_path / "m")
    dq = tf.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=tf.CompressedTensorsConfig(dequantize=True), dtype=BF16, device_map="cpu"
    )
    theirs = peft.PeftModel.from_pretrained(dq, ad).merge_and_unload().state_dict()
    for k, v in theirs.items():
        assert same_bits(ours[k], v.contiguous()), k
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    code, _, err = _cli("merge", base, ad, "-o", tmp_path / "r", "--requantize")
    assert code == 2 and "compressed-tensors" in err, err
    api.unmerge(tmp_path / "m", [ad], tmp_path / "u")
    _same_files(base, tmp_path / "u")
    assert _digests(base) == before


# MoE experts on an FP8 base
# --------------------------------------------------------------------------------------------
def _fp8_expert_weight(key: str) -> bool:
    """What a block-scaled FP8 MoE checkpoint quantizes: every projection, the experts' included (Qwen3-MoE's
    ``experts.<e>.gate_proj``, Mixtral's ``experts.<e>.w1/w2/w3``); the router stays dense."""
    import re

    return key.endswith("proj.weight") or re.search(r"experts\.\d+\.w[123]\.weight$", key) is not None


@pytest.mark.parametrize(
    "arch, over", [("mixtral", {"intermediate_size": 32}), ("qwen3_moe", {"moe_intermediate_size": 32})]
)
@pytest.mark.parametrize("requantize", [False, True], ids=["bf16", "requantize"])
def test_expert_adapter_on_an_fp8_moe_base(tmp_path: Path, arch: str, over: dict, requantize: bool) -> None:
    """An adapter on the experts (and q_proj) of an FP8 MoE base: merged to bf16 it equals PEFT's merge on the
    model transformers dequantized, saved with save_pretrained (per-expert tensors), bit for bit; merged with
    --requantize or not, unmerge with the receipt gives back every file byte for byte."""
    import peft
    from fp8_factories import _load_dequantized
    from moe_factories import build_moe, make_moe_adapter

    model = build_moe(arch, torch.bfloat16, **over)
    base = save_fp8_base(model, tmp_path / "fp8", (16, 16), quantize=_fp8_expert_weight)
    tensors, _, _ = read_fp8_base(base)
    experts_fp8 = [k for k, v in tensors.items() if ".experts." in k and v.dtype == torch.float8_e4m3fn]
    assert len(experts_fp8) == 2 * 4 * 3  # 2 layers, 4 experts, 3 projections each
    ad = make_moe_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    before = _digests(base)
    extra = ["--requantize"] if requantize else []
    code, _, err = _cli("merge", base, ad, "-o", tmp_path / "m", *extra)
    assert code == 0, err
    ours = read_st(tmp_path / "m")
    if not requantize:
        pm = peft.PeftModel.from_pretrained(_load_dequantized(base, torch.bfloat16), ad).merge_and_unload()
        pm.save_pretrained(tmp_path / "peft")
        theirs = read_st(tmp_path / "peft")
        assert set(ours) == set(theirs)
        assert [k for k in theirs if not same_bits(ours[k], theirs[k])] == []
        dense = reference_dequantized(base, torch.bfloat16)
        changed = [k for k in experts_fp8 if not same_bits(ours[k], dense[k])]
        assert len(changed) == len(experts_fp8)  # every expert weight took its update
    else:
        assert all(ours[k].dtype == torch.float8_e4m3fn for k in experts_fp8)
    code, _, err = _cli("unmerge", tmp_path / "m", ad, "-o", tmp_path / "u")
    assert code == 0, err
    _same_files(base, tmp_path / "u")
    assert _digests(base) == before
