"""The oracles of tests/extract_oracle.py, checked: the tuned-pair factories, the dense-SVD rule, and
mergekit-extract-lora's output read back with PEFT and measured against the rule.

The mergekit tests skip (with the reason) when no mergekit venv is found; see extract_oracle.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_st
from extract_oracle import (
    LINEAR_SUFFIXES,
    dense_svd_fp32,
    dense_svd_fp64,
    make_tuned_pair,
    mergekit_rule,
    optimal_relative_error,
    relative_error,
    run_mergekit_extract,
)

RANK = 8


# --- the factories -------------------------------------------------------------------------------


def _svdvals(d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(d.double())


def test_lowrank_pair_changes_every_projection_by_an_exact_low_rank_update(tmp_path):
    pair = make_tuned_pair(tmp_path, "lowrank", rank=RANK)
    lin = pair.linear_deltas()
    assert len(lin) == 2 * len(LINEAR_SUFFIXES)  # 2 layers x 7 projections
    assert set(lin) == set(pair.deltas)  # nothing else changed
    assert not pair.resized
    for name, d in lin.items():
        s = _svdvals(d)
        # rank RANK up to the float32 rounding of the saved weights
        assert s[RANK - 1] / s[0] > 1e-3, name
        assert s[RANK] / s[0] < 1e-5, name
    # the folders are ordinary transformers checkpoints
    import transformers as tf

    tuned = tf.LlamaForCausalLM.from_pretrained(pair.tuned_dir, dtype=torch.float32)
    base = read_st(pair.base_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(tuned.state_dict()[name].double() - base[name].double(), lin[name])


def test_lowrank_pair_noise_makes_the_update_full_rank_with_a_small_tail(tmp_path):
    pair = make_tuned_pair(tmp_path, "lowrank", rank=RANK, noise=1e-3)
    for name, d in pair.linear_deltas().items():
        s = _svdvals(d)
        assert s[-1] > 1e-6, name  # full rank: far above the float32 rounding of the weights (~1e-7)
        assert s[RANK] > 1e-3, name  # a tail of the noise's size (1e-3 * ~sqrt(n))
        assert 0 < optimal_relative_error(d, RANK) < 0.05, name


def test_fullrank_pair_has_a_slowly_decaying_full_spectrum(tmp_path):
    pair = make_tuned_pair(tmp_path, "fullrank", decay=0.3)
    for name, d in pair.linear_deltas().items():
        s = _svdvals(d)
        n = min(d.shape)
        assert s[-1] / s[0] == pytest.approx(1 / n**0.3, rel=1e-4), name
        # a rank-8 truncation leaves most of the update behind, as for a full fine-tune
        assert optimal_relative_error(d, RANK) > 0.5, name
    assert any("norm" in k for k in pair.deltas)
    flat = make_tuned_pair(tmp_path / "flat", "fullrank", decay=0.0)
    s = _svdvals(next(iter(flat.linear_deltas().values())))
    assert s[-1] / s[0] == pytest.approx(1.0, rel=1e-5)


def test_vocab_pair_grows_embeddings_and_head(tmp_path):
    pair = make_tuned_pair(tmp_path, "vocab", extra_vocab=8)
    assert pair.resized == {
        "model.embed_tokens.weight": ((96, 32), (104, 32)),
        "lm_head.weight": ((96, 32), (104, 32)),
    }
    assert json.loads((pair.tuned_dir / "config.json").read_text())["vocab_size"] == 104
    assert json.loads((pair.base_dir / "config.json").read_text())["vocab_size"] == 96
    t, b = read_st(pair.tuned_dir), read_st(pair.base_dir)
    assert not torch.equal(
        t["model.embed_tokens.weight"][:96], b["model.embed_tokens.weight"]
    )  # old rows changed too
    assert len(pair.linear_deltas()) == 14


def test_norms_pair_changes_norms_and_biases(tmp_path):
    pair = make_tuned_pair(tmp_path, "norms")
    changed = set(pair.deltas)
    biases = {k for k in changed if k.endswith(".bias")}
    norms = {k for k in changed if "norm" in k}
    assert len(biases) == 14  # attention_bias + mlp_bias: every projection of 2 layers
    assert norms == {
        "model.norm.weight",
        *(
            f"model.layers.{i}.{n}.weight"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    assert len(pair.linear_deltas()) == 14


def test_bf16_pair_deltas_are_exact_differences_of_the_saved_tensors(tmp_path):
    pair = make_tuned_pair(tmp_path, "lowrank", dtype=torch.bfloat16)
    t, b = read_st(pair.tuned_dir), read_st(pair.base_dir)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    for k, d in pair.deltas.items():
        assert torch.equal(t[k].double() - b[k].double(), d), k


# --- the reference rule --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (16, 32)])
def test_dense_svd_is_the_eckart_young_truncation_with_sqrt_s_on_each_side(shape):
    g = torch.Generator().manual_seed(3)
    d = torch.randn(*shape, generator=g, dtype=torch.float64)
    a64, b64 = dense_svd_fp64(d, RANK)
    a32, b32 = dense_svd_fp32(d, RANK)
    assert a64.shape == a32.shape == (RANK, shape[1]) and b64.shape == b32.shape == (shape[0], RANK)
    assert a32.dtype == torch.float32 and a64.dtype == torch.float64
    # optimal: the error is exactly the discarded singular values
    assert relative_error(d, a64, b64) == pytest.approx(optimal_relative_error(d, RANK), rel=1e-12)
    assert relative_error(d, a32, b32) == pytest.approx(optimal_relative_error(d, RANK), rel=1e-5)
    # balanced split: A A^T = B^T B = diag(S[:r])
    s = torch.linalg.svdvals(d)[:RANK]
    torch.testing.assert_close(a64 @ a64.T, torch.diag(s))
    torch.testing.assert_close(b64.T @ b64, torch.diag(s))


def test_dense_svd_rank_above_the_matrix_rank_is_exact():
    d = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = dense_svd_fp64(d, 16)
    assert a.shape == (4, 4) and b.shape == (6, 4)
    torch.testing.assert_close(b @ a, d)
    with pytest.raises(ValueError, match="2-D"):
        dense_svd_fp32(torch.zeros(2, 3, 4), 2)


# --- mergekit-extract-lora, read back with PEFT --------------------------------------------------

_CASES = {
    # name: (kind, make_tuned_pair keywords, extra mergekit args)
    "lowrank-noise": ("lowrank", {"noise": 1e-3}, ()),
    "fullrank": ("fullrank", {}, ()),
    "vocab": ("vocab", {}, ()),
    "norms-bf16": ("norms", {"dtype": torch.bfloat16}, ()),
}


@pytest.fixture(scope="module")
def extracted(request, tmp_path_factory):
    """(pair, out_dir) for a case of _CASES: mergekit run once per case and module."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            kind, kw, extra = _CASES[case]
            tmp = tmp_path_factory.mktemp(case)
            pair = make_tuned_pair(tmp, kind, rank=RANK, **kw)
            out = run_mergekit_extract(pair.base_dir, pair.tuned_dir, tmp / "out", RANK, *extra)
            cache[case] = (pair, out)
        return cache[case]

    return get


