"""loralib (microsoft/LoRA) state dicts, checked against loralib itself: its layers' own merge (``eval()``)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import read_st, same_bits
from safetensors.torch import save_file

from loractl import api
from loractl.adapter import Adapter, LoraModule
from loractl.errors import FormatError
from loractl.formats import DETECT_ORDER, ReadOptions, detect, load_adapter
from loractl.formats import diffusers as dfmt
from loractl.formats import loralib as lfmt
from loractl.formats import peft as pfmt
from loractl.ops.merge import delta_weight

lora = pytest.importorskip("loralib")

R, ALPHA = 4, 6  # scale 1.5: not a power of two, so folding it into B rounds


class Tiny(torch.nn.Module):
    """GPT-2-like: an embedding, a packed q,k,v ``c_attn`` (Conv1D layout), ``c_proj``, and a plain Linear."""

    def __init__(
        self, r: int = R, alpha: float = ALPHA, enable: tuple[bool, ...] = (True, False, True)
    ) -> None:
        super().__init__()
        self.wte = lora.Embedding(30, 16, r=r, lora_alpha=alpha)
        self.attn = torch.nn.Module()
        self.attn.c_attn = lora.MergedLinear(
            16, 48, r=r, lora_alpha=alpha, enable_lora=list(enable), fan_in_fan_out=True
        )
        self.attn.c_proj = lora.Linear(16, 16, r=r, lora_alpha=alpha, fan_in_fan_out=True)
        self.mlp = torch.nn.Module()
        self.mlp.up = lora.Linear(16, 40, r=r, lora_alpha=alpha)


def build(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(**kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.train()  # un-merged


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items() if "lora_" not in k}


def merged_by_loralib(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model)
    m.eval()  # loralib merges on eval(): weight += T(B @ A) * scaling (MergedLinear: merge_AB())
    return base_tensors(m)


def save_lora(model: torch.nn.Module, path: Path, bias: str = "none") -> Path:
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model, bias=bias).items()}, path)
    return path


def delta64(m: LoraModule) -> torch.Tensor:
    return delta_weight(replace(m, down=m.down.double(), up=m.up.double()))


@pytest.fixture
def model() -> Tiny:
    return build()


def test_updates_equal_loralibs_merge(model: Tiny, tmp_path: Path) -> None:
    """Each module's s·B·A (MergedLinear: block-diagonal B) equals loralib's merge, in fp64."""
    path = save_lora(model, tmp_path / "lora.safetensors")
    a = load_adapter(path, format="loralib", options=ReadOptions(rank=R, alpha=ALPHA))
    assert sorted(a.modules) == ["attn.c_attn", "attn.c_proj", "mlp.up", "wte"]
    assert a.modules["wte"].kind == "embedding"
    assert a.modules["attn.c_attn"].fan_in_fan_out and a.modules["attn.c_proj"].fan_in_fan_out
    assert not a.modules["mlp.up"].fan_in_fan_out
    assert all(m.scale == ALPHA / R for m in a.modules.values())
    assert a.modules["attn.c_attn"].rank == 2 * R  # k = 2 enabled slices of rank R
    m64 = copy.deepcopy(model).double()
    before = base_tensors(m64)
    after = merged_by_loralib(m64)
    worst = 0.0
    for name, m in a.modules.items():
        ref = after[f"{name}.weight"] - before[f"{name}.weight"]
        assert delta64(m).shape == ref.shape
        worst = max(worst, (delta64(m) - ref).abs().max().item())
    assert worst < 1e-12  # measured 2e-16 to 4e-16: fp64 rounding of (W + ΔW) - W
    # loralib's own packed update term, without the subtraction: exact
    c = m64.attn.c_attn
    assert torch.equal(delta64(a.modules["attn.c_attn"]), c.merge_AB() * c.scaling)


def test_merge_into_base_equals_loralibs_merged_weights(model: Tiny, tmp_path: Path) -> None:
    """``api.merge`` into the un-merged weights equals loralib's merged model (biases trained with
    ``bias='lora_only'`` replace the base's)."""
    save_file(base_tensors(model), tmp_path / "base.safetensors")
    with torch.no_grad():  # "training" moved the LoRA layers' biases
        model.attn.c_attn.bias.add_(1.0)
        model.mlp.up.bias.mul_(-2.0)
    path = save_lora(model, tmp_path / "lora.safetensors", bias="lora_only")
    a = api.load_adapter(path, format="loralib", options=ReadOptions(rank=R, alpha=ALPHA))
    assert sorted(a.modules_to_save) == ["attn.c_attn.bias", "attn.c_proj.bias", "mlp.up.bias"]
    api.merge(tmp_path / "base.safetensors", [a], tmp_path / "merged.safetensors", receipt=False)
    got = read_st(tmp_path / "merged.safetensors")
    ref = merged_by_loralib(model)
    assert sorted(got) == sorted(ref)
    for key in ("wte.weight", "attn.c_proj.weight", "mlp.up.weight", "attn.c_attn.bias", "mlp.up.bias"):
        assert same_bits(got[key], ref[key]), key  # the same torch ops as loralib: identical
    # MergedLinear: loralib sums over r with a grouped conv1d, loractl over r·k with zeros (matmul)
    diff = (got["attn.c_attn.weight"] - ref["attn.c_attn.weight"]).abs().max().item()
    assert diff <= 1e-6  # measured 0 (seeds 0-4); a BLAS may sum in another order: float32 ulps


