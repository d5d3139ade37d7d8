"""FP8 bases (loractl.io.fp8): finding, dequantizing, requantizing, the receipt's code recovery.

Checkpoints come from tests/fp8_factories.py (the real layout: F8_E4M3 weights, F32
``weight_scale_inv`` per block, sharded). The expected values are the peers': transformers'
``FineGrainedFP8Config(dequantize=True)`` where it takes the right block, compressed-tensors'
``FP8BlockDequantizer`` where it does not (partial last blocks), compressed-tensors' own
decompression for its layout, PEFT's merge for the requantized merge.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, same_bits
from fp8_factories import (
    FP8,
    dequantize_blocks,
    expand_scale,
    fp8_llama,
    peft_merged_on_dequantized,
    quantize_blocks,
    read_fp8_base,
    save_fp8_base,
    transformers_dequantized,
    transformers_derives_block,
)
from safetensors.torch import load_file, save_file

from loractl.errors import FormatError
from loractl.io import fp8
from loractl.io.base import open_base

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [200, 256] in the CEIL model: a partial last block
O_PROJ = "model.layers.0.self_attn.o_proj.weight"  # [256, 200]


def _scaled(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k.removesuffix("_scale_inv") for k in tensors if k.endswith("_scale_inv")}


def _snapshot(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def ceil_bases(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """The CEIL Llama (q_proj [200, 256], o_proj [256, 200], k/v [100, 256]) in several blocks, sharded."""
    root = tmp_path_factory.mktemp("fp8")
    model = fp8_llama(ceil=True, seed=3)
    return {
        b: save_fp8_base(model, root / f"b{b[0]}x{b[1]}", b, max_shard_size="200KB")
        for b in [(128, 128), (32, 32), (16, 64)]
    }


# --------------------------------------------------------------------------------------------
# finding
# --------------------------------------------------------------------------------------------
def test_find_fp8_on_a_sharded_checkpoint(ceil_bases) -> None:
    for block, path in ceil_bases.items():
        tensors, _, _ = read_fp8_base(path)
        with open_base(path) as b:
            assert len(b.shards) > 1 and fp8.is_fp8(b)
            found = fp8.find_fp8(b)
            assert set(found) == _scaled(tensors) and len(found) == 7
            for k, w in found.items():
                assert (w.shape, w.dtype, w.block) == (tuple(tensors[k].shape), "F8_E4M3", block)
                assert w.scale_key == k + "_scale_inv" and w.aux == [w.scale_key]
                assert (w.scale_dtype, w.out_dtype, w.method, w.strategy) == ("F32", "BF16", "fp8", "block")
                assert w.scale_shape == w.grid == tuple(tensors[w.scale_key].shape)
            assert found[Q_PROJ].grid == (-(-200 // block[0]), -(-256 // block[1]))
            assert fp8.aux_keys(found) == {k for k in tensors if k.endswith("_scale_inv")}
            dense = sum(
                v.numel() * v.element_size()
                for k, v in tensors.items()
                if k not in found and "scale" not in k
            )
            assert fp8.dequantized_nbytes(b, 2, found) == dense + 2 * sum(w.numel for w in found.values())
            assert fp8.dequantized_nbytes(b, None, found) == fp8.dequantized_nbytes(b, 2, found)


def test_an_unquantized_base_or_a_plain_fp8_cast_has_no_fp8_weights(tmp_path: Path) -> None:
    model = fp8_llama(ceil=True)
    model.save_pretrained(tmp_path / "dense")
    with open_base(tmp_path / "dense") as b:
        assert fp8.find_fp8(b) == {} and not fp8.is_fp8(b)
    # FP8 stored as a plain cast with no scale and no quantization_config (as some diffusion checkpoints
    # are): the value is the FP8 number itself, there is nothing to dequantize
    save_file({"w.weight": torch.randn(8, 8).to(FP8)}, tmp_path / "plain.safetensors")
    with open_base(tmp_path / "plain.safetensors") as b:
        assert fp8.find_fp8(b) == {} and not fp8.is_fp8(b)


# --------------------------------------------------------------------------------------------
# dequantizing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, block, dtype",
    [
        ("reference", (128, 128), BF16),
        ("reference", (128, 128), F32),
        ("reference", (32, 32), BF16),
        ("reference", (32, 32), F32),
        ("transformers", (32, 32), BF16),  # a checkpoint made by transformers' own quantizer
    ],
    ids=["b128-bf16", "b128-fp32", "b32-bf16", "b32-fp32", "tf-rule-b32-bf16"],
)
def test_dequantize_equals_transformers_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype, block: tuple[int, int], rule: str
) -> None:
    # every dim a multiple of the block: transformers' FineGrainedFP8Config(dequantize=True) is right
    path = save_fp8_base(fp8_llama(ceil=False), tmp_path / "fp8", block, rule=rule)
    theirs = transformers_dequantized(path, dtype)
    with open_base(path) as b:
        found = fp8.find_fp8(b)
        assert len(found) == 7
        for k, w in found.items():
            assert same_bits(fp8.dequantize(b, w, dtype), theirs[k]), k
        if dtype == BF16:  # the default is the model's dtype (config.json says bfloat16)
            assert same_bits(fp8.dequantize(b, found[Q_PROJ]), theirs[Q_PROJ])


@DTYPES
def test_dequantize_partial_blocks_equals_compressed_tensors_not_transformers(ceil_bases, dtype) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    for block, path in ceil_bases.items():
        tensors, _, _ = read_fp8_base(path)
        ct = FP8BlockDequantizer(weight_block_size=block, dtype=dtype)
        with open_base(path) as b:
            for k, w in fp8.find_fp8(b).items():
                q, s = tensors[k], tensors[k + "_scale_inv"]
                ours = fp8.dequantize(b, w, dtype)
                assert same_bits(ours, ct._create_dequantized_weight(q, s).contiguous()), (block, k)
                assert same_bits(ours, dequantize_blocks(q, s, block, dtype)), (block, k)
    # where transformers derives a wrong block (128: q_proj's 200 rows, grid 2 -> blocks of 100) or refuses
    # (32: 200 % 7), loractl reads weight_block_size instead; on the others it equals transformers
    path = ceil_bases[(128, 128)]
    theirs = transformers_dequantized(path, dtype)
    tensors, _, _ = read_fp8_base(path)
    with open_base(path) as b:
        for k, w in fp8.find_fp8(b).items():
            right = transformers_derives_block(w.shape, w.block)
            assert same_bits(fp8.dequantize(b, w, dtype), theirs[k]) == right, k
            assert right == (k not in (Q_PROJ, O_PROJ)), k


def test_dequantize_works_in_chunks_of_block_rows(ceil_bases, monkeypatch) -> None:
    for block in [(128, 128), (16, 64)]:
        path = ceil_bases[block]
        tensors, _, _ = read_fp8_base(path)
        with open_base(path) as b:
            found = fp8.find_fp8(b)
            want = {
                k: dequantize_blocks(tensors[k], tensors[w.scale_key], block, BF16) for k, w in found.items()
            }
            # one row of blocks at a time; three (the last chunk partial); the defaults cover a whole weight
            for elems in (1, 3 * block[0] * 256):
                monkeypatch.setattr(fp8, "CHUNK_ELEMS", elems)
                for k, w in found.items():
                    assert same_bits(fp8.dequantize(b, w), want[k]), (block, elems, k)
                    if elems == 1:  # so do the quantizers
                        q, s = fp8.requantize(fp8.dequantize(b, w, F32), block)
                        assert same_bits(q, tensors[k]) and same_bits(s, tensors[w.scale_key]), (block, k)
                        assert same_bits(fp8.quantize_with_scales(want[k], s, block), tensors[k]), (block, k)
            out = torch.empty(found[Q_PROJ].shape, dtype=BF16)  # into a given buffer
            assert fp8.dequantize(b, found[Q_PROJ], BF16, out=out) is out and same_bits(out, want[Q_PROJ])
            with pytest.raises(ValueError, match="buffer"):
                fp8.dequantize(b, found[Q_PROJ], F32, out=out)


@DTYPES
def test_moe_experts_are_dequantized_per_expert(tmp_path: Path, dtype: torch.dtype) -> None:
    # Qwen3-MoE FP8 checkpoints store each expert's projections with their own scale; transformers
    # dequantizes each, then fuses them into experts.gate_up_proj [E, 2I, H] / experts.down_proj
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        head_dim=64,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = save_fp8_base(tf.Qwen3MoeForCausalLM(cfg).to(BF16), tmp_path / "moe", (32, 32))
    theirs = transformers_dequantized(path, dtype)
    with open_base(path) as b:
        found = fp8.find_fp8(b)
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in found
        assert "model.layers.0.mlp.gate.weight" not in found  # the router stays dense

        def experts(name: str) -> torch.Tensor:
            return torch.stack(
                [
                    fp8.dequantize(b, found[f"model.layers.0.mlp.experts.{e}.{name}.weight"], dtype)
                    for e in range(4)
                ]
            )

        gate_up = torch.cat([experts("gate_proj"), experts("up_proj")], dim=1)
        assert same_bits(theirs["model.layers.0.mlp.experts.gate_up_proj"], gate_up)
        assert same_bits(theirs["model.layers.0.mlp.experts.down_proj"], experts("down_proj"))
        assert same_bits(theirs[Q_PROJ], fp8.dequantize(b, found[Q_PROJ], dtype))


def _write_base(path: Path, tensors: dict[str, torch.Tensor], qc: dict | None, **cfg) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "llama", **cfg}
    if qc is not None:
        config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    return path


def _qc(block=(128, 128), **extra) -> dict:
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": block, **extra}


def test_fused_experts_with_leading_dims(tmp_path: Path) -> None:
    # a fused expert tensor [E, out, in] with its scale [E, gr, gc] (transformers' FP8Experts names them
    # <m>.gate_up_proj and <m>.gate_up_proj_scale_inv): each expert is its own matrix of blocks
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(3, 96, 64, generator=g)
    qs = [quantize_blocks(w32[e], (32, 32)) for e in range(3)]
    q, s = torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs])
    w2 = torch.randn(2, 100, 40, generator=g)  # partial blocks: transformers would refuse 100 % 4
    qs2 = [quantize_blocks(w2[e], (32, 32)) for e in range(2)]
    q2, s2 = torch.stack([a for a, _ in qs2]), torch.stack([b for _, b in qs2])
    path = _write_base(
        tmp_path / "fused",
        {
            "e.gate_up_proj": q,
            "e.gate_up_proj_scale_inv": s,
            "f.down_proj": q2,
            "f.down_proj_scale_inv": s2,
            "e.gate_up_proj_activation_scale": torch.ones(3),
        },
        _qc((32, 32)),
        dtype="bfloat16",
    )
    with open_base(path) as b:
        found = fp8.find_fp8(b)
        w = found["e.gate_up_proj"]
        assert w.grid == (3, 3, 2)
        assert w.aux == ["e.gate_up_proj_scale_inv", "e.gate_up_proj_activation_scale"]
        ours = fp8.dequantize(b, w, F32)
        assert same_bits(ours, Fp8Dequantize(None)._dequantize_one(q, s, F32))
        ours2 = fp8.dequantize(b, found["f.down_proj"], BF16)
        assert same_bits(
            ours2, torch.stack([dequantize_blocks(q2[e], s2[e], (32, 32), BF16) for e in range(2)])
        )
        got = fp8.requantize_weight(w, ours)
        assert same_bits(got["e.gate_up_proj"], q) and same_bits(got["e.gate_up_proj_scale_inv"], s)


def test_one_scale_per_tensor_when_weight_block_size_is_null(tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w32 = torch.randn(50, 70, generator=torch.Generator().manual_seed(1))
    q, s = fp8.requantize(w32, None)
    assert s.shape == () and s.item() == (w32.abs().max() / 448.0).item()
    path = _write_base(tmp_path / "t", {"a.weight": q, "a.weight_scale_inv": s}, _qc(None))
    with open_base(path) as b:
        w = fp8.find_fp8(b)["a.weight"]
        assert (w.block, w.strategy, w.grid) == (None, "tensor", ())
        for dtype in (BF16, F32):
            assert same_bits(fp8.dequantize(b, w, dtype), Fp8Dequantize(None)._dequantize_one(q, s, dtype))
        again = fp8.requantize_weight(w, fp8.dequantize(b, w, F32))
        assert same_bits(again["a.weight"], q) and same_bits(again["a.weight_scale_inv"], s)


@pytest.mark.parametrize("scale_dtype", [BF16, F16], ids=["bf16", "f16"])
def test_bf16_and_f16_scales_as_qwen3_fp8_stores_them(tmp_path: Path, scale_dtype: torch.dtype) -> None:
    # Qwen3-32B-FP8 stores weight_scale_inv in bf16, Qwen3-4B-Instruct-2507-FP8 in f16; transformers
    # widens them to float32 before the product, and so does loractl
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w32 = torch.randn(192, 96, generator=torch.Generator().manual_seed(2))
    q, s = fp8.requantize(w32, (64, 32), scale_dtype=scale_dtype)
    assert s.dtype == scale_dtype and s.shape == (3, 3)
    # the scale divides as stored: within FP8's half-ulp (and saturation at 448 when the rounded scale is low)
    scale = expand_scale(s.float(), (192, 96), (64, 32))
    deq = q.float() * scale
    assert bool(((deq - w32).abs() <= 2**-4 * w32.abs() + scale * (2**-10 + 2**-8 * 448)).all())
    path = _write_base(
        tmp_path / "s", {"a.weight": q, "a.weight_scale_inv": s}, _qc((64, 32)), dtype="float16"
    )
    with open_base(path) as b:
        w = fp8.find_fp8(b)["a.weight"]
        assert w.scale_dtype == {BF16: "BF16", F16: "F16"}[scale_dtype] and w.out_dtype == "F16"
        ours = fp8.dequantize(b, w)
        assert ours.dtype == F16
        assert same_bits(ours, Fp8Dequantize(None)._dequantize_one(q, s, F16))
        assert same_bits(fp8.dequantize(b, w, BF16), Fp8Dequantize(None)._dequantize_one(q, s, BF16))
        again = fp8.requantize_weight(w, fp8.dequantize(b, w, F32))
        assert again["a.weight_scale_inv"].dtype == scale_dtype


def test_model_dtype_and_configs() -> None:
    assert fp8.model_dtype({"dtype": "float16"}) == "F16"
    assert fp8.model_dtype({"torch_dtype": "float32"}) == "F32"
    assert fp8.model_dtype({"dtype": "float32", "torch_dtype": "float16"}) == "F32"
    assert fp8.model_dtype({}) == "BF16" and fp8.model_dtype({"dtype": "auto"}) == "BF16"
    cfg = {
        "model_type": "x",
        "torch_dtype": "float32",
        "dtype": "float32",
        "text_config": {"dtype": "float32", "hidden_size": 8},
        "quantization_config": _qc(),
    }
    out = fp8.dequantized_config(cfg, "BF16")
    assert out == {
        "model_type": "x",
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "text_config": {"dtype": "bfloat16", "hidden_size": 8},
    }
    assert cfg["text_config"]["dtype"] == "float32" and "quantization_config" in cfg  # not modified
    assert fp8.dequantized_config({"quantization_config": _qc()}, "F32") == {"dtype": "float32"}
    kept = fp8.requantized_config(cfg)
    assert kept == cfg and kept is not cfg and kept["quantization_config"] is not cfg["quantization_config"]


# --------------------------------------------------------------------------------------------
# requantizing
# --------------------------------------------------------------------------------------------
def test_requantize_round_trips_bit_for_bit(ceil_bases) -> None:
    for block, path in ceil_bases.items():
        tensors, _, _ = read_fp8_base(path)
        with open_base(path) as b:
            for k, w in fp8.find_fp8(b).items():
                w32 = fp8.dequantize(b, w, F32)
                q, s = fp8.requantize(w32, block)
                assert same_bits(q, tensors[k]) and same_bits(s, tensors[w.scale_key]), (block, k)
                assert fp8.requantize_weight(w, w32).keys() == {k, w.scale_key}
                # the rule is the oracle's, on a weight that is not on the FP8 grid too
                moved = w32 * 1.01 + 1e-3
                q2, s2 = fp8.requantize(moved, block)
                q3, s3 = quantize_blocks(moved, block)
                assert same_bits(q2, q3) and same_bits(s2, s3), (block, k)


def test_requantize_e5m2_round_trips() -> None:
    w32 = torch.randn(100, 70, generator=torch.Generator().manual_seed(4)) * 3
    q, s = fp8.requantize(w32, (32, 16), torch.float8_e5m2)
    assert q.dtype == torch.float8_e5m2 and float(q.float().abs().max()) == 57344.0
    deq = q.float() * expand_scale(s, (100, 70), (32, 16))
    q2, s2 = fp8.requantize(deq, (32, 16), torch.float8_e5m2)
    assert same_bits(q2, q) and same_bits(s2, s)


def test_requantize_refuses_what_has_no_fp8_code() -> None:
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="float32"):
        fp8.requantize(w.to(BF16), (4, 4))
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="1 values are NaN or infinite"):
        fp8.requantize(w, (4, 4))
    with pytest.raises(ValueError, match="not representable in torch.float16"):
        fp8.requantize(torch.full((4, 4), 1e-9), (4, 4), scale_dtype=F16)
    q, s = fp8.requantize(torch.zeros(8, 8), (4, 4))  # an all-zero block: scale 1, as transformers
    assert bool((s == 1).all()) and bool((q.float() == 0).all())


def test_requantized_merge_loads_in_transformers_within_fp8_rounding(tmp_path: Path) -> None:
    # requantize_weight on the float32 PEFT merge, written in the base's layout with requantized_config:
    # transformers loads it, and each value is within FP8's rounding of the merge
    block = (32, 32)
    model = fp8_llama(ceil=False, seed=5)
    path = save_fp8_base(model, tmp_path / "fp8", block)
    ad = make_adapter(
        model, tmp_path / "ad", std=0.05, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]
    )
    merged32 = peft_merged_on_dequantized(path, ad, F32)
    merged16 = peft_merged_on_dequantized(path, ad, BF16)
    base_tensors, _, cfg = read_fp8_base(path)
    out = tmp_path / "requantized"
    out.mkdir()
    written: dict[str, torch.Tensor] = {}
    with open_base(path) as b:
        found = fp8.find_fp8(b)
        for k in base_tensors:
            if k in found:
                written.update(fp8.requantize_weight(found[k], merged32[k]))
            elif k not in fp8.aux_keys(found):
                written[k] = merged32[k].to(base_tensors[k].dtype)
    save_file(written, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(fp8.requantized_config(cfg)))
    loaded = transformers_dequantized(out, BF16)
    with open_base(out) as b2:
        refound = fp8.find_fp8(b2)
        assert set(refound) == set(found)
        for k, w in refound.items():
            assert same_bits(loaded[k], fp8.dequantize(b2, w, BF16)), k
            m32, s = merged32[k], expand_scale(written[w.scale_key], w.shape, block)
            err = (fp8.dequantize(b2, w, F32) - m32).abs()
            assert bool((err <= 2**-4 * m32.abs() + s * 2**-10).all()), k  # FP8's half-ulp
            # against PEFT's bf16 merge, bf16's roundings on top
            err16 = (loaded[k].float() - merged16[k].float()).abs()
            assert bool((err16 <= 2**-4 * m32.abs() + s * 2**-10 + 2**-7 * (m32.abs() + 1)).all()), k
            touched = k.split(".")[-2] in ("q_proj", "down_proj")
            untouched_same = same_bits(written[k], base_tensors[k]) and same_bits(
                written[w.scale_key], base_tensors[w.scale_key]
            )
            assert untouched_same != touched, k  # untouched weights keep their FP8 bytes and scales


# --------------------------------------------------------------------------------------------
# the receipt: the base's codes back from an unmerged weight and the base's scales
# --------------------------------------------------------------------------------------------
def test_quantize_with_scales_gives_back_the_codes(ceil_bases) -> None:
    for block, path in ceil_bases.items():
        tensors, _, _ = read_fp8_base(path)
        with open_base(path) as b:
            for k, w in fp8.find_fp8(b).items():
                s = tensors[w.scale_key]
                for dtype in (BF16, F32):  # from the bf16 copy too: its rounding is far below FP8's
                    assert same_bits(
                        fp8.quantize_with_scales(fp8.dequantize(b, w, dtype), s, block), tensors[k]
                    )
    q = fp8.quantize_with_scales(torch.full((4, 4), 3.0), torch.tensor([[0.0, 1.0]]), (4, 2))
    assert q.float().tolist() == [[0.0, 0.0, 3.0, 3.0]] * 4  # a zero scale gives code +0
    assert same_bits(
        fp8.quantize_with_scales(torch.tensor([[1000.0, -1.0]]), torch.tensor(2.0), None),
        torch.tensor([[448.0, -0.5]]).to(FP8),
    )  # saturates, as the cast does
    with pytest.raises(ValueError, match="do not fit"):
        fp8.quantize_with_scales(torch.zeros(8, 8), torch.ones(3, 2), (4, 4))


@pytest.mark.parametrize("scale", [0.05, 3.0], ids=["lora-sized", "large"])
def test_codes_round_trip_through_a_bf16_merge_and_unmerge(ceil_bases, scale: float) -> None:
    # the receipt design: merge in bf16 (W + ΔW rounded), unmerge (minus ΔW, rounded), requantize with the
    # base's scales and correct the few codes that moved with loractl.ops.residual: the base's bytes exactly
    block = (32, 32)
    tensors, _, _ = read_fp8_base(ceil_bases[block])
    g = torch.Generator().manual_seed(7)
    moved = 0
    for k in sorted(_scaled(tensors)):
        q, s = tensors[k], tensors[k + "_scale_inv"]
        w16 = dequantize_blocks(q, s, block, BF16)
        a, bb = torch.randn(4, q.shape[1], generator=g), torch.randn(q.shape[0], 4, generator=g)
        delta = (bb @ a) * scale
        merged = (w16.float() + delta).to(BF16)
        rec = (merged.float() - delta).to(BF16)
        parts = fp8.encode_codes(q, rec, s, block)
        assert same_bits(fp8.decode_codes(rec, s, block, parts), q), k
        moved += parts["d8"].numel() if "d8" in parts else 0
        assert "full" not in parts
    if scale == 3.0:
        assert moved > 0  # the corrections were needed, and applied
    # everything: 'full' when most codes differ
    q = tensors[Q_PROJ]
    parts = fp8.encode_codes(q, torch.zeros(q.shape), tensors[Q_PROJ + "_scale_inv"], block)
    assert "full" in parts and same_bits(
        fp8.decode_codes(torch.zeros(q.shape), tensors[Q_PROJ + "_scale_inv"], block, parts), q
    )


# --------------------------------------------------------------------------------------------
# compressed-tensors' FP8 layout
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme, block, strategy",
    [
        ("FP8_BLOCK", None, "block"),
        ("FP8_BLOCK", (32, 32), "block"),
        ("FP8_DYNAMIC", None, "channel"),
        ("FP8", None, "tensor"),
    ],
    ids=["block128", "block32", "channel", "tensor"],
)
def test_compressed_tensors_fp8(tmp_path: Path, scheme: str, block, strategy: str) -> None:
    pytest.importorskip("compressed_tensors")
    from fp8_factories import ct_decompressed, save_ct_fp8_base

    path = save_ct_fp8_base(fp8_llama(ceil=True), tmp_path / "ct", scheme, block)
    stored = load_file(path / "model.safetensors")
    with open_base(path) as b:
        assert fp8.is_fp8(b)
        found = fp8.find_fp8(b)
        assert set(found) == {k.removesuffix("_scale") for k in stored if k.endswith(".weight_scale")}
        assert len(found) == 7 and "lm_head.weight" not in found
        for k, w in found.items():
            assert (w.method, w.strategy, w.scale_key, w.scale_dtype) == (
                "compressed-tensors",
                strategy,
                k + "_scale",
                "BF16",
            )
            assert w.block == ((block or (128, 128)) if strategy == "block" else None)
            inp = k.removesuffix("weight") + "input_scale"
            assert w.aux == [w.scale_key] + ([inp] if scheme == "FP8" else [])
        for dtype in (BF16, F32):
            theirs = ct_decompressed(path, dtype)
            for k, w in found.items():
                assert same_bits(fp8.dequantize(b, w, dtype), theirs[k]), (k, dtype)
        with pytest.raises(ValueError, match="not supported"):
            fp8.requantize_weight(found[Q_PROJ], torch.zeros(found[Q_PROJ].shape))


# --------------------------------------------------------------------------------------------
# bad input: a FormatError naming the file and the tensor (or config.json and the key)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path: Path) -> Path:
    """Two FP8 weights in one file (one with partial blocks), a dense norm, config with block [32, 32]."""
    g = torch.Generator().manual_seed(0)
    a, sa = quantize_blocks(torch.randn(200, 64, generator=g), (32, 32))
    c, sc = quantize_blocks(torch.randn(64, 64, generator=g), (32, 32))
    return _write_base(
        tmp_path / "small",
        {
            "m.a.weight": a,
            "m.a.weight_scale_inv": sa,
            "m.c.weight": c,
            "m.c.weight_scale_inv": sc,
            "m.norm.weight": torch.ones(64, dtype=BF16),
        },
        _qc((32, 32)),
        dtype="bfloat16",
    )


def test_a_static_activation_scale_belongs_to_its_weight(small: Path) -> None:
    # activation_scheme "static" stores <m>.activation_scale (transformers' serialized_names): it goes
    # with the weight (left out of a dequantized copy, kept by a requantized one)
    _edit(small, m__a__activation_scale=torch.tensor(0.5))
    _config(small, activation_scheme="static")
    with open_base(small) as b:
        found = fp8.find_fp8(b)
    assert found["m.a.weight"].aux == ["m.a.weight_scale_inv", "m.a.activation_scale"]
    assert fp8.aux_keys(found) == {"m.a.weight_scale_inv", "m.a.activation_scale", "m.c.weight_scale_inv"}


def _edit(path: Path, drop=(), **replace: torch.Tensor) -> None:
    t = load_file(path / "model.safetensors")
    for k in drop:
        del t[k]
    t.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(t, path / "model.safetensors")


def _config(path: Path, **qc) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in qc.items():
        if v is ...:
            cfg["quantization_config"].pop(k, None)
        else:
            cfg["quantization_config"][k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _refused(path: Path, match: str, *, on_dequantize: bool = False) -> str:
    before = _snapshot(path)
    with open_base(path) as b, pytest.raises(FormatError) as e:
        found = fp8.find_fp8(b)
        assert on_dequantize, "find_fp8 accepted the base"
        for w in found.values():
            fp8.dequantize(b, w)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    assert match in msg, msg
    assert _snapshot(path) == before  # inputs untouched
    return msg


def test_missing_weight_scale_inv(small: Path) -> None:
    _edit(small, drop=["m.a.weight_scale_inv"])
    msg = _refused(small, "without its scale 'm.a.weight_scale_inv'")
    assert msg.startswith(f"{small / 'model.safetensors'}: tensor 'm.a.weight': F8_E4M3 weight")


def test_scale_of_the_wrong_shape(small: Path) -> None:
    _edit(small, m__a__weight_scale_inv=torch.ones(6, 2))
    msg = _refused(
        small, "scale is [6, 2], but weight [200, 64] with weight_block_size [32, 32] needs the grid [7, 2]"
    )
    assert msg.startswith(f"{small / 'model.safetensors'}: tensor 'm.a.weight_scale_inv': ")


def test_block_size_that_does_not_divide_as_the_config_says(small: Path) -> None:
    # the scales were made with 32-blocks, the config says 64: the grid of m.a (200 rows) is 4 x 1, not 7 x 2
    _config(small, weight_block_size=[64, 64])
    msg = _refused(small, "weight_block_size [64, 64] needs the grid [4, 1]")
    assert msg.startswith(f"{small / 'model.safetensors'}: tensor 'm.a.weight_scale_inv': scale is [7, 2]")


def test_weight_block_size_absent_means_128(small: Path) -> None:
    _config(small, weight_block_size=...)
    _refused(small, "weight_block_size [128, 128] needs the grid [2, 1]")


@pytest.mark.parametrize("bad", [[32], [0, 32], [32, -1], "32", [32, 32.0], [True, 32], {"a": 1}])
def test_weight_block_size_not_two_positive_ints(small: Path, bad) -> None:
    _config(small, weight_block_size=bad)
    msg = _refused(
        small, f"key 'quantization_config.weight_block_size': {bad!r} is not two positive integers"
    )
    assert msg.startswith(f"{small / 'config.json'}: ")


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64], ids=["I32", "U8", "F64"])
def test_scale_of_another_dtype(small: Path, dtype: torch.dtype) -> None:
    _edit(small, m__c__weight_scale_inv=torch.ones(2, 2, dtype=dtype))
    _refused(small, "tensor 'm.c.weight_scale_inv': the scale of 'm.c.weight' is ")


def test_fp8_weight_with_a_scale_but_no_quantization_config(small: Path) -> None:
    cfg = json.loads((small / "config.json").read_text())
    del cfg["quantization_config"]
    (small / "config.json").write_text(json.dumps(cfg))
    msg = _refused(small, "tensor 'm.a.weight': F8_E4M3 weight with a scale 'm.a.weight_scale_inv' beside it")
    assert "no quantization_config" in msg and str(small / "model.safetensors") in msg
    # a lone shard of such a checkpoint (no config.json beside it) likewise
    with (
        open_base(small / "model.safetensors") as b,
        pytest.raises(FormatError, match="the block size is unknown"),
    ):
        fp8.find_fp8(b)


def test_orphan_scales_and_scales_of_dense_weights(small: Path, tmp_path: Path) -> None:
    _edit(small, m__x__weight_scale_inv=torch.ones(1, 1))
    _refused(small, "tensor 'm.x.weight_scale_inv': a scale for 'm.x.weight', which the base does not have")
    _edit(small, drop=["m.x.weight_scale_inv"], m__norm__weight_scale_inv=torch.ones(1, 2))
    _refused(small, "tensor 'm.norm.weight_scale_inv': a scale for 'm.norm.weight', which is BF16, not FP8")


def test_quant_method_fp8_without_fp8_tensors(tmp_path: Path) -> None:
    path = _write_base(tmp_path / "d", {"a.weight": torch.ones(4, 4, dtype=BF16)}, _qc())
    msg = _refused(path, "key 'quantization_config.quant_method': says \"fp8\" but no tensor")
    assert msg.startswith(f"{path / 'config.json'}: ")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5], ids=["nan", "inf", "negative"])
def test_non_finite_or_negative_scales(small: Path, value: float) -> None:
    t = load_file(small / "model.safetensors")["m.a.weight_scale_inv"]
    t[5, 1] = value
    _edit(small, m__a__weight_scale_inv=t)
    _refused(
        small,
        "tensor 'm.a.weight_scale_inv': 1 of its 14 scales are NaN, infinite or negative (first at [5, 1]",
        on_dequantize=True,
    )


def test_a_zero_scale_dequantizes_to_zeros(small: Path) -> None:
    t = load_file(small / "model.safetensors")
    s = t["m.a.weight_scale_inv"]
    s[6, 0] = 0.0  # the last, partial row of blocks: rows 192..199, columns 0..31
    _edit(small, m__a__weight_scale_inv=s)
    with open_base(small) as b:
        got = fp8.dequantize(b, fp8.find_fp8(b)["m.a.weight"], F32)
    assert bool((got[192:, :32] == 0).all())
    assert same_bits(got, dequantize_blocks(t["m.a.weight"], s, (32, 32), F32))


def test_nan_codes_and_overflow(small: Path) -> None:
    q = load_file(small / "model.safetensors")["m.c.weight"]
    q.view(torch.uint8)[40, 3] = 0x7F  # E4M3's NaN
    _edit(small, m__c__weight=q)
    _refused(
        small,
        "tensor 'm.c.weight': holds NaN FP8 codes (1 in rows 0.., first at [40, 3])",
        on_dequantize=True,
    )
    q.view(torch.uint8)[40, 3] = 0x7E  # 448
    s = torch.full((2, 2), 1000.0)  # 448 * 1000 is beyond float16's 65504
    _edit(small, m__c__weight=q, m__c__weight_scale_inv=s)
    with open_base(small) as b:
        w = fp8.find_fp8(b)["m.c.weight"]
        assert fp8.dequantize(b, w, BF16).abs().max() == torch.tensor(448000.0).to(BF16)
        with pytest.raises(
            FormatError, match=r"tensor 'm.c.weight': dequantized to torch.float16 it overflows at \["
        ):
            fp8.dequantize(b, w, F16)


def test_ct_fp8_weight_without_its_scale(tmp_path: Path) -> None:
    qc = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            }
        },
    }
    q = torch.randn(8, 4).to(FP8)
    path = _write_base(
        tmp_path / "ct",
        {"a.weight": q, "a.weight_scale": torch.ones(8, 1, dtype=BF16), "b.weight": q.clone()},
        qc,
    )
    msg = _refused(path, "tensor 'b.weight': F8_E4M3 weight without its scale 'b.weight_scale'")
    assert msg.startswith(str(path / "model.safetensors"))
    _edit(path, b__weight_scale=torch.ones(4, 1, dtype=BF16))
    _refused(
        path,
        "tensor 'b.weight_scale': scale is [4, 1], but weight [8, 4] has one scale per output row: [8, 1]",
    )
