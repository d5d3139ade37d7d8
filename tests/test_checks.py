"""``loractl.checks.check``: a battery of PEFT adapters on a tiny Llama, each with exactly one defect.

Every defect must be found with its code and severity, module-level messages must name the
module, the clean adapter must pass for every target, and the suggested ``truncate`` fixes must
make the check pass when run as written (through the CLI).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, save_base
from safetensors.torch import load_file, save_file

from loractl.checks import (
    VLLM_MAX_LORA_RANKS,
    CheckResult,
    Finding,
    check,
    lorax_padded_rank,
    vllm_max_lora_rank,
)
from loractl.errors import InputError, UsageError

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# the battery (built once per module: a tiny seeded Llama and one adapter per defect)
# --------------------------------------------------------------------------------------------
def _edit(src: Path, dst: Path, fn) -> Path:
    """Copy a PEFT folder and rewrite its weights with ``fn(tensors) -> tensors``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / WEIGHTS)
    save_file(fn(dict(tensors)), dst / WEIGHTS, metadata={"format": "pt"})
    return dst


def _set(key: str, fn):
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[key] = fn(t[key].clone())
        return t

    return edit


def _poke(value: float):
    def fn(x: torch.Tensor) -> torch.Tensor:
        x.view(-1)[:3] = value
        return x

    return fn


def _rename(old: str, new: str):
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace(old, new): v for k, v in t.items()}

    return edit


@pytest.fixture(scope="module")
def battery(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    llama = build_model("llama")
    b: dict[str, Path] = {"base": save_base(llama, root / "base")}
    qv = dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    b["clean"] = clean = make_adapter(llama, root / "clean", **qv)
    q0a = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    v1b = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    v0b = f"{PREFIX}model.layers.0.self_attn.v_proj.lora_B.weight"
    b["nan"] = _edit(clean, root / "nan", _set(q0a, _poke(float("nan"))))
    b["inf"] = _edit(clean, root / "inf", _set(v1b, _poke(float("inf"))))
    b["zero_b"] = _edit(clean, root / "zero_b", _set(v0b, torch.zeros_like))
    b["truncated"] = shutil.copytree(clean, root / "truncated")
    w = b["truncated"] / WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    # an adapter trained on a wider MLP: gate_proj updates are [64, 32], the base's weights [48, 32]
    wide = build_model("llama", intermediate_size=64)
    b["shape"] = make_adapter(wide, root / "shape", target_modules=["gate_proj"], r=4, lora_alpha=8)
    # an adapter trained on a deeper model: layer 2 does not exist in the base
    deep = build_model("llama", num_hidden_layers=3)
    b["unmatched"] = make_adapter(deep, root / "unmatched", target_modules=["q_proj"], r=4, lora_alpha=8)
    b["rank600"] = make_adapter(llama, root / "rank600", target_modules=["q_proj"], r=600, lora_alpha=600)
    b["mts"] = make_adapter(
        llama, root / "mts", target_modules=["q_proj"], r=8, lora_alpha=16, modules_to_save=["lm_head"]
    )
    b["dora"] = make_adapter(llama, root / "dora", use_dora=True, **qv)
    b["pattern"] = make_adapter(llama, root / "pattern", rank_pattern={"q_proj": 16}, **qv)
    b["fake"] = _edit(clean, root / "fake", _rename("layers.0.self_attn.v_proj", "layers.0.self_attn.v_gate"))
    b["rank24"] = make_adapter(llama, root / "rank24", target_modules=["q_proj"], r=24, lora_alpha=24)
    b["partial"] = make_adapter(llama, root / "partial", layers_to_transform=[0], **qv)
    b["foo_base"] = shutil.copytree(b["base"], root / "foo_base")
    cfg = json.loads((b["foo_base"] / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (b["foo_base"] / "config.json").write_text(json.dumps(cfg))
    # Qwen2 in vLLM has no embedding_modules: a LoRA on lm_head is unknown to it
    import transformers as tf

    torch.manual_seed(0)
    qwen = tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
            tie_word_embeddings=False,
        )
    ).eval()
    b["qwen_base"] = save_base(qwen, root / "qwen_base")
    b["qwen_lm_head"] = make_adapter(qwen, root / "qwen_lm_head", target_modules=["q_proj", "lm_head"], r=8)
    return b


def codes(r: CheckResult, severity: str | None = None) -> set[str]:
    return {f.code for f in r.findings if severity is None or f.severity == severity}


def find(r: CheckResult, code: str) -> list[Finding]:
    return [f for f in r.findings if f.code == code]


def assert_named(r: CheckResult) -> None:
    """Every finding about a module names that module in its message."""
    for f in r.findings:
        if f.module is not None:
            assert f.module in f.message, f


# --------------------------------------------------------------------------------------------
# the clean adapter passes everywhere
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [None, "peft", "vllm", "llama.cpp", "lorax"])
def test_clean_adapter_passes(battery, target):
    r = check(battery["clean"], base=battery["base"], target=target, max_rank=8)
    assert r.ok, r.findings
    assert codes(r, "error") == set() and codes(r, "warning") == set()
    assert r.adapter == str(battery["clean"]) and r.target == target


