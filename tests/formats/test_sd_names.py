"""Stable Diffusion module names: kohya flat names and diffusers ↔ LDM UNet names, against diffusers itself.

Models are built on the meta device (names only, no memory), from diffusers' and transformers' configs.
"""

from __future__ import annotations

import pytest
import torch

from loractl.formats import sd_names as sn

diffusers = pytest.importorskip("diffusers")
from accelerate import init_empty_weights  # noqa: E402

TINY_SD1 = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    sample_size=8,
    attention_head_dim=8,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SD15: dict = {}  # UNet2DConditionModel's defaults are SD 1.x's
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


def _meta_unet(cfg: dict):
    with init_empty_weights():
        return diffusers.UNet2DConditionModel(**cfg)


def _lora_targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("cfg", [TINY_SD1, SD15, SDXL], ids=["tiny-sd1", "sd15", "sdxl"])
def test_ldm_unet_map_agrees_with_diffusers_convert_ldm_unet_checkpoint(cfg: dict) -> None:
    """Label each tensor of an LDM checkpoint built with our map by its diffusers key; diffusers'
    convert_ldm_unet_checkpoint must bring every label back to the key it came from."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _meta_unet(cfg)
    keys = list(unet.state_dict())
    to_ldm = {d: ldm for ldm, d in sn.diffusers_unet_map(keys).items()}
    ldm_ckpt = {}
    for i, k in enumerate(keys):
        mod, leaf = k.rsplit(".", 1)
        ldm_mod = to_ldm.get(mod) or sn.diffusers_to_ldm_unet(mod, cfg.get("layers_per_block", 2), set())
        assert ldm_mod is not None, k  # norms without .weight-less siblings are covered too
        ldm_ckpt[f"{sn.LDM_UNET_PREFIX}{ldm_mod}.{leaf}"] = torch.tensor(i)
    back = convert_ldm_unet_checkpoint(ldm_ckpt, unet.config)
    assert set(back) == set(keys)
    assert all(int(back[k]) == i for i, k in enumerate(keys))
    # and the map the kohya reader uses, from the LDM keys alone, is the inverse
    mapping = sn.ldm_unet_map(ldm_ckpt)
    assert mapping == {d: sn.LDM_UNET_PREFIX + ldm for d, ldm in to_ldm.items()}
    assert sn.ldm_layers_per_block(k[len(sn.LDM_UNET_PREFIX) :] for k in ldm_ckpt) == cfg.get(
        "layers_per_block", 2
    )


def test_split_flat_gives_back_diffusers_kohya_conversion_for_the_sd15_unet() -> None:
    """diffusers' own kohya conversion (lora_conversion_utils + convert_unet_state_dict_to_peft) is the peer."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    names = _lora_targets(_meta_unet(SD15))
    sd = {}
    for n in names:
        k = "lora_unet_" + sn.flatten(n)
        sd[f"{k}.lora_down.weight"] = torch.zeros(1)
        sd[f"{k}.lora_up.weight"] = torch.zeros(1)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    theirs = {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")}
    ours = {sn.split_flat(sn.flatten(n)) for n in names}
    assert ours == theirs == set(names)


def test_split_flat_round_trips_real_module_names() -> None:
    """Every module name of the models kohya LoRAs target comes back from its flattening."""
    import transformers as tf

    with init_empty_weights():
        models = {
            "sdxl-unet": diffusers.UNet2DConditionModel(**SDXL),
            "clip": tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(num_hidden_layers=2)),
            "t5": tf.T5EncoderModel(tf.T5Config(num_layers=2, feed_forward_proj="gated-gelu")),
            "sd3": diffusers.SD3Transformer2DModel(num_layers=2),
            "flux": diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1),
        }
    for label, model in models.items():
        bad = [n for n in _lora_targets(model) if sn.split_flat(sn.flatten(n)) != n]
        assert not bad, (label, bad[:5])
    # sd-scripts' SDXL names are its LDM-layout UNet's
    ldm = sn.diffusers_unet_map(models["sdxl-unet"].state_dict())
    assert all(sn.split_flat(sn.flatten(n)) == n for n in ldm)


def test_flat_index_finds_every_split_and_reports_all_candidates() -> None:
    idx = sn.FlatIndex(["model.a.b_c", "model.a_b.c", "model.x.y"])
    assert [d for d, _ in idx.candidates("a_b_c")] == ["a.b_c", "a_b.c"]
    assert idx.candidates("x_y") == [("x.y", "model.x.y")]
    assert idx.candidates("model_x_y") == [("model.x.y", "model.x.y")]
    assert idx.candidates("nothing") == []


def test_clip_to_openclip_maps_unfused_modules_only() -> None:
    assert sn.clip_to_openclip("text_model.encoder.layers.3.mlp.fc1") == "transformer.resblocks.3.mlp.c_fc"
    assert sn.clip_to_openclip("text_model.encoder.layers.3.mlp.fc2") == "transformer.resblocks.3.mlp.c_proj"
    assert (
        sn.clip_to_openclip("text_model.encoder.layers.0.self_attn.out_proj")
        == "transformer.resblocks.0.attn.out_proj"
    )
    assert sn.clip_to_openclip("text_model.encoder.layers.0.self_attn.q_proj") is None


def test_split_prefix() -> None:
    assert sn.split_prefix("lora_te1_text_model_x") == ("lora_te1_", "text_encoder", "text_model_x")
    assert sn.split_prefix("lora_te_text_model_x") == ("lora_te_", "text_encoder", "text_model_x")
    assert sn.split_prefix("lora_transformer_x_embedder") == (
        "lora_transformer_",
        "transformer",
        "x_embedder",
    )
    assert sn.split_prefix("lora_foo_x") is None
