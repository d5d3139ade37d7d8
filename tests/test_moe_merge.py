"""LoRA adapters on MoE experts (PEFT ``target_parameters``) end to end, against PEFT and transformers themselves.

Tiny MoE models of transformers 5 (tests/moe_factories.py), their bases saved in each architecture's on-disk
layout (per-expert tensors, Mixtral's ``block_sparse_moe``, GPT-OSS's fused tensors...) and in the fused
in-memory layout, PEFT adapters on the expert parameters, the router and an attention projection:

- ``loractl merge`` equals PEFT's ``merge_and_unload`` + ``save_pretrained`` bit for bit (bf16 and fp32 bases,
  both layouts, two adapters with rank/alpha patterns and rsLoRA), and ``unmerge`` with the receipt gives the
  base back bit for bit;
- ``inspect`` names expert LoRAs by parameter with the rank per expert and E; ``check`` for each runtime;
- ``truncate``, ``combine``, ``similarity`` work expert by expert; ``convert`` round-trips PEFT exactly, refuses
  formats that cannot hold expert LoRAs, and writes the per-expert form llama.cpp and vLLM read;
- bad inputs (expert count, shapes, a missing expert, a config that does not fit the keys, an unknown MoE
  model type) exit 2 with one line naming the file and tensor, and write nothing.

The models are built once per session and shared between tests.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from cli.conftest import Snapshot, check_bad_input, run_module
from conftest import same_bits
from moe_factories import (
    LAYOUTS,
    MAIN_ARCHS,
    E,
    build_moe,
    make_moe_adapter,
    peft_moe_merged,
    read_st,
    save_moe_base,
)
from safetensors.torch import save_file

from loractl import api
from loractl.formats import experts as fx
from loractl.formats import load_adapter
from loractl.ops.similarity import subspace_similarity

PFX = "base_model.model."
OTHER_ARCHS = tuple(a for a in LAYOUTS if a not in MAIN_ARCHS)
#: each arch's router (a 2-D parameter targeted next to the experts)
ROUTER = {"gpt_oss": "router.weight", "phimoe": "router.weight", "granitemoe": "router.weight"}
#: the expert parameters each adapter targets: LAYOUTS' (GPT-OSS also its 2-D biases: four nested wrappers)
TARGETS = {a: [p.name for p in lay.params] for a, lay in LAYOUTS.items()}
TARGETS["gpt_oss"] = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]
#: an attention projection of each arch, a plain target_modules LoRA next to the parameter LoRAs
ATTN = {"dbrx": "out_proj", "deepseek_v3": "o_proj", "deepseek_v2": "o_proj"}


def _adapters(arch: str) -> list[dict]:
    """Two adapters on the expert parameters, the router and an attention projection: plain, and rsLoRA with
    rank/alpha patterns on parameter names (one a regex on a full name)."""
    lay = LAYOUTS[arch]
    targets = TARGETS[arch] + [ROUTER.get(arch, "gate.weight")]
    first, last = targets[0], TARGETS[arch][-1]
    full = lay.experts.format(layer=lay.moe_layers[-1]).replace(".", r"\.")
    attn = [ATTN.get(arch, "q_proj")]
    return [
        dict(target_modules=attn, target_parameters=targets, r=3, lora_alpha=5, rank_pattern={last: 2}, alpha_pattern={first: 11}),
        dict(target_modules=attn, target_parameters=targets, r=4, lora_alpha=3, use_rslora=True, alpha_pattern={rf"{full}\.{last}": 9}),
    ]


@dataclass
class Case:
    arch: str
    dtype: torch.dtype
    fused: bool
    root: Path
    base: Path
    adapters: list[Path]
    _peft: Path | None = None

    def peft(self) -> dict[str, torch.Tensor]:
        """PEFT's merge_and_unload + save_pretrained of both adapters (computed once)."""
        if self._peft is None:
            self._peft = peft_moe_merged(self.base, self.adapters, self.dtype, self.arch, self.root / "peft")
        return read_st(self._peft)