def test_clean_adapter_infos(battery):
    r = check(battery["clean"], base=battery["base"], target="vllm")
    (f,) = find(r, "vllm-max-lora-rank")
    assert f.severity == "info" and "--max-lora-rank 8" in f.message
    r = check(battery["clean"], base=battery["base"], target="llama.cpp")
    (f,) = find(r, "llamacpp-permute")
    assert (
        f.severity == "info" and f.fix is not None and "--to gguf" in f.fix and str(battery["base"]) in f.fix
    )


# --------------------------------------------------------------------------------------------
# one defect each
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, code, module, words",
    [
        ("nan", "nan-inf", "model.layers.0.self_attn.q_proj", ["lora_A", "3 NaN"]),
        ("inf", "nan-inf", "model.layers.1.self_attn.v_proj", ["lora_B", "3 Inf"]),
    ],
)
def test_value_defects(battery, name, code, module, words):
    r = check(battery[name], base=battery["base"])
    assert not r.ok
    assert codes(r, "error") == {code}
    (f,) = find(r, code)
    assert (f.severity, f.module) == ("error", module)
    assert all(w in f.message for w in words), f.message
    assert_named(r)


def test_one_zero_module_is_a_warning_and_fails_only_with_strict(battery):
    r = check(battery["zero_b"], base=battery["base"])
    assert r.ok and codes(r, "error") == set()
    (f,) = find(r, "untrained-module")
    assert (f.severity, f.module) == ("warning", "model.layers.0.self_attn.v_proj")
    assert "lora_B is all zero" in f.message and "never trained" in f.message
    assert_named(r)
    strict = check(battery["zero_b"], base=battery["base"], strict=True)
    assert not strict.ok and strict.strict and strict.failures == [f]
    assert check(battery["clean"], base=battery["base"], strict=True).ok


def test_truncated_file_is_an_integrity_finding(battery):
    r = check(battery["truncated"], base=battery["base"], target="vllm")
    assert not r.ok
    (f,) = r.findings
    assert (f.code, f.severity, f.module) == ("integrity", "error", None)
    assert WEIGHTS in f.message and "truncated" in f.message


