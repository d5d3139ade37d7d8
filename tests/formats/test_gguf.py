"""GGUF LoRA adapters against llama.cpp's rules and against PEFT itself.

The expected layout is encoded here from llama.cpp's converter, not taken from loractl. Line
numbers are of llama.cpp b4800 (commit c392e509, 2025-02-20); the rules are unchanged on master
(``conversion/base.py``, ``conversion/llama.py``):

- ``convert_lora_to_gguf.py`` L225-232 ``get_base_tensor_name``: drop ``base_model.model.``,
  ``.lora_A.weight`` / ``.lora_B.weight`` → ``.weight``; ``convert_hf_to_gguf.py`` L211-215
  ``map_tensor_name``: ``gguf.get_tensor_name_map(arch, n_layers).get_name(name, (".weight",
  ".bias"))``; ``convert_lora_to_gguf.py`` L441-442: ``.lora_a`` = A, ``.lora_b`` = B;
- ``convert_lora_to_gguf.py`` L371-372 and L444: ``adapter.lora.alpha`` = float32 ``lora_alpha``;
  L367-369: ``general.type = "adapter"``, ``adapter.type = "lora"``; ``convert_hf_to_gguf.py``
  L427 and L436: ``general.*`` from ``gguf.Metadata`` and ``general.quantization_version``;
- ``convert_hf_to_gguf.py`` L352-358: ``--outtype`` f32/f16/bf16 gives the lora tensors' type;
- ``convert_hf_to_gguf.py`` L1616-1622 ``LlamaModel.permute`` and L1626-1632 (q_proj with
  ``n_head``, k_proj with ``n_head_kv``), applied to the LoRA pair by ``LoraTorchTensor``
  (``convert_lora_to_gguf.py`` L129-172: reshape/permute act on B's rows only);
- llama.cpp ``src/llama-adapter.h`` ``get_scale``: runtime scale ``alpha / b->ne[0]`` (alpha 0: 1).

The ground truth of every update is PEFT's own model (``scaling[adapter]``, ``lora_A``, ``lora_B``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, make_adapter, read_st, same_bits, save_base
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from loractl import api  # noqa: E402
from loractl.adapter import Adapter, LoraModule  # noqa: E402
from loractl.errors import FormatError, InputError, UnsupportedAdapterError  # noqa: E402
from loractl.formats import ReadOptions, WriteOptions, load_adapter  # noqa: E402

N_HEAD, N_KV = 4, 2
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=N_HEAD,
    num_key_value_heads=N_KV,
    vocab_size=128,
)
VARIANTS: dict[str, dict[str, Any]] = {
    # one lora_alpha: convert_lora_to_gguf.py's own case, nothing to fold
    "plain": dict(r=4, lora_alpha=8),
    # rank_pattern (llama.cpp reads r per tensor) and alpha_pattern (v_proj: folded, ×1.5)
    "pattern": dict(
        r=4, lora_alpha=8, rank_pattern={"k_proj": 2, "down_proj": 8}, alpha_pattern={"v_proj": 12}
    ),
    # rsLoRA: s = 8/√4 = 4 for r=4 and 8/√16 = 2 for q_proj (r=16); alpha_file = 16, q folded ×2
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 16}),
}


# --------------------------------------------------------------------------------------------
# llama.cpp's rules, re-implemented here from its sources
# --------------------------------------------------------------------------------------------
def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (b4800 L1616-1622), verbatim in meaning."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def script_names(peft_key: str, n_layers: int) -> str:
    """The GGUF name ``convert_lora_to_gguf.py`` gives a PEFT key (L225-232, L441-442)."""
    base = peft_key.replace("base_model.model.", "")
    base = base.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    new = tmap.get_name(base, try_suffixes=(".weight", ".bias"))
    assert new is not None, base
    return new + (".lora_a" if ".lora_A." in peft_key else ".lora_b")


def permute_of(module: str) -> int | None:
    """The head count ``LlamaModel.modify_tensors`` permutes a module's rows with (L1626-1632)."""
    if module.endswith("q_proj"):
        return N_HEAD
    if module.endswith("k_proj"):
        return N_KV
    return None


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keys (value, type) and tensors (type name, ne, float64 data in torch order) via gguf's reader."""
    r = gguf.GGUFReader(path)
    kv = {k: (f.contents(), f.types[0]) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts: dict[str, Any] = {}
    for t in r.tensors:
        ne = [int(x) for x in t.shape]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(ne)))
        ts[t.name] = (t.tensor_type.name, ne, torch.from_numpy(data.astype("float64")))
    return kv, ts