@pytest.fixture(scope="session")
def moe(tmp_path_factory):
    """``moe(arch, dtype, fused)``: a tiny model's base and two adapters, built once per session."""
    cache: dict[tuple, Case] = {}

    def get(arch: str, dtype: torch.dtype = torch.bfloat16, fused: bool = False, adapters: int = 2) -> Case:
        key = (arch, dtype, fused, adapters)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{str(dtype)[6:]}-{'fused' if fused else 'ondisk'}")
            model = build_moe(arch, dtype)
            base = save_moe_base(model, root / "base", fused=fused)
            kws = _adapters(arch)[:adapters]
            ads = [make_moe_adapter(model, root / f"ad{i}", seed=10 + i, **kw) for i, kw in enumerate(kws)]
            cache[key] = Case(arch, dtype, fused, root, base, ads)
        return cache[key]

    return get


def _diff(got: dict, want: dict) -> list[str]:
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    return [k for k in want if not same_bits(got[k], want[k])]


# --- merge and unmerge, against PEFT ---------------------------------------------------------------------------


def _merge_and_back(case: Case, tmp: Path) -> None:
    api.merge(case.base, case.adapters, tmp / "merged")
    got, want, base = read_st(tmp / "merged"), case.peft(), read_st(case.base)
    assert _diff(got, want) == []
    changed = {k for k in base if not same_bits(base[k], want[k])}
    lay = LAYOUTS[case.arch]
    assert len(changed) >= len(lay.moe_layers) * 3  # experts, router and attention of every MoE layer
    assert api.unmerge(tmp / "merged", case.adapters, tmp / "back").exact
    assert _diff(read_st(tmp / "back"), base) == []


