"""The MoE oracle's facts, proved against PEFT and transformers themselves (no loractl code is tested here).

For every arch in ``moe_factories.LAYOUTS``: the on-disk layout transformers writes is the one the layout data
says, and PEFT's ``merge_and_unload`` + ``save_pretrained`` of ``target_parameters`` adapters equals, bit for bit,
the base's on-disk tensors plus each expert's update computed by the derived rule (``adapter_keys``,
``expert_factors``/``expert_delta``, ``expert_pieces``) in PEFT's arithmetic:

- targeted parameters (``lora.ParamWrapper``): ``delta_e = (B_e @ A_e) * scale`` in float32, rounded to the
  parameter's dtype, then added in that dtype (``get_delta_weight`` casts to ``param.dtype`` before
  ``param.data += delta``): two roundings; several adapters are added one after the other, each rounded;
- plain linear modules (``target_modules``, ``lora.Linear``): ``W += (B @ A) * scale`` with the float32 update,
  one rounding.

The negative controls show the comparison would catch a wrong rule.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import same_bits
from moe_factories import (
    ARCHS,
    LAYOUTS,
    MAIN_ARCHS,
    E,
    H,
    I,
    adapter_keys,
    build_moe,
    disk_name,
    expert_delta,
    expert_pieces,
    make_moe_adapter,
    peft_experts,
    peft_moe_merged,
    read_st,
    save_moe_base,
)

PFX = "base_model.model."
OTHER_ARCHS = tuple(a for a in ARCHS if a not in MAIN_ARCHS)
#: a plain attention linear of each arch, for target_modules next to target_parameters
ATTN = {"dbrx": "out_proj"}


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's ``get_pattern_key`` (peft/utils/other.py): the first pattern p with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def _scaling(cfg: dict, key: str, r: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, key, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def expected_merge(
    arch: str,
    base: dict[str, torch.Tensor],
    adapters: list[Path],
    fused: bool,
    *,
    single_rounding: bool = False,
    b_expert_major: bool = False,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The base's on-disk tensors with every adapter applied by the derived rule, and the names it changed
    (the two keywords: wrong rules, for the negative controls)."""
    lay = LAYOUTS[arch]
    out = {k: v.clone() for k, v in base.items()}
    touched: set[str] = set()
    for ad_dir in adapters:
        cfg = json.loads((ad_dir / "adapter_config.json").read_text())
        ad = read_st(ad_dir)
        used: set[str] = set()
        for layer in lay.moe_layers:
            for pname, mod in adapter_keys(arch, layer, cfg["target_parameters"] or []).items():
                a, b = ad[f"{PFX}{mod}.lora_A.weight"], ad[f"{PFX}{mod}.lora_B.weight"]
                used |= {f"{PFX}{mod}.lora_A.weight", f"{PFX}{mod}.lora_B.weight"}
                n_exp = peft_experts(arch, pname)
                r = a.shape[0] // n_exp
                # PEFT matches rank_pattern/alpha_pattern against the parameter's name, not the module's
                s = _scaling(cfg, f"{lay.experts.format(layer=layer)}.{pname}", r)
                if b_expert_major:
                    b = b.reshape(b.shape[0], r, n_exp).transpose(1, 2).reshape(b.shape[0], -1)
                for e in range(n_exp):
                    d = expert_delta(a, b, e, n_exp, s, lay.param(pname).peft_transposed)
                    for name, idx, chunk, chunks in expert_pieces(arch, pname, layer, e, fused=fused):
                        w = out[name][idx] if idx else out[name]
                        piece = d.chunk(chunks, dim=0)[chunk]
                        if single_rounding:
                            w.copy_(w.float() + piece)
                        else:
                            w.add_(piece.to(w.dtype))
                        touched.add(name)
        # the others: a 2-D parameter targeted by target_parameters (a router ``gate.weight``: a ParamWrapper with
        # one "expert", two roundings) or a plain module from target_modules (lora.Linear, one rounding)
        for k in ad:
            if k in used or not k.endswith(".lora_A.weight"):
                continue
            mod = k[len(PFX) : -len(".lora_A.weight")]
            a, b = ad[k].float(), ad[f"{PFX}{mod}.lora_B.weight"].float()
            param = f"{mod}.weight"
            is_param = any(param == t or param.endswith("." + t) for t in cfg["target_parameters"] or [])
            s = _scaling(cfg, param if is_param else mod, a.shape[0])
            name = disk_name(arch, param, fused)
            w = out[name]
            d = (b @ a) * s
            if is_param and not single_rounding:
                w.add_(d.to(w.dtype))
            else:
                w.copy_(w.float() + d)  # bf16 weight += float32 update: one rounding
            used |= {k, f"{PFX}{mod}.lora_B.weight"}
            touched.add(name)
        assert used == set(ad), f"adapter tensors not accounted for: {sorted(set(ad) - used)}"
    return out, touched