def test_enable_lora_given_for_other_slices(tmp_path: Path) -> None:
    """A MergedLinear adapted on k and v: the default (q, v) would be wrong, ``enable_lora`` makes it exact."""
    model = build(seed=2, enable=(False, True, True))
    path = save_lora(model, tmp_path / "kv.safetensors")
    opts = ReadOptions(rank=R, alpha=ALPHA)
    opts.enable_lora = {"attn.c_attn": [False, True, True]}  # type: ignore[attr-defined]
    a = load_adapter(path, format="loralib", options=opts)
    c = copy.deepcopy(model).double().attn.c_attn
    assert torch.equal(delta64(a.modules["attn.c_attn"]), c.merge_AB() * c.scaling)
    assert a.config["enable_lora_assumed"] == []
    guessed = load_adapter(path, format="loralib", options=ReadOptions(rank=R, alpha=ALPHA))
    assert guessed.config["enable_lora_assumed"] == ["attn.c_attn"]
    assert not torch.equal(delta64(guessed.modules["attn.c_attn"]), c.merge_AB() * c.scaling)
    bad = ReadOptions()
    bad.enable_lora = [True, True, True]  # type: ignore[attr-defined]
    with pytest.raises(
        FormatError, match=r"module 'attn\.c_attn': lora_A holds 2 rank blocks but enable_lora"
    ):
        load_adapter(path, format="loralib", options=bad)


def test_rank_and_alpha_defaults(model: Tiny, tmp_path: Path) -> None:
    path = save_lora(model, tmp_path / "lora.safetensors")
    a = load_adapter(path, format="loralib")  # no alpha: alpha = r, scale 1 (documented choice)
    assert {m.scale for m in a.modules.values()} == {1.0}
    assert a.config["alpha_assumed"] is True
    with pytest.raises(
        FormatError,
        match=r"lora\.safetensors: module 'attn\.c_attn': tensor 'attn\.c_attn\.lora_B' \[32, 4\] has rank 4, but the rank given is 8",
    ):
        load_adapter(path, format="loralib", options=ReadOptions(rank=8))


def test_fan_in_fan_out_follows_the_base_config(model: Tiny, tmp_path: Path) -> None:
    path = save_lora(model, tmp_path / "lora.safetensors")
    a = load_adapter(path, format="loralib", options=ReadOptions(base_config={"model_type": "gpt_bigcode"}))
    assert not a.modules["attn.c_proj"].fan_in_fan_out


def test_conv_lora_is_refused_by_name(tmp_path: Path) -> None:
    conv = lora.Conv2d(4, 8, 3, r=2, lora_alpha=2)
    sd = {f"enc.{k}": v.contiguous() for k, v in lora.lora_state_dict(conv).items()}
    path = tmp_path / "conv.safetensors"
    save_file(sd, path)
    opts = ReadOptions(base_keys=["enc.conv.weight", "enc.conv.bias"])
    with pytest.raises(FormatError, match=r"conv\.safetensors: module 'enc' is a loralib ConvLoRA"):
        load_adapter(path, format="loralib", options=opts)


