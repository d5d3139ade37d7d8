"""Reading PEFT adapters in the layouts PEFT and its users write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, read_st, same_bits, save_base
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.errors import FormatError, InputError
from loractl.formats import ReadOptions, load_adapter
from loractl.formats.peft import pattern_key


@pytest.fixture
def peft_dir(tmp_path: Path) -> tuple[Path, Path]:
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, ad


def _merged(base: Path, ad: Path, out: Path) -> dict[str, torch.Tensor]:
    api.merge(base, [ad], out, receipt=False)
    return read_st(out)


def test_keys_without_prefix_and_with_adapter_name_read_the_same(peft_dir, tmp_path: Path) -> None:
    base, ad = peft_dir
    ref = _merged(base, ad, tmp_path / "ref")
    sd = load_file(ad / "adapter_model.safetensors")
    for variant, rename in {
        "bare": lambda k: k.removeprefix("base_model.model."),
        "named": lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ),
    }.items():
        d = tmp_path / variant
        d.mkdir()
        shutil.copy(ad / "adapter_config.json", d)
        save_file({rename(k): v for k, v in sd.items()}, d / "adapter_model.safetensors")
        a = load_adapter(d)
        assert sorted(a.modules) == sorted(load_adapter(ad).modules)
        got = _merged(base, d, tmp_path / f"m-{variant}")
        assert all(same_bits(got[k], ref[k]) for k in ref)


def test_single_file_with_sibling_config_and_lone_file(peft_dir, tmp_path: Path) -> None:
    base, ad = peft_dir
    a = load_adapter(ad / "adapter_model.safetensors")  # the config beside it is used
    assert {m.scale for m in a.modules.values()} == {2.0}
    lone = tmp_path / "lone.safetensors"
    shutil.copy(ad / "adapter_model.safetensors", lone)
    with pytest.raises(InputError, match="lora_alpha.*unknown") as e:  # no config anywhere: no scale
        load_adapter(lone)
    assert "--alpha" in (e.value.cli_hint or "") and "alpha=A" in (e.value.hint or "")
    b = load_adapter(lone, options=ReadOptions(alpha=8))  # unless the user states alpha (r = 4)
    assert {m.scale for m in b.modules.values()} == {2.0}
    # a PEFT config in the header (as diffusers writes it) is honoured
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 12})}
    save_file(load_file(lone), tmp_path / "withmeta.safetensors", metadata=meta)
    c = load_adapter(tmp_path / "withmeta.safetensors")
    assert {m.scale for m in c.modules.values()} == {3.0}


def test_config_rank_mismatch_is_an_error(peft_dir) -> None:
    _, ad = peft_dir
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="rank 4 but the config says r=8"):
        load_adapter(ad)


def test_unknown_and_lycoris_and_kohya_layouts_are_refused(tmp_path: Path) -> None:
    t = torch.zeros(2, 2)
    cases = {
        "unknown.safetensors": ({"foo.bar": t}, "unknown adapter layout"),
        "loha.safetensors": ({"lora_unet_x.hada_w1_a": t, "lora_unet_x.hada_w1_b": t.clone()}, "LyCORIS"),
        "kohya.safetensors": (
            {"lora_unet_x.lora_down.weight": t, "lora_unet_x.alpha": torch.tensor(1.0)},
            "kohya",
        ),
    }
    for name, (tensors, msg) in cases.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(FormatError, match=msg) as e:
            load_adapter(tmp_path / name)
        assert name in str(e.value)


def test_incomplete_module_is_named(peft_dir, tmp_path: Path) -> None:
    _, ad = peft_dir
    sd = load_file(ad / "adapter_model.safetensors")
    victim = next(k for k in sd if k.endswith("lora_B.weight"))
    del sd[victim]
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(FormatError, match="has no lora_B.weight"):
        load_adapter(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "patterns, name, expected",
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
        (
            ["layers.0.self_attn.q_proj", "q_proj"],
            "model.layers.0.self_attn.q_proj",
            "layers.0.self_attn.q_proj",
        ),
        (
            ["q_proj", "layers.0.self_attn.q_proj"],
            "model.layers.0.self_attn.q_proj",
            "q_proj",
        ),  # dict order wins
        (["proj"], "model.layers.0.self_attn.q_proj", None),  # whole components only
        ([r"layers\.1\..*"], "model.layers.1.mlp.up_proj", r"layers\.1\..*"),
    ],
)
def test_pattern_key_is_peft_get_pattern_key(patterns, name, expected) -> None:
    from peft.utils.other import get_pattern_key

    assert pattern_key(patterns, name) == expected
    # PEFT returns the key itself when nothing matches
    assert get_pattern_key(patterns, name) == (expected if expected is not None else name)


def test_diffusers_model_folder_base(tmp_path: Path) -> None:
    """A diffusers component folder (diffusion_pytorch_model.safetensors + config.json) is a base."""
    import copy

    import peft

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = torch.nn.Linear(8, 8)
            self.proj_in = torch.nn.Conv2d(4, 8, 1)

    torch.manual_seed(0)
    net = Block()
    folder = tmp_path / "unet"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        folder / "diffusion_pytorch_model.safetensors",
    )
    (folder / "config.json").write_text('{"_class_name": "Block"}')
    ad = make_adapter(net, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["to_q", "proj_in"])
    api.merge(folder, [ad], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "loractl.receipt",
    ]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), ad).merge_and_unload().state_dict()
    ours = read_st(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert all(same_bits(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={r"layers\.1\..*": 3},
        ),
        dict(r=4, lora_alpha=6, use_rslora=True, use_dora=True, target_modules=["q_proj", "embed_tokens"]),
    ],
    ids=["plain", "patterns", "rslora-dora-embedding"],
)
def test_peft_writer_round_trip_loads_in_peft(tmp_path: Path, lora) -> None:
    """loractl's PEFT writer: PEFT loads the re-written adapter and merges it to the same bits."""
    from conftest import peft_merged

    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = make_adapter(model, tmp_path / "ad", **lora)
    a = api.load_adapter(ad)
    api.save_adapter(a, tmp_path / "re", to="peft", operation="test")
    b = api.load_adapter(tmp_path / "re")
    assert {n: (m.rank, m.scale) for n, m in a.modules.items()} == {
        n: (m.rank, m.scale) for n, m in b.modules.items()
    }
    ref = peft_merged(base, [ad], torch.float32, "llama").state_dict()
    again = peft_merged(base, [tmp_path / "re"], torch.float32, "llama").state_dict()
    assert all(same_bits(ref[k], again[k]) for k in ref)
    # single-file output with the config in the header
    api.save_adapter(a, tmp_path / "one.safetensors", to="peft")
    c = api.load_adapter(tmp_path / "one.safetensors")
    assert {n: m.scale for n, m in c.modules.items()} == {n: m.scale for n, m in a.modules.items()}
