"""kohya / sd-scripts LoRA files, against the peers that write and read them.

Peers: diffusers (loads kohya files into a UNet, fuses them, converts LDM checkpoints), LyCORIS
(writes kohya-layout LoRA/LoCon files), PEFT (the adapters converted), and sd-scripts' hash
function (reimplemented below from its source: it is not an installable package).

Every model is a tiny SD 1.x-shaped UNet / CLIP text encoder built from a config with seeded weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from io import BytesIO
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.adapter import Adapter, LoraModule
from loractl.errors import FormatError, InputError
from loractl.formats import ReadOptions, WriteOptions, kohya, load_adapter
from loractl.formats import sd_names as sn
from loractl.ops.merge import delta_weight

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET_CFG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    sample_size=8,
    attention_head_dim=8,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1"]


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return _seeded(diffusers.UNet2DConditionModel(**UNET_CFG), 0)


@pytest.fixture(scope="module")
def clip():
    import transformers as tf

    cfg = tf.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=99,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return _seeded(tf.CLIPTextModel(cfg), 1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kohya")


@pytest.fixture(scope="module")
def unet_dir(unet, work: Path) -> Path:
    unet.save_pretrained(work / "unet")
    return work / "unet"


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def _peft_unet(unet, config, seed: int = 3):
    """``unet`` with a PEFT LoRA injected (as diffusers and PEFT do), every LoRA factor seeded non-zero."""
    m = copy.deepcopy(unet)
    peft.inject_adapter_in_model(config, m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def _save_peft(model, config, path: Path) -> Path:
    from peft.utils import get_peft_model_state_dict

    path.mkdir()
    save_file(get_peft_model_state_dict(model), path / "adapter_model.safetensors")
    config.save_pretrained(path)
    return path


def _lora_config(**over):
    kw = dict(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"to_k": 2},
        alpha_pattern={"proj_in": 3, "conv1": 1},
    )
    kw.update(over)
    return peft.LoraConfig(**kw)


def _diffusers_unet_with(unet, kohya_file: Path):
    """diffusers' own kohya loading: ``lora_state_dict`` (kohya → diffusers keys, network alphas) and
    ``load_lora_into_unet``, as ``StableDiffusionPipeline.load_lora_weights`` does (no pipeline needed)."""
    from diffusers import StableDiffusionPipeline

    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(kohya_file))
    m = copy.deepcopy(unet)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=m)
    return m.eval()


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Weights of a model with (fused) PEFT layers under the base model's own names."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _fp64(m: LoraModule) -> LoraModule:
    return dataclasses.replace(m, down=m.down.double(), up=m.up.double())


# ------------------------------------------------------------------------------------------------
# (1) a kohya file written from a PEFT adapter loads in diffusers; (a) merge = diffusers' fuse_lora
# ------------------------------------------------------------------------------------------------
def test_peft_adapter_as_kohya_loads_in_diffusers_and_merges_like_fuse_lora(unet, unet_dir, work) -> None:
    cfg = _lora_config()
    original = _peft_unet(unet, cfg)
    ad = _save_peft(original, cfg, work / "peft1")
    out = api.save_adapter(load_adapter(ad), work / "from_peft.safetensors", to="kohya")
    keys = load_file(out)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert keys["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert float(keys["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 3.0

    loaded = _diffusers_unet_with(unet, out)
    n_lora = sum(1 for n, _ in loaded.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(load_adapter(ad).modules)
    x, t, ehs = _inputs()
    with torch.no_grad():
        ref = original(x, t, ehs).sample
        got = loaded(x, t, ehs).sample
    # same factors, same scales, same PEFT layers: measured max |diff| = 0 (bit-identical outputs)
    assert torch.equal(got, ref), float((got - ref).abs().max())

    # (a) loractl merge of the kohya file into the diffusers UNet folder = diffusers' fuse_lora
    merged_dir = work / "merged_unet"
    api.merge(unet_dir, [out], merged_dir, receipt=False)
    ours = load_file(merged_dir / "diffusion_pytorch_model.safetensors")
    loaded.fuse_lora()
    theirs = _base_weights(loaded)
    assert set(ours) == set(theirs)
    changed = [k for k in ours if not torch.equal(ours[k], unet.state_dict()[k])]
    assert len(changed) == len(load_adapter(ad).modules)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [
        k for k in ours if not torch.equal(ours[k], theirs[k])
    ]


# ------------------------------------------------------------------------------------------------
# (2) kohya files written by LyCORIS; (b) merging into a single-file LDM checkpoint
# ------------------------------------------------------------------------------------------------
def _lycoris_file(unet, clip, path: Path, **kw) -> tuple[Path, object]:
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    # LyCORIS's "full" preset adapts time_embedding twice (a duplicated-name assertion): name the targets
    preset = path.with_suffix(".toml")
    preset.write_text(
        'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", '
        '"Upsample2D"]\nunet_target_name = ["conv_in", "conv_out"]\n'
        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n'
    )
    torch.manual_seed(11)
    te, un = copy.deepcopy(clip), copy.deepcopy(unet)
    net = lycoris_kohya.create_network(
        1.0,
        4,
        2.0,
        None,
        te,
        un,
        algo="lora",
        conv_dim=3,
        conv_alpha=1.5,
        preset=str(preset),
        **kw,
    )
    net.apply_to(te, un, apply_text_encoder=True, apply_unet=True)  # as sd-scripts' train_network does
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path, net


def _real_names(unet, clip) -> dict[str, str]:
    """kohya name -> the real module it adapts, from the models themselves."""
    out: dict[str, str] = {}
    for prefix, comp, model in (("lora_unet_", "unet", unet), ("lora_te_", "text_encoder", clip)):
        for n, _ in model.named_modules():
            if n:
                assert prefix + sn.flatten(n) not in out, n  # the tiny models have no truly ambiguous names
                out[prefix + sn.flatten(n)] = f"{comp}.{n}"
    return out


def test_lycoris_lora_locon_file_reads_to_the_same_updates(unet, clip, work) -> None:
    path, net = _lycoris_file(unet, clip, work / "lycoris.safetensors")
    ad = load_adapter(path)
    assert ad.format == "kohya"
    loras = list(net.unet_loras) + list(net.text_encoder_loras)
    assert {lora.lora_name for lora in loras} == set(ad.config[kohya.NAMES_KEY].values())
    real = _real_names(unet, clip)
    by_kohya = {v: k for k, v in ad.config[kohya.NAMES_KEY].items()}
    kinds = set()
    worst = 0.0
    for lora in loras:
        name = by_kohya[lora.lora_name]
        assert name == real[lora.lora_name]  # dots placed where the real module has them
        m = ad.modules[name]
        kinds.add((m.kind, m.down.dim() == 4 and m.down.shape[-1] == 3))
        peer = copy.deepcopy(lora).double()
        want = peer.get_diff_weight(shape=tuple(m.weight_shape))[0]
        got = delta_weight(_fp64(m))
        worst = max(worst, float((got - want.detach()).abs().max()))
    # fp64 updates of LyCORIS (reshape-matmul for conv) vs PEFT's conv formula: measured max |diff| 0.0
    assert worst < 1e-12, worst
    assert ("conv", True) in kinds and ("linear", False) in kinds and ("conv", False) in kinds


def test_lycoris_rslora_alpha_is_already_folded(unet, clip, work) -> None:
    """LyCORIS stores alpha·sqrt(r) for rs_lora (alpha / r_stored = alpha / sqrt(r)): the kohya rule."""
    path, net = _lycoris_file(unet, clip, work / "lycoris_rs.safetensors", rs_lora=True)
    ad = load_adapter(path)
    by_kohya = {v: k for k, v in ad.config[kohya.NAMES_KEY].items()}
    for lora in list(net.unet_loras)[:5]:
        m = ad.modules[by_kohya[lora.lora_name]]
        assert m.scale == pytest.approx(lora.scale, rel=1e-7)  # alpha went through float32


def _ldm_unet_checkpoint(sd: dict[str, torch.Tensor], layers: int, blocks: int) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> original LDM layout, generalising diffusers'
    scripts/convert_diffusers_to_original_stable_diffusion.py (``unet_conversion_map*``, written for
    4 blocks × 2 layers) to any block count; diffusers has no importable function for this direction.
    The result is checked against diffusers' ``convert_ldm_unet_checkpoint`` by the caller."""
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ]
    resnet = [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ]
    per = layers + 1
    up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"input_blocks.{per * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{per * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per):
            pairs.append((f"output_blocks.{per * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{per * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{per * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append(
                (
                    f"output_blocks.{per * i + layers}.{2 if i in up_attn else 1}.",
                    f"up_blocks.{i}.upsamplers.0.",
                )
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    out = {}
    for k, v in sd.items():
        new = k
        for ldm, hf in pairs:
            if k.startswith(hf):
                new = ldm + k[len(hf) :]
                if ".resnets." in hf:
                    for a, b in resnet:
                        new = new.replace(b, a)
                break
        else:
            raise AssertionError(f"no LDM name for {k}")
        out[sn.LDM_UNET_PREFIX + new] = v
    return out


def test_kohya_merge_into_single_file_ldm_checkpoint_equals_diffusers_layout(
    unet, clip, unet_dir, work
) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path, _ = _lycoris_file(unet, clip, work / "lycoris_b.safetensors")
    usd = unet.state_dict()
    ldm = _ldm_unet_checkpoint(usd, UNET_CFG["layers_per_block"], len(UNET_CFG["block_out_channels"]))
    back = convert_ldm_unet_checkpoint(ldm, unet.config)  # the peer checks the layout
    assert set(back) == set(usd) and all(torch.equal(back[k], usd[k]) for k in usd)
    # SD 1.x single files name the text encoder as transformers 4 did (".text_model." included);
    # transformers 5, which LyCORIS ran on here, drops that level: the reader bridges the two
    te_root = "cond_stage_model.transformer."
    single = {**ldm, **{te_root + "text_model." + k: v for k, v in clip.state_dict().items()}}
    save_file(single, work / "sd.safetensors")
    clip.save_pretrained(work / "te")

    # (a) the diffusers layout, one component at a time (the other component's modules are unmatched)
    api.merge(unet_dir, [path], work / "m_unet", receipt=False, allow_partial=True)
    api.merge(work / "te", [path], work / "m_te", receipt=False, allow_partial=True)
    m_unet = load_file(work / "m_unet" / "diffusion_pytorch_model.safetensors")
    m_te = load_file(work / "m_te" / "model.safetensors")
    # (b) the single file: every module matched, named by the checkpoint's own paths
    res = api.merge(work / "sd.safetensors", [path], work / "m_sd.safetensors", receipt=False)
    assert res.unmatched == []
    ad = load_adapter(path, options=ReadOptions(base_keys=list(single)))
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q" in ad.modules
    assert te_root + "text_model.encoder.layers.0.self_attn.q_proj" in ad.modules
    m_sd = load_file(work / "m_sd.safetensors")
    mapped = convert_ldm_unet_checkpoint(m_sd, unet.config)
    assert set(mapped) == set(m_unet)
    assert all(torch.equal(mapped[k], m_unet[k]) for k in m_unet)
    assert all(torch.equal(m_sd[te_root + "text_model." + k], v) for k, v in m_te.items())
    assert sum(not torch.equal(mapped[k], usd[k]) for k in usd) == len(
        [n for n in ad.modules if n.startswith("model.")]
    )


def test_sdxl_style_ldm_names_resolve_against_a_diffusers_unet(unet, work) -> None:
    """sd-scripts names SDXL modules after its LDM-layout UNet; diffusers remaps them with
    ``_maybe_map_sgm_blocks_to_diffusers``. With a diffusers base, loractl finds the same modules."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    keys = list(unet.state_dict())
    to_ldm = {d: ldm for ldm, d in sn.diffusers_unet_map(keys).items()}
    sd = {}
    for d in (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.1.proj_out",
    ):
        k = "lora_unet_" + sn.flatten(to_ldm[d])
        sd[f"{k}.lora_down.weight"] = torch.ones(2, 32) if "to_q" in d else torch.ones(2, 32, 1, 1)
        sd[f"{k}.lora_up.weight"] = torch.ones(32, 2) if "to_q" in d else torch.ones(32, 2, 1, 1)
    save_file(sd, work / "sgm.safetensors")
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), unet.config)
    conv, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in conv.items()})
    theirs = {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")}
    ours = set(load_adapter(work / "sgm.safetensors", options=ReadOptions(base_keys=keys)).modules)
    assert ours == theirs


# ------------------------------------------------------------------------------------------------
# (3) round trips, alpha rules, metadata
# ------------------------------------------------------------------------------------------------
def test_peft_kohya_peft_round_trip_is_lossless(unet, work) -> None:
    cfg = _lora_config()
    ad_path = _save_peft(_peft_unet(unet, cfg, seed=4), cfg, work / "peft3")
    a = load_adapter(ad_path)
    k = api.save_adapter(a, work / "rt.safetensors", to="kohya")
    b = load_adapter(k)
    p = api.save_adapter(b, work / "rt_peft", to="peft")
    c = load_adapter(p)
    for name, m in a.modules.items():
        for other in (b.modules["unet." + name], c.modules["unet." + name]):
            assert torch.equal(other.down, m.down) and torch.equal(other.up, m.up)
            assert other.scale == m.scale and other.kind == m.kind
            assert torch.equal(delta_weight(_fp64(other)), delta_weight(_fp64(m)))


def test_rslora_is_folded_into_alpha_exactly(unet, work) -> None:
    cfg = _lora_config(use_rslora=True, rank_pattern={"to_k": 3})
    a = load_adapter(_save_peft(_peft_unet(unet, cfg, seed=6), cfg, work / "peft_rs"))
    assert a.rslora
    b = load_adapter(api.save_adapter(a, work / "rs.safetensors", to="kohya"))
    assert not b.rslora
    for name, m in a.modules.items():
        n = b.modules["unet." + name]
        assert n.scale == m.scale  # alpha' = s·r, nudged so that alpha' / r == s in float64
        assert n.alpha == pytest.approx(m.alpha * math.sqrt(m.rank))


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.floats(min_value=1e-3, max_value=1e4, allow_nan=False),
    rank=st.integers(min_value=1, max_value=512),
)
def test_alpha_for_scale_gives_the_scale_back(alpha: float, rank: int) -> None:
    scale = alpha / math.sqrt(rank)
    folded = kohya.alpha_for_scale(scale, rank)
    # division by rank skips some doubles (about 10% of random cases): then within one ulp
    assert abs(folded / rank - scale) <= math.ulp(scale)
    if rank & (rank - 1) == 0:  # a power of two: always exact
        assert folded / rank == scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alpha_tensor_dtype_follows_factors_unless_inexact(dtype: torch.dtype, tmp_path: Path) -> None:
    mods = {
        "unet.a": LoraModule(
            "unet.a", "linear", torch.ones(2, 3, dtype=dtype), torch.ones(3, 2, dtype=dtype), 4.0
        ),
        "unet.b": LoraModule(
            "unet.b", "linear", torch.ones(2, 3, dtype=dtype), torch.ones(3, 2, dtype=dtype), 0.1
        ),
    }
    kohya.write(Adapter(tmp_path, "peft", mods), tmp_path / "x.safetensors", WriteOptions())
    sd = load_file(tmp_path / "x.safetensors")
    assert sd["lora_unet_a.alpha"].dtype == dtype and sd["lora_unet_a.alpha"].dim() == 0
    assert float(sd["lora_unet_b.alpha"]) == 0.1  # 0.1 is not a float32 or half: stored wider, exact
    assert load_adapter(tmp_path / "x.safetensors").modules["unet.b"].scale == 0.1 / 2


def test_missing_or_zero_alpha_means_alpha_is_rank(tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd = {
        f"{name}.lora_down.weight": torch.ones(4, 32, 1, 1),
        f"{name}.lora_up.weight": torch.ones(32, 4, 1, 1),
    }
    save_file(sd, tmp_path / "noalpha.safetensors")
    m = load_adapter(tmp_path / "noalpha.safetensors").modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert (m.alpha, m.scale, m.kind) == (4.0, 1.0, "conv")
    save_file({**sd, f"{name}.alpha": torch.tensor(0.0)}, tmp_path / "zero.safetensors")
    assert load_adapter(tmp_path / "zero.safetensors").modules[m.name].scale == 1.0


def test_kohya_metadata_is_kept_and_hashes_follow_the_tensors(tmp_path: Path) -> None:
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    g = torch.Generator().manual_seed(0)
    sd = {
        f"{name}.lora_down.weight": torch.randn(4, 32, generator=g).half(),
        f"{name}.lora_up.weight": torch.randn(32, 4, generator=g).half(),
        f"{name}.alpha": torch.tensor(2.0).half(),
    }
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.title": "tiny",
        "modelspec.hash_sha256": "0xabc",
        "sshs_model_hash": "stale",
    }
    save_file(sd, tmp_path / "in.safetensors", meta)
    a = load_adapter(tmp_path / "in.safetensors")
    assert list(a.modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    api.save_adapter(a, tmp_path / "same.safetensors", to="kohya")
    with safe_open(tmp_path / "same.safetensors", "pt") as f:
        out = f.metadata()
        assert sorted(f.keys()) == sorted(sd)
    for k in (
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "modelspec.title",
    ):
        assert out[k] == meta[k]
    assert out["modelspec.hash_sha256"] == "0xabc"  # tensors unchanged: the trainer's hash still holds
    assert out["sshs_model_hash"] != "stale" and out["loractl.operation"] == "save"
    m = a.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    a.modules[m.name] = dataclasses.replace(m, down=m.down[:2], up=m.up[:, :2], alpha=1.0)
    api.save_adapter(a, tmp_path / "changed.safetensors", to="kohya")
    with safe_open(tmp_path / "changed.safetensors", "pt") as f:
        out2 = f.metadata()
    assert "modelspec.hash_sha256" not in out2  # would be stale
    assert (out2["ss_network_dim"], out2["ss_network_alpha"]) == ("2", "1.0")
    assert out2["sshs_model_hash"] != out["sshs_model_hash"]


# ------------------------------------------------------------------------------------------------
# (6) sshs hashes = sd-scripts' own function
# ------------------------------------------------------------------------------------------------
def _sd_scripts_precalculate_safetensors_hashes(tensors, metadata):
    """Verbatim logic of kohya-ss/sd-scripts library/train_util.py (commit 48d368fa, 2026-02):
    ``precalculate_safetensors_hashes``, ``addnet_hash_safetensors``, ``addnet_hash_legacy``.
    sd-scripts is not an installable package, so it is copied here rather than imported."""
    import safetensors.torch

    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))

    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        h.update(chunk)
    model_hash = h.hexdigest()

    m = hashlib.sha256()
    b.seek(0x100000)
    m.update(b.read(0x10000))
    return model_hash, m.hexdigest()[0:8]


@pytest.mark.parametrize("width", [32, 96 * 1024])  # below and above the legacy hash's 1 MiB offset
def test_sshs_hashes_equal_sd_scripts(width: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(width)
    mods = {
        f"unet.m{i}": LoraModule(
            f"unet.m{i}",
            "linear",
            torch.randn(2, width, generator=g),
            torch.randn(8, 2, generator=g),
            1.0 + i,
        )
        for i in range(3)
    }
    ad = Adapter(tmp_path, "kohya", mods, metadata={"ss_network_module": "networks.lora", "ss_x": "1"})
    kohya.write(ad, tmp_path / "h.safetensors", WriteOptions(metadata={"loractl.operation": "test"}))
    with safe_open(tmp_path / "h.safetensors", "pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "h.safetensors")
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _sd_scripts_precalculate_safetensors_hashes(
        tensors, meta
    )
    if width > 32:
        assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    # and A1111's additional-networks, hashing the file itself, gets the same model hash
    raw = (tmp_path / "h.safetensors").read_bytes()
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest() == meta["sshs_model_hash"]


# ------------------------------------------------------------------------------------------------
# (5) ambiguous names with a base; errors
# ------------------------------------------------------------------------------------------------
def test_ambiguous_underscore_names_with_a_base_exit_2_listing_candidates(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loractl.cli.app import app

    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {"a.b_c.weight": torch.ones(3, 3), "a_b.c.weight": torch.ones(3, 3)}, base / "model.safetensors"
    )
    save_file(
        {
            "lora_unet_a_b_c.lora_down.weight": torch.ones(1, 3),
            "lora_unet_a_b_c.lora_up.weight": torch.ones(3, 1),
        },
        tmp_path / "amb.safetensors",
    )
    with pytest.raises(InputError, match=r"matches several base modules: a\.b_c, a_b\.c") as e:
        api.merge(base, [tmp_path / "amb.safetensors"], tmp_path / "out")
    assert e.value.exit_code == 2
    res = CliRunner().invoke(
        app, ["merge", str(base), str(tmp_path / "amb.safetensors"), "-o", str(tmp_path / "o2")]
    )
    assert res.exit_code == 2
    assert "lora_unet_a_b_c" in res.output and "a.b_c, a_b.c" in res.output
    assert not (tmp_path / "o2").exists()
    # without a base, the known spellings decide; with an unambiguous base the base decides
    assert list(load_adapter(tmp_path / "amb.safetensors").modules) == ["unet.a.b.c"]
    only = load_adapter(tmp_path / "amb.safetensors", options=ReadOptions(base_keys=["x.a_b.c.weight"]))
    assert list(only.modules) == ["x.a_b.c"]  # named by the base module it adapts


def test_fused_openclip_qkv_in_a_single_file_is_refused_by_name(tmp_path: Path) -> None:
    root = "conditioner.embedders.1.model."
    base_keys = [
        root + "transformer.resblocks.0.attn.in_proj_weight",
        root + "transformer.resblocks.0.mlp.c_fc.weight",
    ]
    for mod, ok in (("mlp_fc1", True), ("self_attn_q_proj", False)):
        name = f"lora_te2_text_model_encoder_layers_0_{mod}"
        save_file(
            {f"{name}.lora_down.weight": torch.ones(1, 3), f"{name}.lora_up.weight": torch.ones(3, 1)},
            tmp_path / f"{mod}.safetensors",
        )
        opts = ReadOptions(base_keys=base_keys)
        if ok:
            mods = load_adapter(tmp_path / f"{mod}.safetensors", options=opts).modules
            assert list(mods) == [root + "transformer.resblocks.0.mlp.c_fc"]
        else:
            with pytest.raises(InputError, match="fused tensor"):
                load_adapter(tmp_path / f"{mod}.safetensors", options=opts)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {"lora_unet_x.lora_down.weight": torch.ones(2, 3)},
            "kohya module 'lora_unet_x' has no lora_up.weight",
        ),
        (
            {
                "lora_unet_x.lora_down.weight": torch.ones(2, 3),
                "lora_unet_x.lora_up.weight": torch.ones(3, 4),
            },
            "do not have the same rank",
        ),
        (
            {
                "lora_unet_x.lora_down.weight": torch.ones(2, 3),
                "lora_unet_x.lora_up.weight": torch.ones(3, 2),
                "lora_unet_x.alpha": torch.ones(2),
            },
            "not a scalar",
        ),
        (
            {
                "lora_unet_x.lora_down.weight": torch.ones(2, 3, 3, 3),
                "lora_unet_x.lora_up.weight": torch.ones(3, 2, 1, 1),
                "lora_unet_x.lora_mid.weight": torch.ones(2, 2, 3, 3),
            },
            "Tucker",
        ),
        (
            {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.foo": torch.ones(1)},
            "lora_unet_x.foo",
        ),
    ],
)
def test_broken_files_are_named(tensors: dict, message: str, tmp_path: Path) -> None:
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(FormatError, match=message) as e:
        load_adapter(tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(e.value)


def test_what_kohya_cannot_hold_is_refused(tmp_path: Path) -> None:
    emb = LoraModule("text_encoder.emb", "embedding", torch.ones(2, 10), torch.ones(4, 2), 2.0)
    with pytest.raises(FormatError, match="embedding"):
        kohya.write(Adapter(tmp_path, "peft", {"e": emb}), tmp_path / "e.safetensors", WriteOptions())
    lin = LoraModule("unet.a", "linear", torch.ones(2, 3), torch.ones(3, 2), 2.0, magnitude=torch.ones(3))
    with pytest.raises(FormatError, match="DoRA"):
        kohya.write(Adapter(tmp_path, "peft", {"a": lin}), tmp_path / "d.safetensors", WriteOptions())
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "d.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# DyLoRA
# ------------------------------------------------------------------------------------------------
def test_dylora_reads_as_max_rank_lora_and_exposes_its_unit(tmp_path: Path) -> None:
    name = "lora_unet_mid_block_attentions_0_proj_in"
    sd = {
        f"{name}.lora_down.weight": torch.ones(8, 64, 1, 1),
        f"{name}.lora_up.weight": torch.ones(64, 8, 1, 1),
        f"{name}.alpha": torch.tensor(4.0),
    }
    meta = {
        "ss_network_module": "networks.dylora",
        "ss_network_dim": "8",
        "ss_network_args": json.dumps({"unit": "4"}),
    }
    save_file(sd, tmp_path / "dy.safetensors", meta)
    a = load_adapter(tmp_path / "dy.safetensors")
    m = a.modules["unet.mid_block.attentions.0.proj_in"]
    assert (a.kind, kohya.dylora_unit(a), m.rank, m.scale) == ("DyLoRA", 4, 8, 0.5)
    assert a.metadata["ss_network_args"] == meta["ss_network_args"]
    save_file(sd, tmp_path / "dy1.safetensors", {"ss_network_module": "networks.dylora"})
    assert kohya.dylora_unit(load_adapter(tmp_path / "dy1.safetensors")) == 1  # sd-scripts' default unit
    save_file(sd, tmp_path / "plain.safetensors", {"ss_network_module": "networks.lora"})
    assert kohya.dylora_unit(load_adapter(tmp_path / "plain.safetensors")) is None


def test_text_encoder_names_are_written_as_sd_scripts_does(clip, work) -> None:
    """transformers 5 drops CLIPTextModel's ``text_model.`` level; sd-scripts' names (and A1111's and
    ComfyUI's loaders) have it: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``."""
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"])
    m = copy.deepcopy(clip)
    peft.inject_adapter_in_model(cfg, m)
    a = load_adapter(_save_peft(m, cfg, work / "peft_te"))
    assert "encoder.layers.0.self_attn.q_proj" in a.modules
    out = work / "te.safetensors"
    kohya.write(a, out, WriteOptions(base_config={"model_type": "clip_text_model"}))
    keys = load_file(out)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    prefixed = dataclasses.replace(a, modules={"text_encoder_2." + k: v for k, v in a.modules.items()})
    kohya.write(prefixed, work / "te2.safetensors", WriteOptions())
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in load_file(work / "te2.safetensors")
    # and back, against the transformers 5 base, to the same base modules
    back = load_adapter(out, options=ReadOptions(base_keys=list(clip.state_dict())))
    assert set(back.modules) == set(a.modules)