@pytest.mark.parametrize("fused", [False, True], ids=["ondisk", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", MAIN_ARCHS)
def test_merge_equals_peft(moe, arch, dtype, fused, tmp_path):
    """Two adapters (expert parameters, router, attention; patterns, rsLoRA) merged into the base's own layout:
    PEFT's merged save bit for bit; unmerge with the receipt gives the base back bit for bit."""
    _merge_and_back(moe(arch, dtype, fused), tmp_path)


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_merge_equals_peft_other_archs(moe, arch, tmp_path):
    """The other MoE architectures transformers 5 builds from a small config (bf16, their on-disk layout)."""
    _merge_and_back(moe(arch, torch.bfloat16, False), tmp_path)


def test_merge_sharded_base_streams_one_tensor_at_a_time(moe, tmp_path):
    """A base in several shards keeps its shards; the merge is PEFT's (the experts' tensors of one layer lie in
    different shards, each merged as its own job)."""
    case = moe("mixtral", torch.bfloat16, False)
    model = build_moe("mixtral", torch.bfloat16)
    base = save_moe_base(model, tmp_path / "base", max_shard_size="20KB")
    assert len(list(base.glob("*.safetensors"))) > 3
    api.merge(base, case.adapters, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert _diff(read_st(tmp_path / "merged"), case.peft()) == []


# --- verify ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", MAIN_ARCHS)
def test_verify_expert_merges(moe, arch, dtype, tmp_path):
    """``verify`` accepts loractl's and PEFT's merges of expert LoRAs (their bits are PEFT's), and names the
    expert tensors of a merge checked at the wrong weight, and one left unmerged."""
    case = moe(arch, dtype)
    api.merge(case.base, case.adapters, tmp_path / "merged", receipt=False)
    ok = api.verify(tmp_path / "merged", case.adapters, base=case.base)
    assert ok.ok, [asdict(f) for f in ok.findings]
    peft_dir = Path(case.root / "peft")
    case.peft()
    assert api.verify(peft_dir, case.adapters, base=case.base).ok
    wrong = api.verify(tmp_path / "merged", case.adapters, base=case.base, weights=[2.0, 1.0])
    assert not wrong.ok
    expert_param = next(m for m in fx_parameters(case) if ".experts." in m)
    assert any(f.code == "mismatch" and expert_param in (f.module or "") for f in wrong.findings), [
        (f.code, f.module) for f in wrong.findings
    ]
    # one expert tensor left as in the base: not-merged, named by its parameter
    merged = read_st(tmp_path / "merged")
    base = read_st(case.base)
    key = next(k for k in merged if ".experts." in k and not same_bits(merged[k], base[k]))
    merged[key] = base[key].clone()
    shutil.rmtree(tmp_path / "merged")
    (tmp_path / "merged").mkdir()
    for f in case.base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / "merged" / f.name)
    _write_like(case.base, merged, tmp_path / "merged")
    left = api.verify(tmp_path / "merged", case.adapters, base=case.base)
    assert [f.code for f in left.findings if f.tensor == key] == ["not-merged"], [asdict(f) for f in left.findings]


def fx_parameters(case) -> list[str]:
    """The parameter LoRAs of a case's first adapter (module names)."""
    return [n for n, m in load_adapter(case.adapters[0]).modules.items() if m.experts > 1]


def _write_like(base: Path, tensors: dict[str, torch.Tensor], out: Path) -> None:
    """``tensors`` saved in ``base``'s shard files (the same names in the same files)."""
    from safetensors import safe_open

    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names, meta = list(f.keys()), f.metadata()
        save_file({n: tensors[n].contiguous() for n in names}, str(out / shard.name), metadata=meta)


# --- inspect ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_inspect_names_parameters_rank_per_expert(moe, arch):
    """``inspect --json``: expert LoRAs listed by parameter name, ``rank`` per expert, ``experts`` E, shape [E, out,
    in]; sizes count every factor; coverage complete. Read without the base, the same modules."""
    case = moe(arch)
    out = run_module(["inspect", case.adapters[0], "--base", case.base, "--json"])
    assert out.code == 0, out.stderr
    (info,) = json.loads(out.stdout)["adapters"]
    mods = {m["name"]: m for m in info["module_list"]}
    layer = LAYOUTS[arch].moe_layers[0]
    gu = mods[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    down = mods[f"model.layers.{layer}.mlp.experts.down_proj"]
    assert (gu["rank"], gu["experts"], gu["shape"], gu["alpha"]) == (3, E, [E, 40, 32], 11.0)
    # the rank pattern is on the last target: down_proj (rank 2, scale 5/2), GPT-OSS's down_proj_bias
    want_down = (2, E, [E, 32, 20], 2.5) if arch != "gpt_oss" else (3, E, [E, 32, 20], 5 / 3)
    assert (down["rank"], down["experts"], down["shape"]) == want_down[:3]
    assert math.isclose(down["scale"], want_down[3])
    attn = next(m for n, m in mods.items() if n.endswith("q_proj"))
    assert attn["experts"] == 0 and attn["rank"] == 3
    router = mods[f"model.layers.{layer}.mlp.{ROUTER.get(arch, 'gate.weight')}"]
    assert router["experts"] == 1 and router["shape"] == [E, 32]
    tensors = read_st(case.adapters[0])
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert info["modules"] == len(mods) == len(tensors) // 2  # one entry per parameter, not per key prefix
    assert info["rank"] == {"min": 2, "max": 3}
    cov = info["base"]["coverage"]
    assert cov["complete"] and cov["matched"] == len(mods) and cov["unmatched"] == [] == cov["shape_mismatch"]
    if arch == "gpt_oss":  # four wrappers nested on one module; the biases are 2-D [E, out] parameters
        bias = mods[f"model.layers.{layer}.mlp.experts.down_proj_bias"]
        assert (bias["rank"], bias["experts"], bias["shape"]) == (2, 1, [E, 32])
        assert mods[f"model.layers.{layer}.mlp.experts.gate_up_proj_bias"]["experts"] == 1
    alone = api.inspect(case.adapters[0])
    assert [asdict(m) for m in alone.adapters[0].module_list] == info["module_list"]


# --- check -----------------------------------------------------------------------------------------------------


def _codes(r, severity=None):
    return {f.code for f in r.findings if severity is None or f.severity == severity}


def test_check_expert_adapter_per_runtime(moe):
    """A clean expert adapter passes for PEFT; vLLM fails on a model whose vLLM class takes per-expert LoRAs
    (Qwen3-MoE) and serves it on a 3-D one (GPT-OSS); llama.cpp's converter stops at it; LoRAX drops it (Mixtral)
    or has no model (Qwen3-MoE). Without a base the runtime verdicts are warnings."""
    qwen, oss, mix = moe("qwen3_moe", adapters=1), moe("gpt_oss", adapters=1), moe("mixtral", adapters=1)
    for case in (qwen, oss, mix):
        r = api.check(case.adapters[0], base=case.base, target="peft")
        assert r.ok and not _codes(r, "error") and not _codes(r, "warning"), r.findings
    r = api.check(qwen.adapters[0], base=qwen.base, target="vllm")
    assert not r.ok and _codes(r, "error") == {"vllm-expert-lora"}
    (f,) = [f for f in r.findings if f.code == "vllm-expert-lora"]
    assert "--enable-mixed-moe-lora-format" in f.message and "--experts per-expert" in (f.fix or "")
    r = api.check(oss.adapters[0], base=oss.base, target="vllm")
    assert _codes(r, "error") == {"vllm-expert-lora-partial"}  # GPT-OSS's biases shift vLLM's reading of the keys
    r = api.check(qwen.adapters[0], target="vllm")
    assert r.ok and "vllm-expert-lora" in _codes(r, "warning")
    r = api.check(qwen.adapters[0], base=qwen.base, target="llama.cpp")
    assert _codes(r, "error") == {"llamacpp-expert-lora"}
    assert "Unprocessed experts" in r.errors[0].message and "--experts per-expert" in (r.errors[0].fix or "")
    r = api.check(oss.adapters[0], base=oss.base, target="llama.cpp")
    assert [f.fix for f in r.findings if f.code == "llamacpp-expert-lora"] == [None]  # fused: no per-expert form
    r = api.check(qwen.adapters[0], base=qwen.base, target="lorax")
    assert _codes(r, "error") == {"lorax-expert-lora"} and "Unsupported model type" in r.errors[0].message
    r = api.check(mix.adapters[0], base=mix.base, target="lorax")
    assert r.ok and "lorax-expert-lora" in _codes(r, "warning")


def test_check_partial_experts_for_vllm(moe, tmp_path):
    """Only down_proj targeted: saved as ``experts.lora_*``, which vLLM takes for down_proj but then asserts a
    gate_up_proj LoRA too."""
    model = build_moe("gpt_oss", torch.float32)
    ad = make_moe_adapter(model, tmp_path / "ad", target_parameters=["down_proj"], r=2, lora_alpha=2)
    r = api.check(ad, base=moe("gpt_oss").base, target="vllm")
    assert _codes(r, "error") == {"vllm-expert-lora-partial"}
    assert "down_proj" in r.errors[0].message


def test_per_expert_fix_passes_vllm_and_llamacpp(moe, tmp_path):
    """The fix the findings give (``convert --experts per-expert``), run as written: the result passes vLLM's and
    llama.cpp's expert rules, and PEFT merges it to the same model (float32: the same values; the per-expert
    form is a plain LoRA per expert)."""
    case = moe("qwen3_moe", torch.float32, adapters=1)
    r = api.check(case.adapters[0], base=case.base, target="llama.cpp")
    fix = r.errors[0].fix
    assert fix is not None
    out = run_module([x if x != "OUT" else str(tmp_path / "pe") for x in fix.split()[1:]])
    assert out.code == 0, out.stderr
    keys = read_st(tmp_path / "pe")
    assert f"{PFX}model.layers.0.mlp.experts.{E - 1}.up_proj.lora_B.weight" in keys
    assert not any(".base_layer." in k for k in keys)
    for target in ("vllm", "llama.cpp"):
        r = api.check(tmp_path / "pe", base=case.base, target=target)
        assert not {c for c in _codes(r) if "expert" in c}, r.findings
    api.merge(case.base, tmp_path / "pe", tmp_path / "merged")
    want, got = case.peft(), read_st(tmp_path / "merged")
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


# --- truncate, combine, similarity, spectrum -------------------------------------------------------------------


def _updates(m) -> list[torch.Tensor]:
    """Each expert's update s·B_e·A_e in float64 (dense, the test's own arithmetic)."""
    r, n = m.rank, max(1, m.experts)
    a, b = m.down.double(), m.up.double()
    return [(b[:, e::n] @ a[e * r : (e + 1) * r]) * m.scale for e in range(n)]


def test_truncate_each_expert_optimally(moe, tmp_path):
    """``truncate --rank 2``: each expert's truncation error is its own optimal one (a dense SVD per expert,
    Eckart-Young); all experts at rank 2 in PEFT's layout, which PEFT loads and merges as loractl does."""
    case = moe("qwen3_moe", torch.bfloat16, adapters=1)
    res = api.truncate(case.adapters[0], tmp_path / "tr", rank=2)
    before, after = load_adapter(case.adapters[0]), load_adapter(tmp_path / "tr")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    m = after.modules[name]
    assert (m.rank, m.experts) == (2, E)
    for full, cut in zip(_updates(before.modules[name]), _updates(m)):
        s = torch.linalg.svdvals(full)
        assert math.isclose(float((full - cut).norm() ** 2), float((s[2:] ** 2).sum()), rel_tol=1e-5)
    (rep,) = [x for x in res.modules if x.name == name]
    assert (rep.rank_before, rep.rank_after) == (3, 2)
    want = read_st(peft_moe_merged(case.base, [tmp_path / "tr"], case.dtype, case.arch, tmp_path / "peft"))
    api.merge(case.base, tmp_path / "tr", tmp_path / "merged")
    assert _diff(read_st(tmp_path / "merged"), want) == []


def test_truncate_energy_rule_per_expert(moe, tmp_path):
    """A dynamic rule: one rank for the parameter, the largest any expert needs, so every expert keeps the
    energy asked for."""
    case = moe("qwen3_moe", torch.bfloat16, adapters=1)
    api.truncate(case.adapters[0], tmp_path / "tr", energy=0.8)
    before, after = load_adapter(case.adapters[0]), load_adapter(tmp_path / "tr")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    k = after.modules[name].rank
    kept = []
    for full in _updates(before.modules[name]):
        s2 = torch.linalg.svdvals(full) ** 2
        kept.append(float(s2[:k].sum() / s2.sum()))
        assert float(s2[: k - 1].sum() / s2.sum()) < 0.8 or k == 1 or min(kept) >= 0.8
    assert min(kept) >= 0.8 - 1e-9


def test_combine_cat_is_exact_per_expert(moe, tmp_path):
    """``combine --method cat``: expert e's update is the sum of the two adapters' expert e updates."""
    case = moe("mixtral", torch.bfloat16)
    api.combine(case.adapters, tmp_path / "cat", method="cat")
    a0, a1, c = (load_adapter(p) for p in (*case.adapters, tmp_path / "cat"))
    for name, m in c.modules.items():
        assert m.experts == a0.modules[name].experts
        assert m.rank == a0.modules[name].rank + a1.modules[name].rank
        for x, y, z in zip(_updates(a0.modules[name]), _updates(a1.modules[name]), _updates(m)):
            assert torch.allclose(x + y, z, rtol=1e-5, atol=1e-6)


def test_similarity_phi_per_expert(moe):
    """φ per expert, expert e of one adapter against expert e of the other (the LoRA paper's measure on each
    expert's A_e); 1 for an adapter against itself."""
    case = moe("qwen3_moe")
    r = api.similarity(*case.adapters)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    (ms,) = [m for m in r.modules if m.name == name]
    a0, a1 = (load_adapter(p).modules[name] for p in case.adapters)
    want = [subspace_similarity(a0.expert(e).down, a1.expert(e).down, 3, 4) for e in range(E)]
    assert ms.experts is not None and len(ms.experts) == E
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(ms.experts, want))
    assert math.isclose(ms.phi, sum(want) / E)
    same = api.similarity(case.adapters[0], case.adapters[0])
    assert all(math.isclose(p, 1.0, rel_tol=1e-9) for m in same.modules for p in (m.experts or [m.phi]))


def test_spectrum_and_amplification_per_expert(moe):
    """``inspect --spectrum`` and ``amplification``: one entry per expert, the singular values of that expert's
    own update."""
    case = moe("qwen3_moe", torch.float32, adapters=1)
    spec = api.spectrum(case.adapters[0]).adapters[0].modules
    name = "model.layers.0.mlp.experts.down_proj"
    rows = [m for m in spec if m.name == name]
    assert [m.expert for m in rows] == list(range(E))
    full = _updates(load_adapter(case.adapters[0]).modules[name])
    for m, u in zip(rows, full):
        assert torch.allclose(torch.tensor(m.singular_values, dtype=torch.float64), torch.linalg.svdvals(u)[:2])
    amp = [m for m in api.amplification(case.adapters[0], case.base).modules if m.name == name]
    assert [m.expert for m in amp] == list(range(E))
    assert all(math.isclose(m.delta_norm, float(u.norm()), rel_tol=1e-6) for m, u in zip(amp, full))


# --- convert ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_convert_to_peft_round_trips(moe, arch, tmp_path):
    """``convert --to peft``: the same tensors under the same keys (GPT-OSS: four wrappers nested on one module),
    a config PEFT loads, and PEFT's merge of the copy is PEFT's merge of the original bit for bit."""
    case = moe(arch, torch.bfloat16)
    api.convert(case.adapters[1], tmp_path / "conv", to="peft")
    assert _diff(read_st(tmp_path / "conv"), read_st(case.adapters[1])) == []
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and not any("experts" in t for t in cfg["target_modules"])
    orig = read_st(peft_moe_merged(case.base, [case.adapters[1]], case.dtype, arch, tmp_path / "p0"))
    copy = read_st(peft_moe_merged(case.base, [tmp_path / "conv"], case.dtype, arch, tmp_path / "p1"))
    assert _diff(copy, orig) == []


@pytest.mark.parametrize(("to", "suffix"), [("kohya", ".safetensors"), ("gguf", ".gguf"), ("loralib", ".pt"), ("diffusers", ".safetensors")])
def test_convert_refuses_formats_without_expert_loras(moe, to, suffix, tmp_path):
    """Formats that cannot hold a LoRA on a parameter: exit 2 naming the format and the parameter, nothing
    written, the adapter unchanged."""
    case = moe("qwen3_moe")
    snap = Snapshot([case.adapters[0], case.base])
    out = tmp_path / f"out{suffix}"
    res = run_module(["convert", case.adapters[0], "-o", out, "--to", to, "--base", case.base])
    check_bad_input(res, output=out, snapshot=snap, names=[f"the {to} format", "model.layers.0.mlp.experts.", case.adapters[0]])


def test_convert_per_expert_refusals(moe, tmp_path):
    """``--experts per-expert`` needs the base, and is refused for a model whose checkpoints hold experts fused."""
    case, oss = moe("qwen3_moe"), moe("gpt_oss")
    snap = Snapshot([case.adapters[0], oss.adapters[0], oss.base])
    out = tmp_path / "pe"
    res = run_module(["convert", case.adapters[0], "-o", out, "--to", "peft", "--experts", "per-expert"])
    check_bad_input(res, output=out, snapshot=snap, names=["--base"])
    res = run_module(["convert", oss.adapters[0], "-o", out, "--to", "peft", "--experts", "per-expert", "--base", oss.base])
    check_bad_input(res, output=out, snapshot=snap, names=["gpt_oss", "model.layers.0.mlp.experts.", "adapter_model.safetensors"])


# --- bad inputs ------------------------------------------------------------------------------------------------


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _merge_refused(base: Path, adapter: Path, tmp: Path, *names: object) -> None:
    snap = Snapshot([base, adapter])
    out = tmp / "merged"
    res = run_module(["merge", base, adapter, "-o", out])
    check_bad_input(res, output=out, snapshot=snap, names=names)


@pytest.mark.parametrize(
    ("arch", "fused", "over", "tensor"),
    [
        ("qwen3_moe", False, {"num_experts": 8}, "model.layers.0.mlp.experts.0.down_proj.weight"),
        ("mixtral", True, {"num_local_experts": 2}, "model.layers.0.mlp.experts.down_proj"),
        ("gpt_oss", False, {"intermediate_size": 16}, "model.layers.0.mlp.experts.down_proj"),
        ("deepseek_v3", False, {"moe_intermediate_size": 24}, "model.layers.1.mlp.experts.0.down_proj.weight"),
    ],
    ids=["count-ondisk", "count-fused", "shape-transposed", "shape-ondisk"],
)
def test_adapter_that_does_not_fit(moe, arch, fused, over, tensor, tmp_path):
    """An adapter trained on a model with another expert count or expert size: exit 2, one line naming the
    adapter file, the parameter and the base tensor; nothing written, the inputs unchanged."""
    case = moe(arch, torch.bfloat16, fused)
    other = build_moe(arch, torch.float32, **over)
    targets = TARGETS[arch] if arch == "gpt_oss" else None
    ad = make_moe_adapter(other, tmp_path / "ad", target_parameters=targets, r=2, lora_alpha=4)
    param = tensor.split(".experts.")[0] + ".experts.down_proj"  # the first parameter in the adapter's order
    _merge_refused(case.base, ad, tmp_path, ad / "adapter_model.safetensors", repr(param), repr(tensor))
    # unmerge plans by the same rule: the same refusal, nothing written
    snap = Snapshot([case.base, ad])
    res = run_module(["unmerge", case.base, ad, "-o", tmp_path / "back"])
    check_bad_input(res, output=tmp_path / "back", snapshot=snap, names=[repr(param), repr(tensor)])


def test_base_missing_an_expert(moe, tmp_path):
    """A base whose config says 4 experts but holds no tensor for the last one's up_proj."""
    case = moe("qwen3_moe")
    base = tmp_path / "base"
    shutil.copytree(case.base, base)
    tensors = read_st(base)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    _merge_refused(base, case.adapters[0], tmp_path, "'model.layers.1.mlp.experts.3.up_proj.weight'", "adapter_model.safetensors")


def test_config_whose_rank_does_not_divide_the_factors(moe, tmp_path):
    """``r`` in adapter_config.json that does not divide lora_A's r·E rows: the config is not these weights'."""
    case = moe("qwen3_moe")
    ad = _edit_config(case.adapters[0], tmp_path / "ad", r=5, rank_pattern={})
    _merge_refused(case.base, ad, tmp_path, ad / "adapter_model.safetensors", "model.layers.0.mlp.experts.down_proj", "r=5")


def test_target_parameters_that_do_not_fit_the_keys(moe, tmp_path):
    """target_parameters naming one parameter while the keys nest two (``experts.base_layer.lora_*``)."""
    case = moe("qwen3_moe")
    ad = _edit_config(case.adapters[0], tmp_path / "ad", target_parameters=["down_proj", "gate.weight"])
    _merge_refused(case.base, ad, tmp_path, ad / "adapter_model.safetensors", "'model.layers.0.mlp.experts.base_layer.lora_A.weight'")


def test_unknown_moe_model_type(moe, tmp_path):
    """A base of a model type loractl does not know the experts layout of: refused by name."""
    case = moe("qwen3_moe")
    base = tmp_path / "base"
    shutil.copytree(case.base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "some_new_moe"
    (base / "config.json").write_text(json.dumps(cfg))
    _merge_refused(base, case.adapters[0], tmp_path, "some_new_moe", "model.layers.0.mlp.experts", "adapter_model.safetensors")


# --- the facts the reader and writer rely on -------------------------------------------------------------------


def test_param_order_is_every_architectures_order():
    """PARAM_ORDER (how an adapter read without its base is nested, and how the writer nests) follows the
    registration order of every architecture's experts class."""
    for arch in fx.ARCHS.values():
        pos = [fx.PARAM_ORDER.index(p) for p in arch.params]
        assert pos == sorted(pos), arch


def test_saved_prefixes_invert_the_reader():
    four = [f"model.layers.1.mlp.experts.{p}" for p in ("down_proj_bias", "gate_up_proj", "down_proj", "gate_up_proj_bias")]
    got = fx.saved_prefixes(four)
    for prefix in got.values():
        assert fx.parameter_of(prefix, ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"], None) in four
    assert got["model.layers.1.mlp.experts.gate_up_proj"] == "model.layers.1.mlp.experts" + ".base_layer" * 3
    assert fx.saved_prefixes(["model.layers.0.mlp.gate.weight"]) == {"model.layers.0.mlp.gate.weight": "model.layers.0.mlp.gate"}
