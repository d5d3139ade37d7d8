"""Merging into a bitsandbytes 4-bit (QLoRA) base: loractl dequantizes in pure torch, merges, writes bf16.

The oracle: transformers loads the base in 4 bits (bitsandbytes), ``model.dequantize()`` gives the
bf16 weights bitsandbytes computes, and PEFT's ``merge_and_unload`` merges into them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, read_st, same_bits, save_base

from loractl import api

pytest.importorskip("bitsandbytes")
BF16 = torch.bfloat16
LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
)


def _no_neg_zero(t: torch.Tensor) -> torch.Tensor:
    return t + 0.0  # FP4's zero code is -0.0 in some bitsandbytes kernels and +0.0 in others


@pytest.mark.parametrize(
    "quant_type, double",
    [("nf4", False), ("nf4", True), ("fp4", True)],
    ids=["nf4", "nf4-double", "fp4-double"],
)
def test_merge_into_4bit_base_equals_peft_on_dequantized_model(
    tmp_path: Path, quant_type: str, double: bool
) -> None:
    import peft
    import transformers as tf

    model = build_model("llama", BF16, **LLAMA)
    bf16 = save_base(model, tmp_path / "bf16")
    cfg = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=BF16,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
    )
    q = tf.LlamaForCausalLM.from_pretrained(bf16, quantization_config=cfg, device_map="cpu", dtype=BF16)
    q.save_pretrained(tmp_path / "q4", max_shard_size="16KB")
    ad = make_adapter(
        model, tmp_path / "ad", std=0.05, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )

    res = api.merge(tmp_path / "q4", [ad], tmp_path / "merged")
    assert res.receipt is None and res.notes and "4-bit" in res.notes[0]
    ours = read_st(tmp_path / "merged")
    assert all(v.dtype == BF16 for k, v in ours.items() if k.endswith("proj.weight"))
    assert not any(".absmax" in k or "quant_state" in k for k in ours)
    written_cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in written_cfg

    dq = q.dequantize(dtype=BF16)  # bitsandbytes' own dequantization, as bf16 Linear layers
    theirs = peft.PeftModel.from_pretrained(dq, ad).merge_and_unload().state_dict()
    for k, v in ours.items():
        assert same_bits(_no_neg_zero(v), _no_neg_zero(theirs[k].contiguous())), k
    # the merged folder loads as an ordinary bf16 model
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=BF16)
    assert isinstance(again.model.layers[0].self_attn.q_proj, torch.nn.Linear)

    info = api.inspect([ad], base=tmp_path / "q4").adapters[0].base
    assert info is not None and info.coverage.matched == 3 and not info.coverage.shape_mismatch
    assert info.quantized is not None
    assert info.quantized.quant_types == [quant_type] and info.quantized.double_quant is double
    bf16_bytes = sum(v.numel() * v.element_size() for v in read_st(bf16).values())
    assert info.quantized.merged_bytes == bf16_bytes
    assert info.bytes < bf16_bytes


def test_check_against_a_4bit_base_uses_the_real_shapes(tmp_path: Path) -> None:
    import transformers as tf

    from loractl.checks import check

    model = build_model("llama", BF16, **LLAMA)
    bf16 = save_base(model, tmp_path / "bf16")
    cfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=BF16, bnb_4bit_quant_type="nf4")
    tf.LlamaForCausalLM.from_pretrained(
        bf16, quantization_config=cfg, device_map="cpu", dtype=BF16
    ).save_pretrained(tmp_path / "q4")
    ad = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    r = check(ad, base=tmp_path / "q4", target="vllm")
    assert r.ok and not [f for f in r.findings if f.code in ("shape-mismatch", "unmatched-module")], (
        r.findings
    )
    wrong = make_adapter(
        build_model("llama", BF16, **{**LLAMA, "intermediate_size": 96}),
        tmp_path / "wrong",
        r=4,
        lora_alpha=8,
        target_modules=["down_proj"],
    )
    r = check(wrong, base=tmp_path / "q4")
    assert not r.ok and {f.code for f in r.findings} == {"shape-mismatch"}
