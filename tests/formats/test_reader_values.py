"""Values every reader checks whatever the format: PEFT config types and ranges (as PEFT's LoraConfig
reads them), alpha tensors of kohya and diffusers files, factor dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loractl.errors import FormatError
from loractl.formats import load_adapter
from loractl.formats.peft import check_config


def _peft(tmp_path: Path, cfg: dict) -> Path:
    ad = tmp_path / "ad"
    ad.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "base_model.model.m.q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
            "base_model.model.m.q_proj.lora_B.weight": torch.randn(8, 4, generator=g),
        },
        str(ad / "adapter_model.safetensors"),
    )
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


@pytest.mark.parametrize(
    "cfg",
    [
        {"r": 4, "lora_alpha": 8, "use_rslora": None, "fan_in_fan_out": None, "modules_to_save": None},
        {"r": 4, "lora_alpha": 2.5, "target_modules": "(.*\\.)?q_proj", "exclude_modules": ["x"]},
        {"r": 4, "lora_alpha": -8, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 0.5}},
        {
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": None,
            "alpha_pattern": None,
            "init_lora_weights": "gaussian",
        },
    ],
    ids=["nulls", "regex-target", "patterns-negative-alpha", "null-patterns"],
)
def test_configs_peft_accepts_are_accepted(tmp_path: Path, cfg: dict) -> None:
    from peft import LoraConfig

    LoraConfig(**cfg)  # the peer accepts it
    a = load_adapter(_peft(tmp_path, cfg))
    (m,) = a.modules.values()
    alpha = cfg.get("alpha_pattern", {}) and cfg["alpha_pattern"].get("q_proj") or cfg["lora_alpha"]
    assert m.alpha == alpha and m.rank == 4


@pytest.mark.parametrize(
    "key, value",
    [
        ("r", -4), ("r", 4.0), ("r", "4"), ("r", True), ("lora_alpha", float("inf")), ("lora_alpha", "8"),
        ("lora_alpha", None), ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 2.5}),
        ("alpha_pattern", {"q_proj": float("nan")}), ("use_dora", "false"), ("lora_bias", 0),
        ("modules_to_save", "lm_head"), ("target_parameters", [3]), ("init_lora_weights", 1.5),
    ],
)  # fmt: skip
def test_values_of_the_wrong_type_or_range_name_the_key(tmp_path: Path, key: str, value) -> None:
    with pytest.raises(FormatError) as e:
        load_adapter(_peft(tmp_path, {"r": 4, "lora_alpha": 8, key: value}))
    assert e.value.message.startswith(str(tmp_path / "ad" / "adapter_config.json"))
    assert f"{key}" in e.value.message


def test_check_config_returns_the_config() -> None:
    cfg = {"r": 8, "lora_alpha": 16}
    assert check_config(cfg, "x") is cfg


def _diffusers_file(path: Path, alpha: torch.Tensor) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "unet.down.attn.to_q.lora_A.weight": torch.randn(4, 8, generator=g),
            "unet.down.attn.to_q.lora_B.weight": torch.randn(8, 4, generator=g),
            "unet.down.attn.to_q.alpha": alpha,
        },
        str(path),
    )
    return path


def _kohya_file(path: Path, alpha: torch.Tensor) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "lora_unet_down_attn_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
            "lora_unet_down_attn_to_q.lora_up.weight": torch.randn(8, 4, generator=g),
            "lora_unet_down_attn_to_q.alpha": alpha,
        },
        str(path),
    )
    return path


@pytest.mark.parametrize("make", [_diffusers_file, _kohya_file], ids=["diffusers", "kohya"])
@pytest.mark.parametrize(
    "alpha",
    [torch.tensor(float("nan")), torch.tensor(float("-inf")), torch.tensor(True), torch.tensor([1.0, 2.0])],
    ids=["nan", "-inf", "bool", "two values"],
)
def test_alpha_tensors_must_be_one_finite_number(tmp_path: Path, make, alpha: torch.Tensor) -> None:
    f = make(tmp_path / "x.safetensors", alpha)
    with pytest.raises(FormatError) as e:
        load_adapter(f)
    assert str(f) in e.value.message and ".alpha" in e.value.message


@pytest.mark.parametrize("make", [_diffusers_file, _kohya_file], ids=["diffusers", "kohya"])
def test_integer_alpha_tensors_are_read(tmp_path: Path, make) -> None:
    """sd-scripts stores ``torch.tensor(alpha)``: an int64 tensor when alpha was an int."""
    a = load_adapter(make(tmp_path / "x.safetensors", torch.tensor(2)))
    (m,) = a.modules.values()
    assert m.alpha == 2.0


def test_kohya_alpha_zero_means_rank(tmp_path: Path) -> None:
    """sd-scripts' LoRAModule: ``alpha = lora_dim if alpha is None or alpha == 0``."""
    a = load_adapter(_kohya_file(tmp_path / "x.safetensors", torch.tensor(0.0)))
    (m,) = a.modules.values()
    assert m.alpha == 4.0 and m.scale == 1.0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_factors_must_be_floating_point(tmp_path: Path, dtype) -> None:
    f = tmp_path / "x.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.ones(4, 8, dtype=dtype),
            "lora_unet_x.lora_up.weight": torch.ones(8, 4),
        },
        str(f),
    )
    with pytest.raises(FormatError, match="lora_A .*not a floating-point tensor") as e:
        load_adapter(f)
    assert str(f) in e.value.message