def _diff(got: dict, want: dict) -> list[str]:
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    return [k for k in want if not same_bits(got[k], want[k])]


def _check(arch, base, dirs, merged, fused):
    """PEFT's result is the rule's, and every tensor the rule touched did change."""
    want, touched = expected_merge(arch, base, dirs, fused)
    assert _diff(merged, want) == []
    assert touched and not [k for k in touched if same_bits(merged[k], base[k])]


def _case(tmp: Path, arch: str, dtype, fused: bool, adapters: list[dict]):
    model = build_moe(arch, dtype)
    base_dir = save_moe_base(model, tmp / "base", fused=fused)
    dirs = [make_moe_adapter(model, tmp / f"ad{i}", seed=10 + i, **kw) for i, kw in enumerate(adapters)]
    out = peft_moe_merged(base_dir, dirs, dtype, arch, tmp / "merged")
    return read_st(base_dir), dirs, read_st(out)


# --- the layouts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_on_disk_layout_is_the_layout_data(arch, tmp_path):
    """save_pretrained writes each expert parameter where expert_pieces says, values unchanged (gate = first half
    of gate_up_proj[e], up = second half, no transposition) and every other tensor under disk_name;
    save_original_format=False writes the in-memory tensors; from_pretrained reads either back unchanged."""
    import transformers as tf

    lay = LAYOUTS[arch]
    model = build_moe(arch, torch.float32)
    state = model.state_dict()
    expert_params = {
        f"{lay.experts.format(layer=layer)}.{p.name}" for layer in lay.moe_layers for p in lay.params
    }
    assert expert_params <= set(state)
    for fused in (False, True):
        d = save_moe_base(model, tmp_path / f"b{fused}", fused=fused)
        disk = read_st(d)
        want_names = set()
        for layer in lay.moe_layers:
            for p in lay.params:
                w = state[f"{lay.experts.format(layer=layer)}.{p.name}"]
                for e in range(peft_experts(arch, p.name)):
                    for name, idx, chunk, chunks in expert_pieces(arch, p.name, layer, e, fused=fused):
                        t = disk[name][idx] if idx else disk[name]
                        src = w if p.stacked_2d else w[e]
                        assert same_bits(t, src.chunk(chunks, dim=0)[chunk]), (name, e)
                        want_names.add(name)
        for k, v in state.items():
            if k not in expert_params:
                assert same_bits(disk[disk_name(arch, k, fused)], v), k
                want_names.add(disk_name(arch, k, fused))
        assert set(disk) == want_names
        again = getattr(tf, lay.model_cls).from_pretrained(d, dtype=torch.float32)
        got = again.state_dict()
        assert set(got) == set(state)
        assert all(same_bits(got[n], state[n]) for n in state)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_keys_and_shapes(arch, tmp_path):
    """PEFT's saved keys: nesting in the experts module's parameter order whatever the order of target_parameters;
    a lone parameter is ``experts.lora_*``; lora_A [r·E, in], lora_B [out, r·E]; rank_pattern keyed on the
    parameter's name (a module-name pattern does not apply)."""
    lay = LAYOUTS[arch]
    model = build_moe(arch, torch.float32)
    params = dict(model.named_parameters())
    names = [p.name for p in lay.params]
    cases = [
        (names, {}),
        (names[::-1], {"rank_pattern": {names[0]: 2}}),
        ([".".join(lay.experts.split(".")[-2:] + [names[-1]])], {}),  # e.g. "mlp.experts.down_proj"
        ([names[0]], {"rank_pattern": {"experts": 5, "mlp": 5}}),
    ]
    if arch not in MAIN_ARCHS:
        cases = cases[:2]
    for i, (targets, extra) in enumerate(cases):
        d = make_moe_adapter(model, tmp_path / f"a{i}", target_parameters=targets, r=3, lora_alpha=6, **extra)
        ad = read_st(d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert sorted(cfg["target_parameters"]) == sorted(targets)
        want = set()
        for layer in lay.moe_layers:
            short = [t.rpartition(".")[2] for t in targets]
            for pname, mod in adapter_keys(arch, layer, short).items():
                w = params[f"{lay.experts.format(layer=layer)}.{pname}"]
                p = lay.param(pname)
                r = (extra.get("rank_pattern") or {}).get(pname, 3)
                if p.stacked_2d:
                    inn, out = w.shape[1], w.shape[0]
                else:
                    inn, out = (w.shape[1], w.shape[2]) if p.peft_transposed else (w.shape[2], w.shape[1])
                n_exp = peft_experts(arch, pname)
                assert ad[f"{PFX}{mod}.lora_A.weight"].shape == (r * n_exp, inn)
                assert ad[f"{PFX}{mod}.lora_B.weight"].shape == (out, r * n_exp)
                want |= {f"{PFX}{mod}.lora_A.weight", f"{PFX}{mod}.lora_B.weight"}
        assert set(ad) == want


# --- the merge ----------------------------------------------------------------------------------------------


def _one_adapter(arch):
    return [dict(target_modules=[ATTN.get(arch, "o_proj")], r=3, lora_alpha=5)]


@pytest.mark.parametrize("fused", [False, True], ids=["ondisk", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", MAIN_ARCHS)
def test_rule_equals_peft_merge(arch, dtype, fused, tmp_path):
    """One adapter on the expert parameters and an attention linear: the derived rule gives PEFT's saved tensors
    bit for bit, in the base's layout (a base read from the fused layout is written back fused)."""
    base, dirs, merged = _case(tmp_path, arch, dtype, fused, _one_adapter(arch))
    _check(arch, base, dirs, merged, fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_rule_equals_peft_merge_other_archs(arch, dtype, tmp_path):
    """The same on the other archs, in their on-disk layout."""
    base, dirs, merged = _case(tmp_path, arch, dtype, False, _one_adapter(arch))
    _check(arch, base, dirs, merged, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "mixtral", "dbrx"])
def test_rule_equals_peft_merge_two_adapters_patterns_rslora(arch, dtype, tmp_path):
    """Two adapters (different r, alpha, rsLoRA, rank/alpha patterns on parameter names, one a regex on the full
    name) merged one after the other, each rounded."""
    first, last = LAYOUTS[arch].params[0].name, LAYOUTS[arch].params[-1].name
    base, dirs, merged = _case(
        tmp_path,
        arch,
        dtype,
        False,
        [
            dict(r=3, lora_alpha=5, rank_pattern={last: 2}, alpha_pattern={first: 11}),
            dict(r=4, lora_alpha=3, use_rslora=True, alpha_pattern={rf"layers\.1\.mlp\.experts\.{last}": 9}),
        ],
    )
    _check(arch, base, dirs, merged, False)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_single_parameter_adapter(arch, tmp_path):
    """Only down_proj targeted: its factors are ``experts.lora_*`` and gate_up_proj is untouched."""
    base, dirs, merged = _case(
        tmp_path, arch, torch.bfloat16, False, [dict(target_parameters=["down_proj"], r=2, lora_alpha=3)]
    )
    _check(arch, base, dirs, merged, False)


def test_wrong_rules_are_caught(tmp_path):
    """The comparison discriminates: B read expert-major, or one rounding instead of two, differ from PEFT."""
    base, dirs, merged = _case(tmp_path, "qwen3_moe", torch.bfloat16, False, [dict(r=3, lora_alpha=5)])
    assert _diff(merged, expected_merge("qwen3_moe", base, dirs, False)[0]) == []
    assert _diff(merged, expected_merge("qwen3_moe", base, dirs, False, b_expert_major=True)[0])
    assert _diff(merged, expected_merge("qwen3_moe", base, dirs, False, single_rounding=True)[0])


def test_per_expert_product_is_peft_einsum():
    """``B_e @ A_e`` per expert is bit for bit PEFT's ``einsum("o r e, e r i -> e o i")`` (and its transpose)."""
    g = torch.Generator().manual_seed(0)
    for n_exp, r, o, i in [
        (4, 3, 40, 32),
        (8, 16, 128, 96),
        (64, 8, 48, 96),
        (16, 32, 128, 64),
        (4, 64, 96, 80),
    ]:
        a = torch.randn(r * n_exp, i, generator=g)
        b = torch.randn(o, r * n_exp, generator=g)
        wa, wb = a.reshape(n_exp, -1, i), b.reshape(o, -1, n_exp)
        ref = torch.einsum("o r e, e r i -> e o i", wb, wa) * 0.7
        ref_t = torch.einsum("o r e, e r i -> e i o", wb, wa) * 0.7
        for e in range(n_exp):
            assert same_bits(expert_delta(a, b, e, n_exp, 0.7, False), ref[e])
            assert same_bits(expert_delta(a, b, e, n_exp, 0.7, True).contiguous(), ref_t[e].contiguous())


# --- adapters PEFT rewrites: classic target_modules names, transformers v4 per-expert adapters -------------------

_CLASSIC = {
    "qwen3_moe": ["q_proj", "gate_proj", "up_proj", "down_proj", "gate"],
    "deepseek_v3": ["q_b_proj", "gate_proj", "up_proj", "down_proj", "gate"],
    "mixtral": ["q_proj", "w1", "w2", "w3", "gate"],
}


@pytest.mark.parametrize("arch", sorted(_CLASSIC))
def test_classic_target_modules_become_target_parameters(arch, tmp_path):
    """On the archs with a mixtral/qwen2_moe conversion, PEFT rewrites the classic MoE names of target_modules
    (gate_proj+up_proj / w1+w3 -> gate_up_proj with r and alpha doubled, down_proj / w2 -> down_proj,
    gate -> the router parameter gate.weight) before injecting: the dense and shared MLPs with those names are
    then not adapted. The saved config says so, and the merge follows the same rule (router: two roundings)."""
    base, dirs, merged = _case(
        tmp_path,
        arch,
        torch.bfloat16,
        False,
        [dict(target_modules=_CLASSIC[arch], target_parameters=[], r=2, lora_alpha=3)],
    )
    cfg = json.loads((dirs[0] / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == [_CLASSIC[arch][0]]
    assert sorted(cfg["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 4} and cfg["alpha_pattern"] == {
        r".*\.gate_up_proj": 6
    }
    keys = read_st(dirs[0])
    assert not [k for k in keys if "shared_expert" in k or ".mlp.gate_proj." in k or ".mlp.down_proj." in k]
    assert any(k.endswith("mlp.gate.lora_A.weight") for k in keys)
    _check(arch, base, dirs, merged, False)
    assert _diff(merged, expected_merge(arch, base, dirs, False, single_rounding=True)[0])


_V4 = {
    "qwen3_moe": ("model.layers.{layer}.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("model.layers.{layer}.block_sparse_moe.experts", ("w1", "w3", "w2")),
}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", sorted(_V4))
def test_v4_per_expert_adapter(arch, dtype, rslora, tmp_path):
    """An adapter trained on transformers v4 (one lora.Linear per expert, keys ``experts.{e}.gate_proj.lora_A``) is
    converted on load (peft/utils/transformers_weight_conversion.py) and merged into the same per-expert tensors as
    ``((B @ A) * s).to(dtype)`` added in dtype (two roundings, like every ParamWrapper). The scale of the fused
    gate/up pair is (2·alpha)/(2·r) -- with rsLoRA (2·alpha)/sqrt(2·r) = sqrt(2)·alpha/sqrt(r), not the
    alpha/sqrt(r) the adapter was trained with (down_proj keeps alpha/sqrt(r))."""
    import peft
    from safetensors.torch import save_file

    prefix, names = _V4[arch]
    r, alpha = 3, 5
    model = build_moe(arch, dtype)
    base_dir = save_moe_base(model, tmp_path / "base")
    ad_dir = tmp_path / "ad"
    peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(names)).save_pretrained(
        ad_dir
    )
    g = torch.Generator().manual_seed(3)
    sd = {}
    for layer in LAYOUTS[arch].moe_layers:
        for e in range(E):
            for n in names:
                inn, out = (I, H) if n in ("down_proj", "w2") else (H, I)
                mod = f"{PFX}{prefix.format(layer=layer)}.{e}.{n}"
                sd[f"{mod}.lora_A.weight"] = torch.randn(r, inn, generator=g) * 0.3
                sd[f"{mod}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.3
    save_file(sd, str(ad_dir / "adapter_model.safetensors"))
    merged = read_st(peft_moe_merged(base_dir, [ad_dir], dtype, arch, tmp_path / "merged"))

    want = read_st(base_dir)
    for k, a in sd.items():
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[len(PFX) : -len(".lora_A.weight")]
        n = 1 if mod.rpartition(".")[2] == names[2] else 2  # gate/up are fused into one LoRA of rank 2r
        s = n * alpha / (math.sqrt(n * r) if rslora else n * r)
        w = want[f"{mod}.weight"]
        w.add_(((sd[f"{PFX}{mod}.lora_B.weight"] @ a) * s).to(w.dtype))
    assert _diff(merged, want) == []
