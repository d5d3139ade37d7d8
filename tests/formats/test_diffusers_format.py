"""The diffusers LoRA format, checked against diffusers itself (0.42): its writer, loaders and ``fuse_lora``.

Every UNet is a tiny ``UNet2DConditionModel`` built from a config with seeded weights; every adapter is
attached with diffusers/PEFT (``unet.add_adapter``) and given seeded random factors.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, make_adapter, read_st, same_bits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.adapter import Adapter, LoraModule
from loractl.errors import FormatError
from loractl.formats import detect, load_adapter
from loractl.formats import diffusers as dfmt
from loractl.ops.merge import delta_weight

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SDLoader  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.0.proj"]


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
        attention_head_dim=8,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def with_lora(base: UNet2DConditionModel, seed: int = 1, **lora: Any) -> UNet2DConditionModel:
    """A copy of ``base`` with a LoRA attached by diffusers (``add_adapter``) and seeded random factors."""
    unet = copy.deepcopy(base)
    unet.add_adapter(peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return unet


def lora_layers(unet: torch.nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        k: sorted(v) if isinstance(v, set) else (str(v.value) if hasattr(v, "value") else v)
        for k, v in cfg.items()
    }


def save_peft_folder(unet: torch.nn.Module, path: Path) -> Path:
    """The adapter attached to ``unet`` as a PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    path.mkdir()
    cfg = _jsonable(unet.peft_config["default"].to_dict())
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    sd = get_peft_model_state_dict(unet)
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in sd.items()}, path / "adapter_model.safetensors"
    )
    return path


def diffusers_loaded(
    base: UNet2DConditionModel, lora: Path | dict[str, torch.Tensor]
) -> UNet2DConditionModel:
    """``base`` with a LoRA file loaded the way ``StableDiffusionPipeline.load_lora_weights`` loads it."""
    unet = copy.deepcopy(base)
    sd, alphas, metadata = SDLoader.lora_state_dict(lora, return_lora_metadata=True)
    SDLoader.load_lora_into_unet(sd, alphas, unet, adapter_name="x", metadata=metadata)
    return unet


def delta64(m: LoraModule) -> torch.Tensor:
    return delta_weight(replace(m, down=m.down.double(), up=m.up.double()))


def run(unet: UNet2DConditionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=ehs).sample


@pytest.fixture(scope="module")
def base() -> UNet2DConditionModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def trained(base: UNet2DConditionModel) -> UNet2DConditionModel:
    """A LoRA with per-module ranks and alphas (rank_pattern / alpha_pattern), attention and conv layers."""
    return with_lora(
        base,
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 3, "conv1": 5},
    )


@pytest.fixture(scope="module")
def saved(trained: UNet2DConditionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained`` saved by diffusers' own ``save_lora_weights``, with its config in the header."""
    d = tmp_path_factory.mktemp("sd-lora")
    SDLoader.save_lora_weights(
        d,
        unet_lora_layers=get_peft_model_state_dict(trained),
        unet_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    return d / dfmt.WEIGHTS_NAME


def test_reads_diffusers_file_to_the_peft_layers_updates(trained, saved: Path) -> None:
    """(a) every module's scale is PEFT's ``scaling`` and its update equals ``get_delta_weight`` (fp64)."""
    tensors = load_file(saved)
    with safe_open(saved, "pt") as f:
        assert detect(list(tensors), dict(f.metadata()), saved) == "diffusers"
    a = load_adapter(saved)
    layers = lora_layers(trained)
    assert a.format == "diffusers"
    assert sorted(a.modules) == sorted(f"unet.{n}" for n in layers)
    ref64 = copy.deepcopy(trained).double()
    worst = 0.0
    for name, layer in lora_layers(ref64).items():
        m = a.modules[f"unet.{name}"]
        assert m.scale == layer.scaling["default"], name
        diff = (delta64(m) - layer.get_delta_weight("default")).abs().max().item()
        worst = max(worst, diff)
    assert worst == 0.0  # the same fp64 operations as PEFT: measured 0


def test_without_header_config_alpha_is_r_as_diffusers_loads_it(base, trained, tmp_path: Path) -> None:
    """No ``lora_adapter_metadata``: diffusers (``get_peft_kwargs``) gives every module alpha = r."""
    SDLoader.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trained))
    path = tmp_path / dfmt.WEIGHTS_NAME
    a = load_adapter(path)
    loaded = lora_layers(diffusers_loaded(base, path))
    assert {m.scale for m in a.modules.values()} == {1.0}
    for name, layer in loaded.items():
        assert a.modules[f"unet.{name}"].scale == layer.scaling["x"]