def test_corrupt_header_is_an_integrity_finding(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = check(bad)
    assert [(f.code, f.severity) for f in r.findings] == [("integrity", "error")]
    assert str(bad) in r.findings[0].message


def test_lycoris_is_not_lora(tmp_path):
    p = tmp_path / "loha.safetensors"
    t = {f"lora_unet_down_blocks_0_attn.hada_w{i}_{ab}": torch.ones(4, 8) for i in (1, 2) for ab in "ab"}
    save_file(t, p)
    r = check(p)
    assert [(f.code, f.severity) for f in r.findings] == [("not-lora", "error")]
    assert "LoHa" in r.findings[0].message


def test_shape_mismatch(battery):
    r = check(battery["shape"], base=battery["base"])
    assert codes(r, "error") == {"shape-mismatch"}
    found = find(r, "shape-mismatch")
    assert {f.module for f in found} == {f"model.layers.{i}.mlp.gate_proj" for i in (0, 1)}
    assert all("[64, 32]" in f.message and "[48, 32]" in f.message for f in found)
    assert_named(r)


def test_unmatched_module(battery):
    r = check(battery["unmatched"], base=battery["base"])
    assert codes(r, "error") == {"unmatched-module"}
    (f,) = find(r, "unmatched-module")
    assert f.module == "model.layers.2.self_attn.q_proj"
    assert_named(r)


def test_vllm_rank_600(battery):
    r = check(battery["rank600"], base=battery["base"], target="vllm")
    assert codes(r, "error") == {"vllm-max-lora-rank"}
    (f,) = find(r, "vllm-max-lora-rank")
    assert f.severity == "error" and "600" in f.message and "512" in f.message
    assert f.fix is not None and shlex.split(f.fix)[:2] == ["loractl", "truncate"]
    assert_named(r)


def test_vllm_modules_to_save(battery):
    r = check(battery["mts"], base=battery["base"], target="vllm")
    assert codes(r, "error") == {"vllm-modules-to-save"}
    (f,) = find(r, "vllm-modules-to-save")
    assert f.module == "lm_head" and "first request" in f.message
    assert_named(r)


def test_vllm_dora(battery):
    r = check(battery["dora"], base=battery["base"], target="vllm")
    assert codes(r, "error") == {"vllm-dora"}
    (f,) = find(r, "vllm-dora")
    assert f.module is not None and "DoRA" in f.message
    assert_named(r)


def test_vllm_rank_pattern(battery):
    r = check(battery["pattern"], base=battery["base"], target="vllm")
    assert r.ok  # vLLM >= 0.34 applies the patterns (PEFTHelper.get_rank_and_scaling); older ones did not: an info
    assert not codes(r, "warning")
    assert codes(r, "info") >= {"vllm-patterns-ignored"}
    found = find(r, "vllm-patterns-ignored")
    assert all(f.severity == "info" and "0.34" in f.message for f in found)
    # q_proj modules have rank 16 and alpha 16 (scale 1); an older vLLM applies lora_alpha/r = 16/8 = 2
    assert {f.module for f in found} == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert all(f.fix is not None and f.fix.endswith("--normalize") for f in found)
    assert "--max-lora-rank 16" in find(r, "vllm-max-lora-rank")[0].message
    assert_named(r)


def test_vllm_unknown_module_name(battery):
    r = check(battery["fake"], base=battery["base"], target="vllm")
    module = "model.layers.0.self_attn.v_gate"
    (f,) = find(r, "vllm-unknown-module")
    assert (f.severity, f.module) == ("error", module)
    assert "first request" in f.message
    # the made-up module is not in the base either
    assert codes(r, "error") == {"vllm-unknown-module", "unmatched-module"}
    assert_named(r)


def test_vllm_unknown_module_for_architecture(battery):
    """A module the base has but vLLM's model class takes no LoRA on (Qwen2 has no embedding_modules)."""
    r = check(battery["qwen_lm_head"], base=battery["qwen_base"], target="vllm")
    assert codes(r, "error") == {"vllm-unknown-module"}
    (f,) = find(r, "vllm-unknown-module")
    assert f.module == "lm_head" and "Qwen2ForCausalLM" in f.message
    # the same adapter is fine for vLLM's Llama, which has lm_head in embedding_modules
    assert check(battery["qwen_lm_head"], base=battery["qwen_base"]).ok


def test_vllm_without_base_does_not_guess_module_names(battery):
    r = check(battery["fake"], target="vllm")
    assert r.ok
    assert [f.severity for f in find(r, "vllm-modules-unchecked")] == ["info"]


def test_lorax_rank_24(battery):
    r = check(battery["rank24"], base=battery["base"], target="lorax")
    assert r.ok
    assert codes(r, "warning") == {"lorax-rank-padding"}
    found = find(r, "lorax-rank-padding")
    assert {f.module for f in found} == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert all("32" in f.message and f.fix is not None and f.fix.endswith("--pad-rank 32") for f in found)
    assert_named(r)


def test_lorax_partial_layers(battery):
    r = check(battery["partial"], base=battery["base"], target="lorax")
    assert codes(r, "error") == {"lorax-partial-layers"}
    assert {f.module for f in find(r, "lorax-partial-layers")} == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    }
    assert_named(r)


def test_llamacpp_unknown_architecture(battery):
    r = check(battery["clean"], base=battery["foo_base"], target="llama.cpp")
    assert codes(r, "error") == {"llamacpp-arch"}
    (f,) = find(r, "llamacpp-arch")
    assert "FooForCausalLM" in f.message and f.module is None


def test_llamacpp_dora_and_modules_to_save(battery):
    r = check(battery["dora"], base=battery["base"], target="llama.cpp")
    assert codes(r, "error") == {"llamacpp-dora"}
    r = check(battery["mts"], base=battery["base"], target="llama.cpp")
    assert codes(r, "error") == {"llamacpp-modules-to-save"}


