"""``loractl extract`` (issue #14) against its truths: a dense float64 SVD (Eckart-Young), mergekit's
rule (a dense float32 SVD at fixed rank, tests/extract_oracle.py), and PEFT loading the output.

Every pair here is real files: tiny transformers Llamas saved with ``save_pretrained``
(extract_oracle.make_tuned_pair), or a small torch module with a linear, a conv and an embedding
layer saved with safetensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_st
from extract_oracle import (
    dense_svd_fp32,
    make_tuned_pair,
    mergekit_rule,
    optimal_relative_error,
    relative_error,
)
from safetensors.torch import load_file, save_file

from loractl import api

PREFIX = "base_model.model."


def _factors(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(out / "adapter_model.safetensors")), json.loads((out / "adapter_config.json").read_text())


def _product(tensors: dict[str, torch.Tensor], cfg: dict, module: str) -> torch.Tensor:
    """scale · B·A of a linear module as PEFT computes it (alpha / r, patterns included)."""
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].double()
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].double()
    r = a.shape[0]
    alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"] if r == cfg["r"] else r)
    return (alpha / r) * (b @ a)


# --- exactness --------------------------------------------------------------------------------------


def test_an_exactly_low_rank_difference_gives_back_its_update(tmp_path: Path) -> None:
    """A model changed by exact rank-8 updates: --rank 16 writes rank 8 (never above the true rank),
    and B·A is the update to float rounding."""
    pair = make_tuned_pair(tmp_path, "lowrank", rank=8)
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=16)
    tensors, cfg = _factors(tmp_path / "out")
    assert len(r.modules) == len(pair.linear_deltas()) == 14
    for name, delta in pair.linear_deltas().items():
        module = name.removesuffix(".weight")
        rep = next(m for m in r.modules if m.name == module)
        assert rep.rank == 8 and tensors[f"{PREFIX}{module}.lora_A.weight"].shape[0] == 8
        err = float((delta - _product(tensors, cfg, module)).norm() / delta.norm())
        assert err < 1e-6, (module, err)
        assert rep.rel_error == pytest.approx(err, abs=1e-6)
    assert r.saved_full == [] and r.left_out == []
    # nothing but the LoRA factors: no tensor of an unchanged weight (embeddings, norms, lm_head)
    assert {k.rsplit(".lora_", 1)[0] for k in tensors} == {PREFIX + n.removesuffix(".weight") for n in pair.deltas}


def test_energy_rule_never_exceeds_the_true_rank(tmp_path: Path) -> None:
    pair = make_tuned_pair(tmp_path, "lowrank", rank=6)
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", energy=0.999999)
    assert {m.rank for m in r.modules} == {6}
    assert all(m.energy_kept > 0.999999 for m in r.modules)


# --- against the dense SVD truth and mergekit's rule ------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_same_rank_error_is_optimal_and_no_worse_than_mergekits_rule(tmp_path: Path, decay: float) -> None:
    """Full-rank updates, flat (decay 0) and slowly decaying (a full fine-tune's): at the same rank
    every module's error is within 1% of the float64 SVD optimum and no worse than mergekit's dense
    float32 SVD; the reported error is the true ‖ΔW − B·A‖_F / ‖ΔW‖_F of the file's factors."""
    pair = make_tuned_pair(tmp_path, "fullrank", decay=decay)
    rank = 5
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=rank)
    tensors, cfg = _factors(tmp_path / "out")
    reported = {m.name: m for m in r.modules}
    for name, delta in pair.linear_deltas().items():
        module = name.removesuffix(".weight")
        ours = float((delta - _product(tensors, cfg, module)).norm() / delta.norm())
        optimal = optimal_relative_error(delta, rank)
        a, b = dense_svd_fp32(delta.float(), rank)
        theirs = relative_error(delta, a, b)
        assert ours <= 1.01 * optimal, (module, ours, optimal)
        assert ours <= theirs + 1e-6, (module, ours, theirs)
        assert reported[module].rel_error == pytest.approx(ours, rel=1e-4, abs=1e-7)
        assert reported[module].energy_kept == pytest.approx(1 - ours**2, abs=1e-5)
    assert r.total.rel_error == pytest.approx(
        math.sqrt(sum((m.rel_error * m.norm) ** 2 for m in r.modules) / sum(m.norm**2 for m in r.modules))
    )