def _old_key(key: str) -> str:
    """diffusers' older layouts: attention processors (``to_q_lora.down``) and LoRACompatible (``lora.down``)."""
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        for new, old in (("lora_A", "down"), ("lora_B", "up")):
            suffix = f".{proj}.{new}.weight"
            if key.endswith(suffix):
                return key[: -len(suffix)] + f".processor.{proj.split('.')[0]}_lora.{old}.weight"
    return key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")


def test_old_attention_processor_layout_reads_as_diffusers_loads_it(base, trained, tmp_path: Path) -> None:
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(trained).items()}
    old = {_old_key(k): v for k, v in sd.items()}
    assert any(".processor.to_out_lora.up.weight" in k for k in old)
    path = tmp_path / "old.safetensors"
    save_file(old, path)
    a = load_adapter(path)
    assert a.format == "diffusers"
    loaded = lora_layers(diffusers_loaded(base, dict(old)))
    assert sorted(a.modules) == sorted(f"unet.{n}" for n in loaded)
    for name, layer in loaded.items():
        m = a.modules[f"unet.{name}"]
        assert m.scale == layer.scaling["x"]
        assert torch.equal(delta_weight(m), layer.get_delta_weight("x")), name


def test_text_encoder_key_names_match_diffusers_conversion() -> None:
    """Old text-encoder layouts map to the module names diffusers' own converters give."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    pre = "text_model.encoder.layers.0"
    keys = [
        f"{pre}.self_attn.to_q_lora.down.weight",
        f"{pre}.self_attn.to_out_lora.up.weight",
        f"{pre}.self_attn.k_proj.lora_linear_layer.down.weight",
        f"{pre}.mlp.fc1.lora_linear_layer.up.weight",
    ]
    theirs = convert_state_dict_to_peft(convert_state_dict_to_diffusers({k: torch.zeros(1) for k in keys}))
    ours = []
    for k in keys:
        c = dfmt.canonical_key(f"text_encoder.{k}")
        assert c is not None and c[0] == "text_encoder"
        ours.append(c[1])
    assert ours == list(theirs)


def test_merge_equals_diffusers_fuse_lora(base, saved: Path, tmp_path: Path) -> None:
    """(b) ``api.merge`` into the UNet's own folder equals diffusers' ``fuse_lora`` bit for bit."""
    base.save_pretrained(tmp_path / "unet")
    res = api.merge(tmp_path / "unet", [saved], tmp_path / "merged", receipt=False)
    assert res.unmatched == [] and res.modules == len(load_adapter(saved).modules)
    fused = diffusers_loaded(base, saved)
    fused.fuse_lora()
    ref = {k.replace(".base_layer.", "."): v for k, v in fused.state_dict().items() if "lora_" not in k}
    got = read_st(tmp_path / "merged")
    assert sorted(got) == sorted(ref)
    assert all(same_bits(got[k], ref[k]) for k in ref)  # measured: identical (same torch ops as PEFT's merge)


def test_writer_output_loads_in_diffusers_with_every_scale(base, tmp_path: Path) -> None:
    """(c) PEFT adapter -> loractl's diffusers writer -> diffusers' loader: same scales, same UNet outputs."""
    peft_unet = with_lora(
        base,
        seed=3,
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=TARGETS,
        rank_pattern={"attn2.to_k": 3, "conv1": 2},
        alpha_pattern={"to_v": 5, "proj_in": 1.5},
    )
    src = save_peft_folder(peft_unet, tmp_path / "peft")
    out = api.save_adapter(
        api.load_adapter(src), tmp_path / dfmt.WEIGHTS_NAME, to="diffusers", operation="convert"
    )
    with safe_open(out, "pt") as f:
        meta = dict(f.metadata())
        keys = list(f.keys())
    assert all(k.startswith("unet.") for k in keys)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.use_rslora"] is True and meta["format"] == "pt"
    loaded = diffusers_loaded(base, out)
    want = lora_layers(peft_unet)
    got = lora_layers(loaded)
    assert sorted(got) == sorted(want)
    for name, layer in want.items():
        assert got[name].scaling["x"] == layer.scaling["default"], name
        assert got[name].r["x"] == layer.r["default"], name
    assert torch.equal(run(loaded), run(peft_unet))  # measured: identical outputs


def test_round_trip_peft_diffusers_peft(base, tmp_path: Path) -> None:
    """(d) peft -> diffusers -> peft: identical tensors, scales and updates (fp64)."""
    peft_unet = with_lora(base, seed=4, r=4, lora_alpha=8, target_modules=TARGETS, alpha_pattern={"to_q": 2})
    src = save_peft_folder(peft_unet, tmp_path / "peft")
    a = api.load_adapter(src)
    d = api.save_adapter(a, tmp_path / "lora.safetensors", to="diffusers")
    b = api.load_adapter(d)
    assert sorted(b.modules) == sorted(f"unet.{n}" for n in a.modules)  # the component is kept
    sub = dfmt.component_adapters(b)
    assert list(sub) == ["unet"]
    back_path = api.save_adapter(sub["unet"], tmp_path / "back", to="peft")
    back = api.load_adapter(back_path)
    assert sorted(back.modules) == sorted(a.modules)
    for name, m in a.modules.items():
        n = back.modules[name]
        assert torch.equal(n.down, m.down) and torch.equal(n.up, m.up)
        assert n.scale == m.scale and n.rank == m.rank and n.kind == m.kind
        assert torch.equal(delta64(n), delta64(m))


def test_alpha_tensors_give_the_scales_diffusers_gives(base, trained, tmp_path: Path) -> None:
    """``<component>.<module>.alpha`` tensors (Flux-style network alphas); a module without one gets the
    most common alpha, as diffusers' ``get_peft_kwargs`` does."""
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(trained).items()}
    alphas: dict[str, torch.Tensor] = {}
    for key in sd:
        if key.endswith(".lora_A.weight") and ".conv1." not in key:
            mod = key[: -len(".lora_A.weight")]
            alphas[f"{mod}.alpha"] = torch.tensor(6.0 if ".to_v" in mod else 2.0)
    path = tmp_path / "alphas.safetensors"
    save_file({**sd, **alphas}, path)
    a = load_adapter(path)
    unet = copy.deepcopy(base)
    unet.load_lora_adapter(
        sd, prefix="unet", network_alphas={k: float(v) for k, v in alphas.items()}, adapter_name="x"
    )
    for name, layer in lora_layers(unet).items():
        assert a.modules[f"unet.{name}"].scale == layer.scaling["x"], name