def peft_truth(base: Path, adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scale) of every LoRA layer, as PEFT itself builds them from the folder."""
    import peft
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, adapter)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a = mod.lora_A["default"].weight.detach().double()
            b = mod.lora_B["default"].weight.detach().double()
            out[name.removeprefix("base_model.model.")] = (a, b, float(mod.scaling["default"]))
    return out


# --------------------------------------------------------------------------------------------
# fixtures: one tiny Llama, three adapters, PEFT's view of each
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gguf")
    model = build_model("llama", **TINY)
    base = save_base(model, root / "base")
    config = json.loads((base / "config.json").read_text())
    adapters, truth, ggufs = {}, {}, {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        ad = make_adapter(model, root / name, seed=10 + i, target_modules="all-linear", **kw)
        adapters[name] = ad
        truth[name] = peft_truth(base, ad)
        out = root / f"{name}.gguf"
        api.save_adapter(load_adapter(ad), out, to="gguf", options=WriteOptions(base_config=config))
        ggufs[name] = out
    return dict(root=root, base=base, config=config, adapters=adapters, truth=truth, ggufs=ggufs)


def _as_dtype(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    sd = load_file(src / "adapter_model.safetensors")
    save_file({k: v.to(dtype) for k, v in sd.items()}, dst / "adapter_model.safetensors")
    return dst


# --------------------------------------------------------------------------------------------
# (1) the layout convert_lora_to_gguf.py gives, read by gguf's own reader
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "qtype"), [(torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")]
)
def test_layout_is_convert_lora_to_gguf(tiny, tmp_path: Path, dtype: torch.dtype, qtype: str) -> None:
    ad = tiny["adapters"]["plain"]
    if dtype != torch.float32:
        ad = _as_dtype(ad, tmp_path / "plain", dtype)  # as `--outtype f16/bf16` for these factors
    out = tmp_path / "plain.gguf"
    api.save_adapter(load_adapter(ad), out, to="gguf", options=WriteOptions(base_config=tiny["config"]))
    kv, ts = read_gguf(out)

    assert kv["general.architecture"] == ("llama", gguf.GGUFValueType.STRING)
    assert kv["general.type"] == ("adapter", gguf.GGUFValueType.STRING)
    assert kv["adapter.type"] == ("lora", gguf.GGUFValueType.STRING)
    assert kv["adapter.lora.alpha"] == (8.0, gguf.GGUFValueType.FLOAT32)
    assert kv["general.quantization_version"][0] == gguf.GGML_QUANT_VERSION
    assert kv["general.name"][0] == gguf.Metadata.load(None, ad, None, 0).name
    script_keys = {"general.architecture", "general.type", "adapter.type", "general.name"}
    script_keys |= {"adapter.lora.alpha", "general.quantization_version"}
    assert {k for k in kv if not k.startswith("loractl.")} == script_keys

    sd = load_file(ad / "adapter_model.safetensors")
    expected = {script_names(k, 2): k for k in sd}
    assert set(ts) == set(expected)
    for gname, key in expected.items():
        kind, ne, data = ts[gname]
        t = sd[key]
        assert kind == qtype, gname
        assert ne == list(reversed(t.shape)), gname  # lora_a ne = [in, r], lora_b ne = [r, out]
        want = t.double()
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if ".lora_B." in key and permute_of(module):
            want = llama_permute(want, N_HEAD, permute_of(module))
        assert torch.equal(data, want), gname  # bit for bit: the values are representable

    back = load_adapter(out, options=ReadOptions(base_config=tiny["config"]))  # and loractl reads it back
    for key, t in sd.items():
        m = back.modules[key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]]
        got = m.down if ".lora_A." in key else m.up
        assert got.dtype == dtype and torch.equal(got, t), key


# --------------------------------------------------------------------------------------------
# (2) llama.cpp's runtime update is the permuted HF update, for every module and rank
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runtime_update_is_permuted_hf_update(tiny, variant: str) -> None:
    kv, ts = read_gguf(tiny["ggufs"][variant])
    alpha = kv["adapter.lora.alpha"][0]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    worst = 0.0
    for module, (a, b, s) in tiny["truth"][variant].items():
        g = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        _, ne_b, b_gguf = ts[g + ".lora_b"]
        _, _, a_gguf = ts[g + ".lora_a"]
        rank = ne_b[0]  # llama_adapter_lora_weight::get_scale: rank = b->ne[0]
        runtime = (alpha / rank) * (b_gguf @ a_gguf)
        hf = s * (b @ a)
        want = llama_permute(hf, N_HEAD, permute_of(module)) if permute_of(module) else hf
        err = float((runtime - want).abs().max() / want.abs().max())
        worst = max(worst, err)
        assert err <= 2**-23, (module, err)  # at most the float32 rounding of a folded B
        if permute_of(module):
            assert not torch.allclose(runtime, hf), module  # the permutation is not a no-op here
    if variant != "pattern":
        assert worst == 0.0  # nothing folded, or folded by a power of two


def test_permutation_regroups_rope_halves_per_head(tiny) -> None:
    """Row i of head h's first half and row i of its second half become neighbours (2i, 2i+1):
    llama.cpp's interleaved RoPE pairs where transformers' rotate_half pairs (i, i + d/2)."""
    _, ts = read_gguf(tiny["ggufs"]["plain"])
    _, b, _ = tiny["truth"]["plain"]["model.layers.0.self_attn.k_proj"]
    b_gguf = ts["blk.0.attn_k.weight.lora_b"][2]
    d = b.shape[0] // N_KV
    for h in range(N_KV):
        for i in range(d // 2):
            assert torch.equal(b_gguf[h * d + 2 * i], b[h * d + i])
            assert torch.equal(b_gguf[h * d + 2 * i + 1], b[h * d + d // 2 + i])


# --------------------------------------------------------------------------------------------
# (3) peft -> gguf -> peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_through_peft(tiny, tmp_path: Path, variant: str) -> None:
    back = load_adapter(tiny["ggufs"][variant], options=ReadOptions(base_config=tiny["config"]))
    assert back.format == "gguf"
    assert set(back.modules) == set(tiny["truth"][variant])
    alpha_file = read_gguf(tiny["ggufs"][variant])[0]["adapter.lora.alpha"][0]
    for name, (a, b, s) in tiny["truth"][variant].items():
        m = back.modules[name]
        assert m.kind == "linear" and not m.rslora and m.alpha == alpha_file
        assert torch.equal(m.down.double(), a)  # A is never touched
        factor = s * m.rank / alpha_file  # the documented folding: B' = B · s·r / alpha_file
        assert torch.equal(m.up.double(), (b * factor).float().double()), name  # B' = f32(B · factor)

    peft_dir = api.save_adapter(back, tmp_path / "peft", to="peft")
    again = peft_truth(tiny["base"], peft_dir)
    worst = 0.0
    for name, (a, b, s) in tiny["truth"][variant].items():
        a2, b2, s2 = again[name]
        ref, got = s * (b @ a), s2 * (b2 @ a2)
        if variant == "pattern" and name.endswith("v_proj"):  # folded ×1.5: B' rounded to float32
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        else:
            assert torch.equal(got, ref), name  # identical in fp64
    assert worst <= 2**-24


# --------------------------------------------------------------------------------------------
# (4) head counts are needed to undo the permutation; nothing else is
# --------------------------------------------------------------------------------------------
def test_llama_gguf_without_base_config_is_a_clear_exit_2(tiny) -> None:
    path = tiny["ggufs"]["plain"]
    with pytest.raises(InputError) as e:
        load_adapter(path)
    assert e.value.exit_code == 2
    assert "needs --base" in e.value.message
    assert str(path) in e.value.message and ".attn_" in e.value.message
    assert "\n" not in e.value.message


def test_cli_inspect_of_llama_gguf_without_base(tiny) -> None:
    from typer.testing import CliRunner

    from loractl.cli.app import app

    res = CliRunner().invoke(app, ["inspect", str(tiny["ggufs"]["plain"])])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert (
        lines[0].startswith("error: ")
        and "needs --base" in lines[0]
        and str(tiny["ggufs"]["plain"]) in lines[0]
    )
    assert all(line.startswith(("error: ", "hint: ")) for line in lines)


def test_writing_without_base_config_is_a_clear_error(tiny, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(InputError, match="--base"):
        api.save_adapter(load_adapter(tiny["adapters"]["plain"]), out, to="gguf")
    assert not out.exists()


def test_unpermuted_arch_reads_without_base(tiny, tmp_path: Path) -> None:
    """Qwen2 (and Gemma, Phi-3) are not permuted: same names, B as is, no base needed to read."""
    cfg = {**tiny["config"], "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    out = tmp_path / "q.gguf"
    src = load_adapter(tiny["adapters"]["plain"])
    api.save_adapter(src, out, to="gguf", options=WriteOptions(base_config=cfg))
    kv, ts = read_gguf(out)
    assert kv["general.architecture"][0] == "qwen2"
    q = src.modules["model.layers.1.self_attn.q_proj"]
    assert torch.equal(ts["blk.1.attn_q.weight.lora_b"][2], q.up.double())
    back = load_adapter(out)
    assert set(back.modules) == set(src.modules)
    assert all(torch.equal(back.modules[n].up, m.up) for n, m in src.modules.items())


# --------------------------------------------------------------------------------------------
# (5) merging the GGUF equals merging the PEFT adapter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_of_gguf_equals_merge_of_peft(tiny, tmp_path: Path, variant: str) -> None:
    api.merge(tiny["base"], [tiny["ggufs"][variant]], tmp_path / "g", receipt=False)
    api.merge(tiny["base"], [tiny["adapters"][variant]], tmp_path / "p", receipt=False)
    got, ref = read_st(tmp_path / "g"), read_st(tmp_path / "p")
    assert set(got) == set(ref)
    diff = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
    if variant == "pattern":  # v_proj's B folded ×1.5 and rounded: 1-2 float32 ulps (measured 4.8e-7)
        ulp = max(float(torch.finfo(torch.float32).eps * ref[k].abs().max()) for k in ref)
        assert 0 < diff <= 2 * ulp
    else:  # unfolded, or folded by a power of two: the same bits
        assert all(same_bits(got[k], ref[k]) for k in ref)


# --------------------------------------------------------------------------------------------
# reading files built by hand from llama.cpp's rules; refusals
# --------------------------------------------------------------------------------------------
def _hand_built(
    path: Path, sd: dict[str, torch.Tensor], alpha: float, arch: str = "llama", gtype: str = "adapter"
) -> Path:
    """A GGUF LoRA as convert_lora_to_gguf.py writes one, without loractl."""
    w = gguf.GGUFWriter(path=None, arch=arch)
    for key, t in sd.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if ".lora_B." in key and permute_of(module):
            t = llama_permute(t, N_HEAD, permute_of(module))
        w.add_tensor(script_names(key, 2), t.float().contiguous().numpy())
    w.add_type(gtype)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_a_hand_built_file_and_alpha_zero_means_scale_one(tiny, tmp_path: Path) -> None:
    sd = load_file(tiny["adapters"]["plain"] / "adapter_model.safetensors")
    opts = ReadOptions(base_config=tiny["config"])
    a = load_adapter(_hand_built(tmp_path / "a.gguf", sd, 8.0), options=opts)
    for name, (down, up, s) in tiny["truth"]["plain"].items():
        m = a.modules[name]
        assert torch.equal(m.down.double(), down) and torch.equal(m.up.double(), up) and m.scale == s
    z = load_adapter(_hand_built(tmp_path / "z.gguf", sd, 0.0), options=opts)
    assert {m.scale for m in z.modules.values()} == {1.0}  # get_scale: alpha 0 -> adapter scale


def test_refusals(tiny, tmp_path: Path) -> None:
    sd = load_file(tiny["adapters"]["plain"] / "adapter_model.safetensors")
    model_file = _hand_built(tmp_path / "m.gguf", sd, 8.0, gtype="model")
    with pytest.raises(FormatError, match="not a GGUF LoRA adapter"):
        load_adapter(model_file, options=ReadOptions(base_config=tiny["config"]))
    with pytest.raises(InputError, match="architecture 'llama' but the base is 'qwen2'"):
        cfg = {**tiny["config"], "architectures": ["Qwen2ForCausalLM"]}
        load_adapter(tiny["ggufs"]["plain"], options=ReadOptions(base_config=cfg))
    with pytest.raises(InputError, match="GPT2LMHeadModel"):
        api.save_adapter(
            load_adapter(tiny["adapters"]["plain"]),
            tmp_path / "g.gguf",
            to="gguf",
            options=WriteOptions(base_config={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
        )
    ad = load_adapter(tiny["adapters"]["plain"])
    m = next(iter(ad.modules.values()))
    m.magnitude = torch.ones(m.up.shape[0])
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        api.save_adapter(ad, tmp_path / "d.gguf", to="gguf", options=WriteOptions(base_config=tiny["config"]))
    gemma = {**tiny["config"], "architectures": ["GemmaForCausalLM"], "model_type": "gemma"}
    lm = load_adapter(tiny["adapters"]["plain"])
    lm.modules = {"lm_head": LoraModule("lm_head", "linear", torch.zeros(2, 64), torch.zeros(128, 2), 2.0)}
    with pytest.raises(InputError, match="'lm_head' has no tensor in a llama.cpp 'gemma' model"):
        api.save_adapter(lm, tmp_path / "l.gguf", to="gguf", options=WriteOptions(base_config=gemma))
    assert not any(tmp_path.glob("[gdl].gguf"))


def test_phi3_fused_projections_round_trip(tmp_path: Path) -> None:
    """Phi-3's qkv_proj and gate_up_proj map to attn_qkv and ffn_up and back."""
    g = torch.Generator().manual_seed(3)
    mods = {}
    for name, (out, inp) in {
        "model.layers.0.self_attn.qkv_proj": (96, 32),
        "model.layers.0.mlp.gate_up_proj": (128, 32),
        "model.embed_tokens": (32, 100),
    }.items():
        kind = "embedding" if "embed" in name else "linear"
        down = torch.randn(4, inp if kind == "linear" else 100, generator=g)
        up = torch.randn(out if kind == "linear" else 32, 4, generator=g)
        mods[name] = LoraModule(name, kind, down, up, 8.0)
    ad = Adapter(path=tmp_path / "phi", format="peft", modules=mods)
    cfg = {"architectures": ["Phi3ForCausalLM"], "num_hidden_layers": 1, "num_attention_heads": 4}
    out = tmp_path / "phi.gguf"
    api.save_adapter(ad, out, to="gguf", options=WriteOptions(base_config=cfg))
    _, ts = read_gguf(out)
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.0.ffn_up.weight.lora_b", "token_embd.weight.lora_a"} <= set(
        ts
    )
    assert ts["token_embd.weight.lora_a"][1] == [4, 100]  # stored Aᵀ: ne = [r, vocab]
    back = load_adapter(out)
    assert set(back.modules) == set(mods)
    for name, m in mods.items():
        assert torch.equal(back.modules[name].down, m.down) and torch.equal(back.modules[name].up, m.up)
        assert back.modules[name].kind == m.kind and math.isclose(back.modules[name].scale, m.scale)