def test_bf16_pair_beats_mergekits_bf16_rule_on_every_module(tmp_path: Path) -> None:
    """bf16 checkpoints: mergekit subtracts in bf16 and writes bf16 factors; loractl subtracts in
    float32 (exact) and, with --dtype bf16, certifies the error of the bf16 factors it writes."""
    pair = make_tuned_pair(tmp_path, "lowrank", rank=8, noise=2e-3, dtype=torch.bfloat16)
    base, tuned = read_st(pair.base_dir), read_st(pair.tuned_dir)
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=8, dtype="bf16")
    tensors, cfg = _factors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    reported = {m.name: m for m in r.modules}
    for name, delta in pair.linear_deltas().items():
        module = name.removesuffix(".weight")
        ours = float((delta - _product(tensors, cfg, module)).norm() / delta.norm())
        a, b = mergekit_rule(base[name], tuned[name], 8)
        theirs = relative_error(delta, a, b)
        assert ours <= theirs, (module, ours, theirs)
        assert reported[module].rel_error == pytest.approx(ours, rel=1e-3)


def test_randomized_method_on_a_flat_spectrum_is_within_one_percent(tmp_path: Path) -> None:
    """Matrices large enough for the randomized range finder (rank 8 of 384×512): on a flat
    spectrum (Gaussian noise, the hardest case) the certified error is within 1% of the optimum."""
    g = torch.Generator().manual_seed(3)
    base = {"net.proj.weight": torch.randn(384, 512, generator=g), "net.out.weight": torch.randn(512, 384, generator=g)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    r = api.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out", rank=8)
    tensors, cfg = _factors(tmp_path / "out")
    for m in r.modules:
        assert m.method == "randomized"
        delta = tuned[f"{m.name}.weight"].double() - base[f"{m.name}.weight"].double()
        ours = float((delta - _product(tensors, cfg, m.name)).norm() / delta.norm())
        assert ours <= 1.01 * optimal_relative_error(delta, 8)
        assert m.rel_error == pytest.approx(ours, rel=1e-5)


# --- PEFT loads the output ------------------------------------------------------------------------


def _llama(folder: Path):
    import transformers as tf

    return tf.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["lowrank", "norms", "vocab"])
def test_peft_loads_the_adapter_and_its_merge_is_the_tuned_model(tmp_path: Path, kind: str) -> None:
    """Exact updates (+ changed norms and biases, or a resized vocabulary): PEFT loads the output,
    its merged weights equal the tuned model's and so do its logits."""
    from peft import PeftModel

    pair = make_tuned_pair(tmp_path, kind, rank=8)
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=8)
    base = _llama(pair.base_dir)
    if kind == "vocab":
        base.resize_token_embeddings(base.config.vocab_size + 8)
        assert any("resize_token_embeddings(104)" in n for n in r.notes)
    tuned = _llama(pair.tuned_dir)
    merged = PeftModel.from_pretrained(base, tmp_path / "out").merge_and_unload()
    want = tuned.state_dict()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-5, rtol=0), k
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
    if kind == "norms":
        assert r.lora_bias and any("lora_B.bias" in n for n in r.notes)
        assert {s.name for s in r.saved_full} == {n for n in pair.deltas if "norm" in n}