def test_alpha_tensor_that_contradicts_the_header_is_refused(saved: Path, tmp_path: Path) -> None:
    tensors = load_file(saved)
    with safe_open(saved, "pt") as f:
        meta = dict(f.metadata())
    name = next(k for k in tensors if k.endswith(".to_q.lora_A.weight"))[: -len(".lora_A.weight")]
    path = tmp_path / "bad.safetensors"
    save_file({**tensors, f"{name}.alpha": torch.tensor(99.0)}, path, metadata=meta)
    with pytest.raises(FormatError, match=rf"bad\.safetensors: tensor '{name}\.alpha' says alpha=99"):
        load_adapter(path)


def test_peft_files_are_not_taken_for_diffusers(tmp_path: Path) -> None:
    """PEFT keys (``base_model.model.``) stay PEFT; prefix-less keys beside an adapter_config.json (as
    transformers' PEFT integration saves them, e.g. GPT-2's ``transformer.h.0...``) are read as PEFT."""
    model = build_model("gpt2")
    ad = make_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    )
    sd = load_file(ad / "adapter_model.safetensors")
    assert not dfmt.detect(list(sd), {})
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    save_file(
        {k.removeprefix("base_model.model."): v for k, v in sd.items()}, bare / "adapter_model.safetensors"
    )
    a, b = load_adapter(ad), load_adapter(bare)
    assert b.format == "peft" and sorted(a.modules) == sorted(b.modules)
    assert all(b.modules[n].scale == 2.0 and b.modules[n].fan_in_fan_out for n in a.modules)


