"""loractl.formats.experts and loractl.ops.experts against transformers and PEFT themselves.

The facts (:data:`ARCHS`: registration order, ``is_transposed``, experts modules, the config's expert count)
are compared with the transformers classes of tiny models; the rule (``parameter_of`` -> ``pieces`` ->
``expert_factors`` / ``expert_delta`` / ``merge_``, applied tensor by tensor to the base's safetensors as the
planner will) with PEFT's ``merge_and_unload`` + ``save_pretrained`` bit for bit, for every architecture, fp32
and bf16, the checkpoint layout and the fused one. Tiny models and PEFT adapters come from tests/moe_factories.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import same_bits
from moe_factories import (
    ARCHS,
    LAYOUTS,
    E,
    build_moe,
    make_moe_adapter,
    peft_moe_merged,
    read_st,
    save_moe_base,
)
from moe_factories import expert_delta as oracle_mm_delta

from loractl.errors import FormatError, InputError, LoractlError, ShapeMismatchError, UnsupportedAdapterError
from loractl.formats import experts as fx
from loractl.formats.names import NameResolver
from loractl.formats.peft import module_alpha_rank
from loractl.ops import experts as ox
from loractl.ops import residual

PFX = "base_model.model."
#: each arch's router, a 2-D parameter targeted next to the experts (renamed on disk for some archs)
ROUTER = {
    "gpt_oss": "router.weight",
    "jamba": "router.weight",
    "phimoe": "router.weight",
    "granitemoe": "router.weight",
    "llama4": "router.weight",
    "hunyuan_v1_moe": "wg.weight",
    "dbrx": "router.layer.weight",
}
#: the expert parameters each test adapter targets: LAYOUTS' (GPT-OSS also its 2-D biases: four nested wrappers)
TARGETS = {a: [p.name for p in lay.params] for a, lay in LAYOUTS.items()}
TARGETS["gpt_oss"] = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]
#: the model type transformers writes in config.json, when not the LAYOUTS key
MODEL_TYPE = {"llama4": "llama4_text"}


def loractl_merge(base_dir: Path, adapter_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The base's safetensors with the adapters merged by loractl's experts rule, one base tensor at a time (the
    adapters here target parameters only): key -> parameter (nesting), r/alpha by the parameter's name, E from
    lora_A, base tensor positions from the base's own names and shapes, each expert's update rounded then added."""
    config = json.loads((base_dir / "config.json").read_text())
    model_type = fx.model_type_of(config)
    base = read_st(base_dir)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    resolver = NameResolver(shapes)
    todo: dict[str, list] = {}
    for ad_dir in adapter_dirs:
        cfg = json.loads((ad_dir / "adapter_config.json").read_text())
        ad = read_st(ad_dir)
        for key in sorted(k for k in ad if k.endswith(".lora_A.weight")):
            prefix = key[len(PFX) : -len(".lora_A.weight")]
            param = fx.parameter_of(prefix, cfg["target_parameters"], model_type, source=str(ad_dir))
            assert param is not None, key
            a, b = ad[key], ad[f"{PFX}{prefix}.lora_B.weight"]
            alpha, r = module_alpha_rank(cfg, param, a.shape[0])
            n_exp = ox.rank_per_expert(a, r)  # E = r·E / r
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            factors = ox.expert_factors(a, b, n_exp)
            for p in fx.pieces(
                shapes, config, param, n_exp, (b.shape[0], a.shape[1]), source=str(ad_dir), resolver=resolver
            ):
                todo.setdefault(p.tensor, []).append((p, factors[p.expert], s, n_exp == 1))
    out = {}
    for name, t in base.items():
        w = t.clone()
        for p, (a_e, b_e), s, single in todo.get(name, []):
            d = ox.expert_delta(a_e, b_e, s, p.transposed, single=single)
            ox.merge_(w if p.index is None else w[p.index], d if p.rows is None else d[p.rows])
        out[name] = w
    return out