class Net(torch.nn.Module):
    """A linear, a conv and an embedding layer (and a norm and an unchanged head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 24)
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.lin = torch.nn.Linear(24, 40)
        self.norm = torch.nn.LayerNorm(40)
        self.head = torch.nn.Linear(40, 10)


def _low_rank(m: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return 0.1 * torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)


def _net_pair(tmp_path: Path, bias: bool = False) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, int]]:
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = dict(base)
    ranks = {"embed_tokens": 3, "conv": 2, "lin": 4}
    tuned["embed_tokens.weight"] = base["embed_tokens.weight"] + _low_rank(50, 24, 3, g)
    tuned["conv.weight"] = base["conv.weight"] + _low_rank(16, 27, 2, g).reshape(16, 3, 3, 3)
    tuned["lin.weight"] = base["lin.weight"] + _low_rank(40, 24, 4, g)
    tuned["norm.weight"] = base["norm.weight"] + 0.05 * torch.randn(40, generator=g)
    if bias:
        tuned["lin.bias"] = base["lin.bias"] + 0.05 * torch.randn(40, generator=g)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tuned, ranks


@pytest.mark.parametrize("bias", [False, True])
def test_linear_conv_and_embedding_layers_load_in_peft(tmp_path: Path, bias: bool) -> None:
    """Linear (lora_A/B), conv ([r, in, kh, kw] / [out, r, 1, 1]) and embedding (lora_embedding_A/B)
    modules at their true ranks; the norm (and a changed bias) saved in full; PEFT's merge equals
    the tuned weights; the unchanged head is not in the adapter."""
    from peft import PeftModel

    b, t, tuned, ranks = _net_pair(tmp_path, bias)
    r = api.extract(b, t, tmp_path / "out", rank=8)
    tensors, cfg = _factors(tmp_path / "out")
    got = {m.name: (m.kind, m.rank) for m in r.modules}
    want = {"embed_tokens": ("embedding", 3), "conv": ("conv", 2), "lin": ("linear", 4)}
    if bias:  # a layer whose bias changed too is saved whole (lora_bias would cost the embedding's LoRA)
        del want["lin"]
        assert {"lin.weight", "lin.bias"} <= {s.name for s in r.saved_full} and not r.lora_bias
    assert got == want
    assert f"{PREFIX}embed_tokens.lora_embedding_A" in tensors and f"{PREFIX}embed_tokens.lora_embedding_B" in tensors
    assert tensors[f"{PREFIX}conv.lora_A.weight"].shape == (2, 3, 3, 3)
    assert not any(k.startswith(f"{PREFIX}head.") for k in tensors)
    # the norm changed in its weight only; PEFT's modules_to_save loads whole modules: its bias comes along
    assert {"norm.weight", "norm.bias"} <= {s.name for s in r.saved_full}
    net = Net()
    net.load_state_dict(load_file(str(b)))
    merged = PeftModel.from_pretrained(net, tmp_path / "out").merge_and_unload()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, tuned[k], atol=1e-5), k


def test_no_full_lists_what_is_left_out_and_writes_only_factors(tmp_path: Path) -> None:
    b, t, _, _ = _net_pair(tmp_path, bias=True)
    r = api.extract(b, t, tmp_path / "out", rank=8, full=False)
    tensors, cfg = _factors(tmp_path / "out")
    assert {s.name for s in r.left_out} == {"norm.weight", "lin.bias"}
    assert all("left out" in s.reason for s in r.left_out) and r.saved_full == []
    assert all(".lora_" in k for k in tensors) and not cfg.get("modules_to_save")


def test_module_glob_selects(tmp_path: Path) -> None:
    pair = make_tuned_pair(tmp_path, "lowrank", rank=4)
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=4, module=["*.layers.1.mlp.*"])
    assert [m.name for m in r.modules] == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
    tensors, _ = _factors(tmp_path / "out")
    assert len(tensors) == 6


def test_other_formats_by_to(tmp_path: Path) -> None:
    """--to writes what convert writes: a kohya file holds the same update."""
    pair = make_tuned_pair(tmp_path, "lowrank", rank=4)
    api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=4)
    api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "k.safetensors", rank=4, to="kohya")
    peft, kohya = api.load_adapter(tmp_path / "out"), api.load_adapter(tmp_path / "k.safetensors")
    assert kohya.format == "kohya" and len(peft.modules) == len(kohya.modules) == 14
    for n, m in peft.modules.items():  # kohya's names, read without a base, carry a guessed prefix
        (k,) = [k for k in kohya.modules if k.replace(".", "").replace("_", "").endswith(n.replace(".", "").replace("_", ""))]
        b1, a1 = m.matrices()
        b2, a2 = kohya.modules[k].matrices()
        want, got = m.scale * b1.double() @ a1.double(), kohya.modules[k].scale * b2.double() @ a2.double()
        assert torch.allclose(want, got, atol=1e-6), n


# --- the size budget --------------------------------------------------------------------------------


def test_budget_is_kept_and_beats_every_uniform_rank_that_fits(tmp_path: Path) -> None:
    """Greedy by kept energy per byte: the output fits the budget, its loss is within the
    allocator's lower bound, and no single rank for all modules that fits loses less."""
    pair = make_tuned_pair(tmp_path, "fullrank", decay=0.6)
    budget = 90_000
    r = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", budget=budget)
    assert r.bytes <= budget and r.budget is not None
    assert r.budget.lost_bound <= r.budget.lost + 1e-12
    assert len({m.rank for m in r.modules}) > 1  # ranks differ between modules
    total = sum(d.square().sum() for d in pair.linear_deltas().values())
    lost = sum((m.rel_error * m.norm) ** 2 for m in r.modules) / float(total)
    assert lost == pytest.approx(r.budget.lost, rel=1e-3)
    per_rank = sum((d.shape[0] + d.shape[1]) * 4 for d in pair.linear_deltas().values())  # fp32 factors
    assert r.budget.ranks_bytes <= r.budget.for_ranks
    tried = 0
    for k in range(1, 9):  # every uniform rank whose factors fit the bytes left for ranks loses more
        if k * per_rank <= r.budget.for_ranks:
            u = api.extract(pair.base_dir, pair.tuned_dir, tmp_path / f"u{k}", rank=k)
            assert lost <= u.total.rel_error**2 + 1e-9, k
            tried += 1
    assert tried >= 2