def _module(name: str, kind: str = "linear") -> LoraModule:
    g = torch.Generator().manual_seed(0)
    return LoraModule(name, kind, torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), alpha=2.0)


def test_writer_refuses_what_diffusers_cannot_load(tmp_path: Path) -> None:
    extra = Adapter(
        path=tmp_path / "a",
        format="peft",
        modules={"unet.mid_block.x": _module("unet.mid_block.x")},
        modules_to_save={"conv_out.weight": torch.zeros(2, 2)},
    )
    with pytest.raises(FormatError, match=r"tensor 'conv_out\.weight' is a full module copy"):
        api.save_adapter(extra, tmp_path / "x.safetensors", to="diffusers")
    unknown = Adapter(
        path=tmp_path / "b", format="peft", modules={"model.layers.0.q": _module("model.layers.0.q")}
    )
    with pytest.raises(
        FormatError, match=r"module 'model\.layers\.0\.q': cannot tell which pipeline component"
    ):
        api.save_adapter(unknown, tmp_path / "y.safetensors", to="diffusers")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_text_encoder_old_layout_round_trips_through_diffusers(tmp_path: Path) -> None:
    """An old text-encoder file (``to_q_lora.down``, ``lora_linear_layer``, ``text_model.`` names) and loractl's
    rewrite of it (with per-module alphas) load in diffusers' text-encoder loader with our scales and updates."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    )
    cfg.bos_token_id, cfg.eos_token_id = 0, 1
    text = tf.CLIPTextModel(cfg).eval()
    g = torch.Generator().manual_seed(5)
    pre = "text_encoder.text_model.encoder.layers.0"
    shapes = {
        f"{pre}.self_attn.to_q_lora": (16, 16),
        f"{pre}.self_attn.to_out_lora": (16, 16),
        f"{pre}.mlp.fc1.lora_linear_layer": (32, 16),
    }
    old: dict[str, torch.Tensor] = {}
    for mod, (out_f, in_f) in shapes.items():
        old[f"{mod}.down.weight"] = torch.randn(2, in_f, generator=g)
        old[f"{mod}.up.weight"] = torch.randn(out_f, 2, generator=g)
    save_file(old, tmp_path / "old.safetensors")
    a = load_adapter(tmp_path / "old.safetensors")
    names = sorted(a.modules)
    assert names == [f"{pre}.mlp.fc1", f"{pre}.self_attn.out_proj", f"{pre}.self_attn.q_proj"]
    a.modules[f"{pre}.self_attn.q_proj"].alpha = 3.0
    a.modules[f"{pre}.mlp.fc1"].alpha = 0.5
    out = api.save_adapter(a, tmp_path / "new.safetensors", to="diffusers")

    def loaded(path: Path) -> dict[str, LoraLayer]:
        te = copy.deepcopy(text)
        sd, alphas, metadata = SDLoader.lora_state_dict(path, return_lora_metadata=True)
        SDLoader.load_lora_into_text_encoder(sd, alphas, te, adapter_name="x", metadata=metadata)
        return {f"text_encoder.text_model.{n}": m for n, m in lora_layers(te).items()}

    for path in (tmp_path / "old.safetensors", out):
        layers = loaded(path)
        assert sorted(layers) == names
        for name, layer in layers.items():
            m = a.modules[name] if path == out else replace(a.modules[name], alpha=2.0)
            assert layer.scaling["x"] == m.scale, (path.name, name)
            assert torch.equal(layer.get_delta_weight("x"), delta_weight(m)), (path.name, name)