def test_llamacpp_rank_pattern_is_fine_but_alpha_pattern_needs_folding(battery, tmp_path):
    # rank_pattern alone: alpha / r per module is exactly llama.cpp's rule
    r = check(battery["pattern"], base=battery["base"], target="llama.cpp")
    assert r.ok and not find(r, "llamacpp-fold-scale")
    # alpha_pattern: one alpha per GGUF file cannot express it
    a = shutil.copytree(battery["clean"], tmp_path / "alpha")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"v_proj": 4}
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = check(a, base=battery["base"], target="llama.cpp")
    (f,) = find(r, "llamacpp-fold-scale")
    assert f.severity == "info" and r.ok
    assert f.fix is not None and "--to gguf" in f.fix and f.module.endswith("v_proj")


# --------------------------------------------------------------------------------------------
# peft target
# --------------------------------------------------------------------------------------------
def test_peft_base_changing_init(battery, tmp_path):
    a = shutil.copytree(battery["clean"], tmp_path / "pissa")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = check(a, base=battery["base"], target="peft")
    assert r.ok and codes(r, "warning") == {"base-changing-init"}
    assert "pissa" in find(r, "base-changing-init")[0].message


def test_peft_config_with_unknown_keys_warns(battery, tmp_path):
    a = shutil.copytree(battery["clean"], tmp_path / "future")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["some_future_option"] = True
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = check(a, target="peft")
    assert r.ok
    (f,) = find(r, "peft-config")
    assert f.severity == "warning" and "some_future_option" in f.message


def test_peft_config_that_peft_rejects(battery, tmp_path):
    a = shutil.copytree(battery["clean"], tmp_path / "broken")
    cfg = json.loads((a / "adapter_config.json").read_text())
    # LoraConfig.__post_init__: "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
    cfg["layers_pattern"] = "layers"
    cfg["layers_to_transform"] = None
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = check(a, target="peft")
    assert not r.ok
    (f,) = find(r, "peft-config")
    assert f.severity == "error" and "layers_to_transform" in f.message


def test_peft_missing_is_an_info(battery, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    r = check(battery["clean"], target="peft")
    assert r.ok and [(f.code, f.severity) for f in r.findings] == [("peft-unavailable", "info")]


def test_layout_for_runtimes(battery, tmp_path):
    """A lone safetensors file is no PEFT folder: PEFT, vLLM and LoRAX need converting first."""
    single = tmp_path / "single.safetensors"
    shutil.copyfile(battery["clean"] / WEIGHTS, single)
    alpha = json.loads((battery["clean"] / "adapter_config.json").read_text())["lora_alpha"]
    for target, code in (("peft", "peft-layout"), ("vllm", "vllm-layout"), ("lorax", "lorax-layout")):
        r = check(single, target=target, alpha=alpha)
        (f,) = find(r, code)
        assert f.severity == "error" and f.fix is not None and "--to peft" in f.fix
        assert f"--alpha {alpha!r}" in f.fix  # the fix reads the file: it needs the alpha too


def test_lone_peft_file_without_alpha_is_an_integrity_error(battery, tmp_path):
    """Without its adapter_config.json a PEFT file's scale is unknown: an integrity finding naming --alpha."""
    single = tmp_path / "single.safetensors"
    shutil.copyfile(battery["clean"] / WEIGHTS, single)
    r = check(single, target="vllm")
    (f,) = find(r, "integrity")
    assert not r.ok and f.severity == "error" and "--alpha" in f.message and str(single) in f.message


# --------------------------------------------------------------------------------------------
# the suggested fixes, run as written
# --------------------------------------------------------------------------------------------
def run_fix(fix: str, out: Path) -> None:
    from typer.testing import CliRunner

    from loractl.cli.app import app

    argv = shlex.split(fix)
    assert argv[0] == "loractl" and "OUT" in argv
    argv = [str(out) if x == "OUT" else x for x in argv[1:]]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output


def test_fix_truncate_for_vllm(battery, tmp_path):
    r = check(battery["rank600"], base=battery["base"], target="vllm")
    (f,) = find(r, "vllm-max-lora-rank")
    assert f.fix is not None and f.fix.endswith("--rank 512")
    run_fix(f.fix, tmp_path / "r512")
    r2 = check(tmp_path / "r512", base=battery["base"], target="vllm")
    assert r2.ok, r2.findings  # SVD truncation keeps at most 512 (here the 32 nonzero singular values)
    assert find(r2, "vllm-max-lora-rank")[0].severity == "info"


def test_fix_truncate_for_max_rank(battery, tmp_path):
    r = check(battery["rank24"], base=battery["base"], max_rank=16)
    found = find(r, "rank-too-large")
    assert codes(r, "error") == {"rank-too-large"} and len(found) == 2
    assert_named(r)
    fixes = {f.fix for f in found}
    assert len(fixes) == 1
    run_fix(fixes.pop(), tmp_path / "r16")  # type: ignore[arg-type]
    assert check(tmp_path / "r16", base=battery["base"], max_rank=16).ok


# --------------------------------------------------------------------------------------------
# every finding is listed; argument errors
# --------------------------------------------------------------------------------------------
def test_all_findings_are_listed(battery, tmp_path):
    """Several defects at once: each is reported, errors first."""
    q0b = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    v1a = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"
    a = _edit(
        battery["dora"],
        tmp_path / "many",
        lambda t: _set(v1a, _poke(float("nan")))(_set(q0b, torch.zeros_like)(t)),
    )
    r = check(a, base=battery["base"], target="vllm", max_rank=4)
    assert {"nan-inf", "rank-too-large", "vllm-dora"} <= codes(r, "error")
    assert "untrained-module" in codes(r, "warning")
    assert len(find(r, "rank-too-large")) == 4
    sev = [f.severity for f in r.findings]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)