def test_truncate_budget_uses_the_same_allocator(tmp_path: Path) -> None:
    pair = make_tuned_pair(tmp_path, "fullrank", decay=0.6)
    api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "r8", rank=8)
    budget = 55_000
    r = api.truncate(tmp_path / "r8", tmp_path / "t", budget=budget)
    size = sum(f.stat().st_size for f in (tmp_path / "t").iterdir())
    assert size <= budget
    ranks = {m.name: m.rank_after for m in r.modules}
    assert len(set(ranks.values())) > 1 and all(k >= 1 for k in ranks.values())


# --- mergekit itself (skipped without a mergekit venv; never a runtime dependency) --------------------


def test_no_worse_than_mergekit_extract_lora_on_every_module(tmp_path: Path) -> None:
    """mergekit-extract-lora run as a subprocess from its own venv (tests/extract_oracle.py), on a
    rank-8 + noise float32 pair at rank 4: loractl's error against the exact update is no larger on
    any module (both are the truncated SVD; the tolerance is float32 rounding)."""
    from extract_oracle import run_mergekit_extract

    pair = make_tuned_pair(tmp_path, "lowrank", rank=8, noise=1e-2)
    theirs_dir = run_mergekit_extract(pair.base_dir, pair.tuned_dir, tmp_path / "mk", 4)
    api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "out", rank=4)
    ours_t, ours_cfg = _factors(tmp_path / "out")
    theirs_t, theirs_cfg = _factors(theirs_dir)
    for name, delta in pair.linear_deltas().items():
        module = name.removesuffix(".weight")
        ours = float((delta - _product(ours_t, ours_cfg, module)).norm() / delta.norm())
        theirs = float((delta - _product(theirs_t, theirs_cfg, module)).norm() / delta.norm())
        assert ours <= theirs * (1 + 1e-6), (module, ours, theirs)
        assert ours <= 1.01 * optimal_relative_error(delta, 4)