def _diff(got: dict, want: dict) -> list[str]:
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    return [k for k in want if not same_bits(got[k], want[k])]


def _adapters(arch: str, router: bool = True) -> list[dict]:
    """Two adapters on the same parameters: plain, and rsLoRA with rank/alpha patterns on parameter names (one a
    regex on a full name)."""
    lay = LAYOUTS[arch]
    targets = TARGETS[arch] + ([ROUTER.get(arch, "gate.weight")] if router else [])
    first, last = targets[0], TARGETS[arch][-1]
    layer = lay.moe_layers[-1]
    full = lay.experts.format(layer=layer).replace(".", r"\.")
    return [
        dict(target_parameters=targets, r=3, lora_alpha=5, rank_pattern={last: 2}, alpha_pattern={first: 11}),
        dict(
            target_parameters=targets,
            r=4,
            lora_alpha=3,
            use_rslora=True,
            alpha_pattern={rf"{full}\.{last}": 9},
        ),
    ]


def _case(tmp: Path, arch: str, dtype, fused: bool, adapters: list[dict], **build):
    model = build_moe(arch, dtype, **build)
    base_dir = save_moe_base(model, tmp / "base", fused=fused)
    dirs = [make_moe_adapter(model, tmp / f"ad{i}", seed=10 + i, **kw) for i, kw in enumerate(adapters)]
    merged = read_st(peft_moe_merged(base_dir, dirs, dtype, arch, tmp / "merged"))
    return base_dir, dirs, merged


# --- the facts, against transformers' classes -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_facts_are_transformers(arch, tmp_path):
    """Per model type: the experts modules ARCHS recognises are exactly the modules holding the expert parameters,
    their parameters in ARCHS' order are the class's registration order (PEFT's nesting order), is_transposed is
    the class's, and the expert count is read from the config.json transformers writes."""
    model = build_moe(arch, torch.float32)
    cfg = json.loads(save_moe_base(model, tmp_path / "b").joinpath("config.json").read_text())
    assert fx.model_type_of(cfg) == MODEL_TYPE.get(arch, arch)
    spec = fx.ARCHS[fx.model_type_of(cfg)]
    assert fx.num_experts(cfg) == E
    lay = LAYOUTS[arch]
    want = {lay.experts.format(layer=layer) for layer in lay.moe_layers}
    seen = set()
    for name, mod in model.named_modules():
        if spec.is_experts(name):
            seen.add(name)
            assert [n for n, _ in mod.named_parameters(recurse=False)] == list(spec.params)
            assert getattr(mod, "is_transposed", False) is spec.is_transposed
    assert seen == want


def test_model_type_and_count_from_hub_style_configs():
    """Hub configs spell the count their own way (Qwen3-MoE ``num_experts``; transformers 5 writes
    ``num_local_experts``); multimodal configs keep the text model under ``text_config``."""
    assert fx.num_experts({"model_type": "qwen3_moe", "num_experts": 128}) == 128
    assert (
        fx.num_experts({"model_type": "deepseek_v3", "n_routed_experts": 256, "n_shared_experts": 1}) == 256
    )
    assert fx.num_experts({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 16}}) == 16
    llama4 = {"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_local_experts": 16}}
    assert fx.model_type_of(llama4) == "llama4_text" and fx.num_experts(llama4) == 16
    assert fx.model_type_of({"model_type": "llava", "text_config": {"model_type": "mixtral"}}) == "mixtral"
    assert fx.num_experts({"model_type": "llama"}) is None