def _peft_merged(pair, out: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    import peft
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(pair.base_dir, dtype=dtype)
    if pair.resized:
        model.resize_token_embeddings(tf.AutoConfig.from_pretrained(pair.tuned_dir).vocab_size)
    pm = peft.PeftModel.from_pretrained(model, out)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _factors(sd: dict[str, torch.Tensor], weight_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    mod = "base_model.model." + weight_name.removesuffix(".weight")
    return sd[f"{mod}.lora_A.weight"], sd[f"{mod}.lora_B.weight"]


@pytest.mark.parametrize("case", ["lowrank-noise", "fullrank", "vocab"])
def test_mergekit_fp32_error_matches_dense_svd_fp32(case, extracted):
    pair, out = extracted(case)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == RANK  # scale 1
    assert sorted(cfg["target_modules"]) == sorted(LINEAR_SUFFIXES)
    sd = read_st(out)
    lin = pair.linear_deltas()
    assert len(lin) == 14
    for name, d in lin.items():
        a, b = _factors(sd, name)
        assert a.shape == (RANK, d.shape[1]) and b.shape == (d.shape[0], RANK), name
        ra, rb = dense_svd_fp32(d, RANK)
        e_mk, e_ref = relative_error(d, a, b), relative_error(d, ra, rb)
        assert e_mk == pytest.approx(e_ref, rel=1e-4, abs=1e-6), name
        # and no rank-8 factorisation beats Eckart-Young: the fp32 rule is within fp32 rounding of it
        assert e_ref == pytest.approx(optimal_relative_error(d, RANK), rel=1e-4, abs=1e-6), name

    # PEFT reads it as meant: merged W = base W + B @ A (scale alpha/r = 1); modules_to_save are the tuned tensors
    merged, base, tuned = _peft_merged(pair, out), read_st(pair.base_dir), read_st(pair.tuned_dir)
    for name in lin:
        a, b = _factors(sd, name)
        torch.testing.assert_close(merged[name], base[name] + b @ a, rtol=0, atol=1e-5)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(merged[name], tuned[name]), name


def test_mergekit_lowrank_update_is_recovered_up_to_the_noise(extracted):
    pair, out = extracted("lowrank-noise")
    sd = read_st(out)
    for name, d in pair.linear_deltas().items():
        a, b = _factors(sd, name)
        assert relative_error(d, a, b) < 0.05, name


def test_mergekit_vocab_resize_goes_to_modules_to_save(extracted):
    pair, out = extracted("vocab")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["modules_to_save"])
    sd, tuned = read_st(out), read_st(pair.tuned_dir)
    for name in pair.resized:
        assert torch.equal(sd[f"base_model.model.{name}"], tuned[name]), name  # full tuned tensor, new size


def test_mergekit_bf16_follows_its_rule_norms_saved_biases_lost(extracted):
    """bf16 storage: mergekit subtracts in bf16 and casts the factors to bf16, so it is measured against
    ``mergekit_rule``, not the exact-delta rule. RMSNorm weights go to modules_to_save at full rank; the
    biases of a Llama with attention_bias/mlp_bias are not in mergekit's llama architecture table and
    are dropped (the merged biases are the base's): a comparison with mergekit covers projection
    weights only."""
    pair, out = extracted("norms-bf16")
    sd, base, tuned = read_st(out), read_st(pair.base_dir), read_st(pair.tuned_dir)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for name, d in pair.linear_deltas().items():
        a, b = _factors(sd, name)
        ra, rb = mergekit_rule(base[name], tuned[name], RANK)
        assert relative_error(d, a, b) == pytest.approx(relative_error(d, ra, rb), rel=1e-3), name
        assert relative_error(d, a, b) >= optimal_relative_error(d, RANK) * (1 - 1e-6), name
    assert not any(k.endswith(".bias") for k in sd)
    merged = _peft_merged(pair, out, dtype=torch.bfloat16)
    for name in pair.deltas:
        if "norm" in name:
            assert torch.equal(merged[name], tuned[name]), name
        elif name.endswith(".bias"):
            assert torch.equal(merged[name], base[name]), name
