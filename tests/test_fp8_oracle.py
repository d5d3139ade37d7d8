"""The FP8 oracles of tests/fp8_factories.py, proven against transformers, compressed-tensors and PEFT.

- the factory writes the on-disk layout of real FP8 block-scaled checkpoints;
- the reference dequantization equals transformers' ``FineGrainedFP8Config(dequantize=True)`` bit for bit (bf16
  and fp32) wherever transformers derives the block right, and compressed-tensors' ``FP8BlockDequantizer``
  everywhere (partial last blocks too); where transformers gets partial blocks wrong, exactly how;
- the requantization rule round-trips bit for bit, and a requantized merge loads in transformers within FP8's
  rounding of PEFT's merge;
- compressed-tensors' FP8 layouts (block, channel, tensor) and their decompression rule.
"""

from __future__ import annotations

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
    peft_merged_on_reference,
    quantize_blocks,
    quantize_blocks_transformers,
    read_fp8_base,
    reference_dequantized,
    save_fp8_base,
    save_requantized,
    transformers_dequantized,
    transformers_derives_block,
)

BF16, F32 = torch.bfloat16, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
BLOCKS = pytest.mark.parametrize("block", [(128, 128), (32, 32)], ids=["b128", "b32"])
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _adapter(model, path: Path) -> Path:
    return make_adapter(model, path, std=0.05, r=4, lora_alpha=8, target_modules=TARGETS)


def _quantized_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k.removesuffix("_scale_inv") for k in tensors if k.endswith(".weight_scale_inv")]