# --- the merge, against PEFT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["ondisk", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_peft(arch, dtype, fused, tmp_path):
    """Two adapters (patterns, rsLoRA) on every expert parameter and the router, merged tensor by tensor into the
    base's own layout: PEFT's merged save bit for bit, and every targeted tensor changed."""
    base_dir, dirs, merged = _case(tmp_path, arch, dtype, fused, _adapters(arch))
    got = loractl_merge(base_dir, dirs)
    assert _diff(got, merged) == []
    base = read_st(base_dir)
    changed = {k for k in base if not same_bits(base[k], got[k])}
    assert len(changed) >= len(LAYOUTS[arch].moe_layers) * 2  # experts and routers, at least
    if dtype == torch.bfloat16:  # one rounding (bf16 += fp32) would not be PEFT's
        one = loractl_merge_one_rounding(base_dir, dirs)
        assert _diff(one, merged)


def loractl_merge_one_rounding(base_dir, dirs):
    """The negative control: the same rule with lora.Linear's single rounding."""
    real = ox.merge_
    try:
        ox.merge_ = lambda w, d: w.copy_(w.float() + d)
        return loractl_merge(base_dir, dirs)
    finally:
        ox.merge_ = real


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("qwen3_moe", ["down_proj"]),
        ("qwen3_moe", ["mlp.experts.gate_up_proj"]),
        ("mixtral", ["gate_up_proj", "gate.weight"]),
        ("gpt_oss", ["down_proj"]),
        ("gpt_oss", ["gate_up_proj_bias", "down_proj"]),
    ],
)
def test_some_parameters_only(arch, targets, tmp_path):
    """One parameter alone is ``experts.lora_*`` whichever it is; two of four are nested by registration order;
    the others stay untouched."""
    base_dir, dirs, merged = _case(
        tmp_path, arch, torch.bfloat16, False, [dict(target_parameters=targets, r=2, lora_alpha=3)]
    )
    assert _diff(loractl_merge(base_dir, dirs), merged) == []


def test_small_experts_take_peft_einsum_path(tmp_path):
    """r·out·in < 400 per expert: torch's bmm (PEFT's einsum) sums without BLAS there, so ``B_e @ A_e`` is not
    PEFT's product; expert_delta is (bit for bit, bf16 and a merge that would show one ulp)."""
    small = dict(hidden_size=8, moe_intermediate_size=4, head_dim=4)
    base_dir, dirs, merged = _case(
        tmp_path,
        "qwen3_moe",
        torch.float32,
        False,
        [dict(target_parameters=["gate_up_proj"], r=2, lora_alpha=3)],
        **small,
    )
    assert _diff(loractl_merge(base_dir, dirs), merged) == []
    a = read_st(dirs[0])[f"{PFX}model.layers.0.mlp.experts.lora_A.weight"]
    b = read_st(dirs[0])[f"{PFX}model.layers.0.mlp.experts.lora_B.weight"]
    ours = [ox.expert_delta(a_e, b_e, 1.5) for a_e, b_e in ox.expert_factors(a, b, E)]
    mm = [oracle_mm_delta(a, b, e, E, 1.5, False) for e in range(E)]
    assert any(not same_bits(x, y) for x, y in zip(ours, mm))


def test_bf16_adapter_file(tmp_path):
    """Factors saved in bf16: PEFT upcasts them whole to float32 when loading; expert_factors does the same."""
    from safetensors.torch import save_file

    model = build_moe("qwen3_moe", torch.bfloat16)
    base_dir = save_moe_base(model, tmp_path / "base")
    ad = make_moe_adapter(model, tmp_path / "ad", r=3, lora_alpha=5)
    f = ad / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in read_st(ad).items()}, str(f))
    merged = read_st(peft_moe_merged(base_dir, [ad], torch.bfloat16, "qwen3_moe", tmp_path / "merged"))
    assert _diff(loractl_merge(base_dir, [ad]), merged) == []