def test_arguments(battery, tmp_path):
    with pytest.raises(UsageError):
        check(battery["clean"], target="tgi")
    with pytest.raises(UsageError):
        check(battery["clean"], max_rank=0)
    with pytest.raises(InputError):
        check(tmp_path / "nope")
    assert check(battery["clean"], target="LLAMACPP").target == "llama.cpp"


def test_runtime_rank_rules():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512, 513)] == [
        1,
        8,
        8,
        16,
        320,
        320,
        512,
        512,
        None,
    ]
    assert VLLM_MAX_LORA_RANKS[-1] == 512
    assert [lorax_padded_rank(r) for r in (1, 8, 9, 16, 24, 128, 129)] == [8, 8, 16, 16, 32, 128, 144]


def _run_fix_to(fix: str, out: Path) -> None:
    """Run a fix whose output is written ``OUT`` or ``OUT.<suffix>``."""
    from typer.testing import CliRunner

    from loractl.cli.app import app

    argv = shlex.split(fix)
    assert argv[0] == "loractl"
    argv = [str(out) if x.split(".")[0] == "OUT" else x for x in argv[1:]]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output


def test_fix_normalize_for_vllm_patterns(battery, tmp_path):
    r = check(battery["pattern"], base=battery["base"], target="vllm")
    found = find(r, "vllm-patterns-ignored")
    assert found and len({f.fix for f in found}) == 1
    assert found[0].fix is not None and "--normalize" in found[0].fix
    _run_fix_to(found[0].fix, tmp_path / "norm")
    r2 = check(tmp_path / "norm", base=battery["base"], target="vllm")
    assert r2.ok and not find(r2, "vllm-patterns-ignored") and not codes(r2, "warning"), r2.findings


def test_fix_pad_rank_for_lorax(battery, tmp_path):
    r = check(battery["rank24"], base=battery["base"], target="lorax")
    fixes = {f.fix for f in find(r, "lorax-rank-padding")}
    assert len(fixes) == 1
    fix = fixes.pop()
    assert fix is not None and "--pad-rank 32" in fix
    _run_fix_to(fix, tmp_path / "padded")
    r2 = check(tmp_path / "padded", base=battery["base"], target="lorax")
    assert r2.ok and not find(r2, "lorax-rank-padding"), r2.findings


def test_fix_gguf_for_llamacpp_alpha_pattern(battery, tmp_path):
    pytest.importorskip("gguf")
    a = shutil.copytree(battery["clean"], tmp_path / "alpha")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"v_proj": 4}
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    found = find(check(a, base=battery["base"], target="llama.cpp"), "llamacpp-fold-scale")
    assert found and len({f.fix for f in found}) == 1
    _run_fix_to(found[0].fix, tmp_path / "a.gguf")
    r2 = check(tmp_path / "a.gguf", base=battery["base"], target="llama.cpp")
    assert r2.ok and not find(r2, "llamacpp-fold-scale"), r2.findings
    # the GGUF carries the same updates as the PEFT original
    from loractl import api

    orig, back = api.load_adapter(a), api.load_adapter(tmp_path / "a.gguf", options=_opts(battery["base"]))
    for name, m in orig.modules.items():
        torch.testing.assert_close(
            (back.modules[name].up.double() @ back.modules[name].down.double()) * back.modules[name].scale,
            (m.up.double() @ m.down.double()) * m.scale,
            rtol=1e-6,
            atol=1e-8,
        )


def _opts(base: Path):
    from loractl.formats import ReadOptions
    from loractl.io.base import open_base

    with open_base(base) as b:
        return ReadOptions(base_keys=list(b.tensors), base_config=b.config)