@BLOCKS
def test_factory_writes_the_block_scaled_layout(tmp_path: Path, block: tuple[int, int]) -> None:
    from safetensors import safe_open

    model = fp8_llama(ceil=True)
    base = save_fp8_base(model, tmp_path / "fp8", block, max_shard_size="200KB")
    files = sorted(base.glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    dtypes, shapes = {}, {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                assert index[k] == f.name, k  # every scale sits in its weight's shard, and the index says so
                dtypes[k], shapes[k] = st.get_slice(k).get_dtype(), st.get_slice(k).get_shape()
    assert set(index) == set(dtypes)
    quantized = sorted(_quantized_keys(dtypes))
    assert len(quantized) == 7 and all(k.endswith("proj.weight") for k in quantized)
    for k in quantized:
        out, inp = shapes[k]
        assert dtypes[k] == "F8_E4M3" and dtypes[k + "_scale_inv"] == "F32"
        assert shapes[k + "_scale_inv"] == [-(-out // block[0]), -(-inp // block[1])]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [200, 256]  # a partial last block
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert dtypes[k] == "BF16"
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    assert cfg["dtype"] == "bfloat16"


@DTYPES
@BLOCKS
@pytest.mark.parametrize("rule", ["reference", "transformers"])
def test_reference_dequantize_equals_transformers_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype, block: tuple[int, int], rule: str
) -> None:
    base = save_fp8_base(fp8_llama(ceil=False), tmp_path / "fp8", block, rule=rule)
    ours = reference_dequantized(base, dtype)
    theirs = transformers_dequantized(base, dtype)
    assert set(ours) == set(theirs) and len(_quantized_keys(read_fp8_base(base)[0])) == 7
    for k, v in ours.items():
        assert same_bits(v, theirs[k]), k


@DTYPES
def test_moe_experts_dequantize_per_expert_then_fuse(tmp_path: Path, dtype: torch.dtype) -> None:
    # Qwen3-MoE checkpoints store each expert's projections (`experts.<e>.gate_proj.weight` + scale); transformers
    # dequantizes each one, then fuses them into `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj`
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
    model = tf.Qwen3MoeForCausalLM(cfg).to(BF16)
    base = save_fp8_base(model, tmp_path / "fp8", (32, 32))
    tensors, _, _ = read_fp8_base(base)
    assert "model.layers.0.mlp.experts.3.down_proj.weight_scale_inv" in tensors
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == BF16  # the router stays dense
    ours = reference_dequantized(base, dtype)
    theirs = transformers_dequantized(base, dtype)

    def experts(name: str) -> torch.Tensor:
        return torch.stack([ours[f"model.layers.0.mlp.experts.{e}.{name}.weight"] for e in range(4)])

    gate_up = torch.cat([experts("gate_proj"), experts("up_proj")], dim=1)
    assert same_bits(theirs["model.layers.0.mlp.experts.gate_up_proj"], gate_up)
    assert same_bits(theirs["model.layers.0.mlp.experts.down_proj"], experts("down_proj"))
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate.weight", "lm_head.weight"):
        assert same_bits(theirs[k], ours[k]), k


@DTYPES
def test_transformers_mis_scales_partial_blocks_when_the_dim_divides_by_the_grid(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # 128-blocks on the CEIL model: k/v (100 rows: one block) and the mlp are right; q_proj (200 rows, grid 2)
    # and o_proj (200 columns) are scaled with blocks of 100 (dim // grid), i.e. wrongly
    base = save_fp8_base(fp8_llama(ceil=True), tmp_path / "fp8", (128, 128))
    tensors, block, _ = read_fp8_base(base)
    ours = reference_dequantized(base, dtype)
    theirs = transformers_dequantized(base, dtype)
    wrong = {
        k for k in _quantized_keys(tensors) if not transformers_derives_block(tuple(tensors[k].shape), block)
    }
    assert wrong == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"}
    for k, v in ours.items():
        if k not in wrong:
            assert same_bits(v, theirs[k]), k
            continue
        assert not torch.equal(v, theirs[k]), k
        q, s = tensors[k], tensors[k + "_scale_inv"]
        derived = (q.shape[0] // s.shape[0], q.shape[1] // s.shape[1])
        assert derived in {(100, 128), (128, 100)}
        assert same_bits(dequantize_blocks(q, s, derived, dtype), theirs[k]), k  # exactly that mistake


def test_transformers_refuses_partial_blocks_the_grid_does_not_divide(tmp_path: Path) -> None:
    # 32-blocks: q_proj has 200 rows and a grid of 7 (200 % 7 != 0); DeepSeek-V3's kv_a_proj_with_mqa
    # ([576, 7168], grid [5, 56] at 128) is the same case
    base = save_fp8_base(fp8_llama(ceil=True), tmp_path / "fp8", (32, 32))
    with pytest.raises(RuntimeError, match="automatic conversion"):
        transformers_dequantized(base, BF16)
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q, s = quantize_blocks(torch.randn(576, 300), (128, 128))
    with pytest.raises(ValueError, match="not divisible by scale grid"):
        Fp8Dequantize(None)._dequantize_one(q, s, torch.bfloat16)


@DTYPES
@BLOCKS
def test_reference_dequantize_equals_compressed_tensors_fp8_block_dequantizer(
    tmp_path: Path, dtype: torch.dtype, block: tuple[int, int]
) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    base = save_fp8_base(fp8_llama(ceil=True), tmp_path / "fp8", block)
    tensors, _, _ = read_fp8_base(base)
    ct = FP8BlockDequantizer(weight_block_size=block, dtype=dtype)
    keys = _quantized_keys(tensors)
    assert any(not transformers_derives_block(tuple(tensors[k].shape), block) for k in keys)
    ours = reference_dequantized(base, dtype)
    for k in keys:
        theirs = ct._create_dequantized_weight(tensors[k], tensors[k + "_scale_inv"])
        assert same_bits(ours[k], theirs.contiguous()), k


@DTYPES
def test_merge_oracles_agree_where_transformers_dequantizes_right(tmp_path: Path, dtype: torch.dtype) -> None:
    model = fp8_llama(ceil=False)
    base = save_fp8_base(model, tmp_path / "fp8", (32, 32))
    ad = _adapter(model, tmp_path / "ad")
    on_transformers = peft_merged_on_dequantized(base, ad, dtype)
    on_reference = peft_merged_on_reference(base, ad, dtype)
    dequantized = reference_dequantized(base, dtype)
    assert set(on_transformers) == set(on_reference) == set(dequantized)
    changed = set()
    for k, v in on_transformers.items():
        assert same_bits(v, on_reference[k]), k
        if not same_bits(v, dequantized[k]):
            changed.add(k.split(".")[-2])
    assert changed == set(TARGETS)


@pytest.mark.parametrize("block", [(128, 128), (32, 32), (128, 32), (16, 64)])
def test_requantize_round_trips_bit_for_bit(tmp_path: Path, block: tuple[int, int]) -> None:
    base = save_fp8_base(fp8_llama(ceil=True, seed=3), tmp_path / "fp8", block)
    tensors, _, _ = read_fp8_base(base)
    keys = _quantized_keys(tensors)
    assert len(keys) == 7
    for k in keys:
        q, s = tensors[k], tensors[k + "_scale_inv"]
        q2, s2 = quantize_blocks(dequantize_blocks(q, s, block, F32), block)
        assert same_bits(q2, q) and same_bits(s2, s), k
    # the whole checkpoint: an unchanged model requantized is the base, byte for byte per tensor
    again = save_requantized(base, reference_dequantized(base, F32), tmp_path / "again")
    copy, _, cfg = read_fp8_base(again)
    assert set(copy) == set(tensors) and cfg == read_fp8_base(base)[2]
    for k, v in tensors.items():
        assert same_bits(copy[k], v), k


def test_the_requantize_scale_rule_round_trips_for_every_float32_amax() -> None:
    # every float32 amax in [1, 2) (2**23 values; other binades are power-of-two scalings of these):
    # s = amax / 448, and the dequantized block's amax is 448 * s, so round-tripping needs (448 * s) / 448 == s
    amax = (torch.arange(2**23, dtype=torch.int32) + (127 << 23)).view(torch.float32)
    s = amax / 448.0
    assert torch.equal((448.0 * s) / 448.0, s)
    assert torch.equal((amax / s).to(FP8).float(), torch.full_like(amax, 448.0))  # the amax element is 448
    # transformers' rule (s = 1.0 / (448.0 / amax), python float over tensor: torch computes that as
    # 448 * (1 / amax), two roundings) does not: 11.8% of these scales change
    s_tf = 1.0 / (448.0 / amax)
    again = 1.0 / (448.0 / (448.0 * s_tf))
    assert 0.1 < (again != s_tf).float().mean().item() < 0.13
    # and so transformers' quantizer is no requantization rule for loractl: its checkpoint does not round-trip
    q, s1 = quantize_blocks_transformers(
        torch.randn(256, 384, generator=torch.Generator().manual_seed(0)), (32, 32)
    )
    q2, s2 = quantize_blocks_transformers(dequantize_blocks(q, s1, (32, 32), F32), (32, 32))
    assert not torch.equal(s2, s1)


def test_fp8_cast_rounds_to_nearest_even_and_saturates() -> None:
    x = torch.tensor([1.0625, 1.1875, 463.9, 464.0, 500.0, float("inf"), -1e9, 2.0**-10, 3 * 2.0**-10])
    assert x.to(FP8).float().tolist() == [1.0, 1.25, 448.0, 448.0, 448.0, 448.0, -448.0, 0.0, 2.0**-8]
    assert torch.tensor([float("nan")]).to(FP8).float().isnan().all()


@BLOCKS
def test_requantized_merge_loads_in_transformers_within_fp8_rounding(
    tmp_path: Path, block: tuple[int, int]
) -> None:
    model = fp8_llama(ceil=False, seed=5)
    base = save_fp8_base(model, tmp_path / "fp8", block)
    ad = _adapter(model, tmp_path / "ad")
    merged32 = peft_merged_on_dequantized(base, ad, F32)
    merged16 = peft_merged_on_dequantized(base, ad, BF16)
    out = save_requantized(base, merged32, tmp_path / "requantized")
    written, _, cfg = read_fp8_base(out)
    assert cfg["quantization_config"]["weight_block_size"] == list(block)
    loaded = transformers_dequantized(out, BF16)
    base32 = reference_dequantized(base, F32)
    base_tensors = read_fp8_base(base)[0]
    worst = 0.0
    for k in _quantized_keys(written):
        q, s = written[k], written[k + "_scale_inv"]
        assert q.dtype == FP8 and s.dtype == F32
        # transformers reads what we wrote
        assert same_bits(loaded[k], dequantize_blocks(q, s, block, BF16)), k
        scale = expand_scale(s, tuple(q.shape), block)
        m32 = merged32[k]
        # FP8 e4m3 rounding of the float32 merge: half an ulp is 2**-4 relative (normal values) or
        # scale * 2**-10 absolute (subnormal ones)
        fp8_bound = 2**-4 * m32.abs() + scale * 2**-10
        fp8_err = (dequantize_blocks(q, s, block, F32) - m32).abs()
        assert bool((fp8_err <= fp8_bound).all()), k
        worst = max(worst, (fp8_err / fp8_bound).max().item())
        # against PEFT's bf16 merge: that FP8 rounding plus bf16's (of the base, the update, the sum and the
        # loaded value: 2**-9 relative each, to the base's and the merge's magnitude where they cancel)
        err = (loaded[k].float() - merged16[k].float()).abs()
        assert bool((err <= fp8_bound + 2**-7 * (base32[k].abs() + m32.abs())).all()), k
        if k.split(".")[-2] in TARGETS:
            assert not same_bits(loaded[k], merged16[k]), k  # FP8 did round
        else:  # a weight the adapter does not touch keeps its FP8 bytes and scales
            assert same_bits(q, base_tensors[k]) and same_bits(s, base_tensors[k + "_scale_inv"]), k
            assert same_bits(loaded[k], merged16[k]), k
    assert worst > 0.5  # the FP8 bound is not loose
    for k in written:
        if not k.endswith("_scale_inv") and k + "_scale_inv" not in written:
            assert same_bits(loaded[k], merged16[k]), k


# ---- compressed-tensors ---------------------------------------------------------------------------------------

CT_SCHEMES = pytest.mark.parametrize(
    "scheme, block",
    [("FP8_BLOCK", None), ("FP8_BLOCK", (32, 32)), ("FP8_DYNAMIC", None), ("FP8", None)],
    ids=["block128", "block32", "channel", "tensor"],
)


@CT_SCHEMES
def test_compressed_tensors_layout_and_decompression_rule(
    tmp_path: Path, scheme: str, block: tuple[int, int] | None
) -> None:
    pytest.importorskip("compressed_tensors")
    from fp8_factories import ct_decompressed, reference_ct_dequantize, save_ct_fp8_base
    from safetensors.torch import load_file

    path = save_ct_fp8_base(fp8_llama(ceil=True), tmp_path / "ct", scheme, block)
    tensors = load_file(path / "model.safetensors")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 8 and weights["type"] == "float" and weights["symmetric"]
    strategy = {"FP8_BLOCK": "block", "FP8_DYNAMIC": "channel", "FP8": "tensor"}[scheme]
    assert weights["strategy"] == strategy
    grid = tuple(weights["block_structure"]) if strategy == "block" else None
    if strategy == "block":
        assert grid == (block or (128, 128))
    keys = [k.removesuffix("_scale") for k in tensors if k.endswith(".weight_scale")]
    assert len(keys) == 7 and "lm_head.weight_scale" not in tensors
    for k in keys:
        q, s = tensors[k], tensors[k + "_scale"]
        assert q.dtype == FP8 and s.dtype == BF16, k
        rows, cols = q.shape
        if strategy == "block":
            assert list(s.shape) == [-(-rows // grid[0]), -(-cols // grid[1])], k
        else:
            assert list(s.shape) == ([rows, 1] if strategy == "channel" else [1]), k
        assert (k.removesuffix("weight") + "input_scale" in tensors) == (scheme == "FP8"), k
    for dtype in (BF16, F32):
        theirs = ct_decompressed(path, dtype)
        for k in keys:
            ours = reference_ct_dequantize(tensors[k], tensors[k + "_scale"], dtype, grid)
            assert same_bits(ours, theirs[k]), (k, dtype)
        # in fp32, compressed-tensors' value is the bf16-rounded product (the product is computed in the
        # scale's dtype), not the exact float32 product the fp8 block-scaled rule gives
        k = keys[0]
        s = tensors[k + "_scale"].float()
        s = expand_scale(s, tuple(tensors[k].shape), grid) if grid else s.reshape(-1, 1)
        exact = tensors[k].float() * s
        assert torch.equal(theirs[k], exact.to(BF16).to(dtype))
        assert dtype == BF16 or not torch.equal(theirs[k], exact)