@pytest.mark.parametrize("n_exp, r, out, inp", [(4, 3, 40, 32), (8, 2, 6, 5), (2, 1, 3, 3), (16, 8, 96, 64)])
@pytest.mark.parametrize("transposed", [False, True])
def test_expert_delta_is_peft_einsum(n_exp, r, out, inp, transposed):
    """expert_delta is PEFT's ``einsum`` of the stacked factors, expert by expert, bit for bit (large and
    small sizes, both orientations); expert_factors are views (no copies of float32 factors)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r * n_exp, inp, generator=g), torch.randn(out, r * n_exp, generator=g)
    spec = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    ref = torch.einsum(spec, b.reshape(out, -1, n_exp), a.reshape(n_exp, -1, inp)) * 0.7
    factors = ox.expert_factors(a, b, n_exp)
    assert all(
        a_e.data_ptr() == a[e * r].data_ptr() and b_e.data_ptr() == b[0, e].data_ptr()
        for e, (a_e, b_e) in enumerate(factors)
    )
    for e, (a_e, b_e) in enumerate(factors):
        assert same_bits(ox.expert_delta(a_e, b_e, 0.7, transposed).contiguous(), ref[e].contiguous())


def test_unmerge_with_receipt_gives_the_base_back():
    """merge_ then unmerge_ gives the base back only up to rounding; the receipt's residual (ops/residual.py)
    restores it bit for bit (bf16, each expert of a fused tensor merged through a view)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3 * E, 32, generator=g), torch.randn(40, 3 * E, generator=g)
    base = (torch.randn(E, 40, 32, generator=g) * 0.02).to(torch.bfloat16)
    deltas = [ox.expert_delta(a_e, b_e, 5 / 3) for a_e, b_e in ox.expert_factors(a, b, E)]
    merged = base.clone()
    for e, d in enumerate(deltas):
        ox.merge_(merged[e], d)
    back = merged.clone()
    for e, d in enumerate(deltas):
        ox.unmerge_(back[e], d)
    assert not same_bits(merged, base) and not same_bits(back, base)
    assert same_bits(residual.decode(back, residual.encode(base, back)), base)


# --- bad inputs -----------------------------------------------------------------------------------------------


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_error(exc: LoractlError, *parts: str) -> str:
    msg = str(exc)
    assert exc.exit_code == 2 and "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