def test_writer_folds_the_scale_for_alpha_equal_r(model: Tiny, tmp_path: Path) -> None:
    """loractl's loralib file, loaded into loralib layers built with lora_alpha = r, merges to the same
    weights; read back by loractl without --alpha it has the same updates."""
    src = save_lora(model, tmp_path / "lora.safetensors")
    a = load_adapter(src, format="loralib", options=ReadOptions(rank=R, alpha=ALPHA))
    out = api.save_adapter(a, tmp_path / "out.safetensors", to="loralib", operation="convert")
    back = load_adapter(out, format="loralib")
    for name, m in a.modules.items():
        n = back.modules[name]
        assert n.scale == 1.0 and n.kind == m.kind and n.fan_in_fan_out == m.fan_in_fan_out
        assert torch.allclose(
            delta64(n), delta64(m), rtol=0, atol=1e-6
        )  # measured 1.1e-7 to 1.4e-7: B·1.5 rounded once
    # a loralib model with plain Linear layers (rank r·k for the packed one) and lora_alpha = r
    plain = torch.nn.Module()
    plain.wte = lora.Embedding(30, 16, r=R, lora_alpha=R)
    plain.attn = torch.nn.Module()
    plain.attn.c_attn = lora.Linear(16, 48, r=2 * R, lora_alpha=2 * R, fan_in_fan_out=True)
    plain.attn.c_proj = lora.Linear(16, 16, r=R, lora_alpha=R, fan_in_fan_out=True)
    plain.mlp = torch.nn.Module()
    plain.mlp.up = lora.Linear(16, 40, r=R, lora_alpha=R)
    plain.load_state_dict({**base_tensors(model), **read_st(out)})
    got, ref = merged_by_loralib(plain), merged_by_loralib(model)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= 2e-6  # measured 2.4e-7 to 7.2e-7: float32 rounding of the folded scale


def test_writer_refuses_what_loralib_cannot_hold(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    dora = LoraModule("layers.0.q_proj", "linear", a, b, alpha=2.0, magnitude=torch.ones(8))
    conv = LoraModule("conv_in", "conv", a.reshape(2, 8, 1, 1), b.reshape(8, 2, 1, 1), alpha=2.0)
    for m, why in ((dora, "is DoRA"), (conv, "is a conv LoRA")):
        ad = Adapter(path=tmp_path / "src", format="peft", modules={m.name: m})
        with pytest.raises(FormatError, match=rf"src: module '{m.name}' {why}"):
            api.save_adapter(ad, tmp_path / "out.safetensors", to="loralib")
        assert not (tmp_path / "out.safetensors").exists()
    full = Adapter(
        path=tmp_path / "src",
        format="peft",
        modules={"q": LoraModule("q", "linear", a, b, alpha=2.0)},
        modules_to_save={"lm_head.weight": torch.zeros(2, 2)},
    )
    with pytest.raises(FormatError, match=r"tensor 'lm_head\.weight' is a full module copy"):
        api.save_adapter(full, tmp_path / "out.safetensors", to="loralib")


def test_detection(model: Tiny) -> None:
    keys = list(lora.lora_state_dict(model, bias="all"))
    assert lfmt.detect(keys, {})
    assert not dfmt.detect(keys, {})
    peft_keys = ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"]
    assert not lfmt.detect(peft_keys, {})


@pytest.mark.xfail(
    DETECT_ORDER.index("peft") < DETECT_ORDER.index("loralib") and pfmt.detect(["q.lora_A"], {}),
    reason="PEFT's detector accepts bare .lora_A keys and runs first: loralib must come before peft in DETECT_ORDER",
    strict=True,
)
def test_auto_detection_picks_loralib(model: Tiny, tmp_path: Path) -> None:
    path = save_lora(model, tmp_path / "lora.safetensors")
    assert detect(list(lora.lora_state_dict(model)), {}, path) == "loralib"
    assert load_adapter(path).format == "loralib"