@pytest.mark.parametrize(
    ("arch", "fused", "over", "tensor"),
    [
        ("qwen3_moe", False, {"num_experts": 8}, "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ("qwen3_moe", True, {"num_experts": 8}, "model.layers.0.mlp.experts.gate_up_proj"),
        ("mixtral", False, {"num_local_experts": 2}, "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
        ("gpt_oss", False, {"num_local_experts": 8}, "model.layers.0.mlp.experts.gate_up_proj"),
        ("qwen3_moe", False, {"moe_intermediate_size": 24}, "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ("mixtral", True, {"intermediate_size": 16}, "model.layers.0.mlp.experts.gate_up_proj"),
        ("gpt_oss", False, {"intermediate_size": 16}, "model.layers.0.mlp.experts.gate_up_proj"),
    ],
)
def test_adapter_that_does_not_fit_the_base(arch, fused, over, tensor, tmp_path):
    """An adapter trained on a model with another expert count or expert size: ShapeMismatchError (exit 2), one line
    naming the adapter file, the parameter and the base tensor; nothing is written, the inputs are unchanged."""
    base_dir = save_moe_base(build_moe(arch, torch.bfloat16), tmp_path / "base", fused=fused)
    ad = make_moe_adapter(build_moe(arch, torch.float32, **over), tmp_path / "ad", r=2, lora_alpha=4)
    before = (_sha(base_dir), _sha(ad))
    with pytest.raises(ShapeMismatchError) as ei:
        loractl_merge(base_dir, [ad])
    _one_error(ei.value, str(ad), "model.layers.0.mlp.experts.gate_up_proj", repr(tensor))
    assert (_sha(base_dir), _sha(ad)) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "ad",
        "base",
    ]


def test_base_missing_an_expert(tmp_path):
    """A base whose config says 4 experts but has no tensor for the last one: InputError naming that tensor."""
    model = build_moe("qwen3_moe", torch.float32)
    shapes = {k: tuple(v.shape) for k, v in read_st(save_moe_base(model, tmp_path / "b")).items()}
    del shapes["model.layers.0.mlp.experts.3.up_proj.weight"]
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(InputError) as ei:
        fx.pieces(
            shapes, cfg, "model.layers.0.mlp.experts.gate_up_proj", E, (40, 32), source="ad.safetensors"
        )
    _one_error(ei.value, "ad.safetensors", "'model.layers.0.mlp.experts.3.up_proj.weight'")


def test_parameter_the_base_lacks():
    """A parameter with no tensor in the base: InputError listing the names looked for."""
    shapes = {"model.layers.0.mlp.experts.0.gate_proj.weight": (20, 32)}
    with pytest.raises(InputError) as ei:
        fx.pieces(
            shapes,
            {"model_type": "qwen3_moe"},
            "model.layers.5.mlp.experts.down_proj",
            E,
            (32, 20),
            source="x",
        )
    _one_error(
        ei.value,
        "x: parameter 'model.layers.5.mlp.experts.down_proj'",
        "'model.layers.5.mlp.experts.0.down_proj.weight'",
    )


def test_nesting_errors():
    """More ``.base_layer`` levels than targeted parameters, or an experts module none of whose parameters is a
    target: FormatError naming the file and the key. An unknown MoE model type: UnsupportedAdapterError."""
    with pytest.raises(FormatError) as ei:
        fx.parameter_of("model.layers.0.mlp.experts.base_layer", ["down_proj"], "qwen3_moe", source="ad.st")
    _one_error(ei.value, "ad.st", "'model.layers.0.mlp.experts.base_layer.lora_A.weight'")
    with pytest.raises(FormatError):
        fx.parameter_of("model.layers.0.mlp.experts", ["q_proj.weight"], "qwen3_moe")
    with pytest.raises(UnsupportedAdapterError) as ei:
        fx.parameter_of("model.layers.0.mlp.experts", ["gate_up_proj"], "some_new_moe", source="ad.st")
    _one_error(ei.value, "ad.st: module 'model.layers.0.mlp.experts'", "some_new_moe")


def test_parameter_of_nesting_rule():
    """The nesting rule without PEFT: registration order, not the order of target_parameters; dot-suffix matching;
    ordinary modules (target_modules) are None; routers are their ``weight``."""
    both = ["down_proj", "gate_up_proj"]
    assert fx.parameter_of("model.layers.0.mlp.experts.base_layer", both, "qwen3_moe") == (
        "model.layers.0.mlp.experts.gate_up_proj"
    )
    assert (
        fx.parameter_of("model.layers.0.mlp.experts", both, "qwen3_moe")
        == "model.layers.0.mlp.experts.down_proj"
    )
    assert fx.parameter_of("model.layers.0.mlp.experts", ["mlp.experts.gate_up_proj"], "qwen3_moe") == (
        "model.layers.0.mlp.experts.gate_up_proj"
    )
    four = ["down_proj_bias", "gate_up_proj", "down_proj", "gate_up_proj_bias"]
    keys = [
        "experts.base_layer.base_layer.base_layer",
        "experts.base_layer.base_layer",
        "experts.base_layer",
        "experts",
    ]
    got = [fx.parameter_of(f"model.layers.1.mlp.{k}", four, "gpt_oss") for k in keys]
    assert got == [f"model.layers.1.mlp.experts.{p}" for p in fx.ARCHS["gpt_oss"].params]
    assert fx.parameter_of("model.layers.0.self_attn.q_proj", both, "qwen3_moe") is None
    assert (
        fx.parameter_of("model.layers.0.mlp.gate", both + ["gate.weight"], "qwen3_moe")
        == "model.layers.0.mlp.gate.weight"
    )
    assert fx.parameter_of("transformer.blocks.0.ffn.experts.mlp.base_layer", ["w2", "w1"], "dbrx") == (
        "transformer.blocks.0.ffn.experts.mlp.w1"
    )
