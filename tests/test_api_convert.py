"""convert: the update s·B·A of every module is unchanged; --normalize and --pad-rank as documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, peft_merged, save_base

from loractl import api
from loractl.errors import UsageError
from loractl.ops.merge import delta_weight


def dense(m) -> torch.Tensor:
    return delta_weight(dataclasses.replace(m, down=m.down.double(), up=m.up.double()))


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, Path]:
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = make_adapter(
        model,
        tmp_path / "ad",
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    return base, ad


def test_normalize_and_pad_keep_every_update(adapter, tmp_path: Path) -> None:
    base, ad = adapter
    res = api.convert(ad, tmp_path / "n", to="peft", normalize=True, pad_rank=16)
    assert res.modules == 6
    a, n = api.load_adapter(ad), api.load_adapter(tmp_path / "n")
    for name, m in a.modules.items():
        got = n.modules[name]
        assert got.rank == 16 and got.scale == 1.0 and not got.rslora
        torch.testing.assert_close(dense(got), dense(m), rtol=1e-6, atol=1e-7)
    # no per-module patterns are needed any more: what runtimes that ignore them want
    import json

    cfg = json.loads((tmp_path / "n" / "adapter_config.json").read_text())
    assert (
        cfg["rank_pattern"] == {}
        and cfg["alpha_pattern"] == {}
        and cfg["r"] == 16
        and cfg["lora_alpha"] == 16
    )
    # PEFT merges the converted adapter to (nearly) the same model
    ref = peft_merged(base, [ad], torch.float32, "llama").state_dict()
    got = peft_merged(base, [tmp_path / "n"], torch.float32, "llama").state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)


def test_pad_only_keeps_factors_and_scales(adapter, tmp_path: Path) -> None:
    _, ad = adapter
    api.convert(ad, tmp_path / "p", to="peft", pad_rank=8)
    a, p = api.load_adapter(ad), api.load_adapter(tmp_path / "p")
    for name, m in a.modules.items():
        q = p.modules[name]
        assert q.rank == 8 and torch.equal(q.down[: m.rank], m.down) and not q.down[m.rank :].any()
        assert abs(q.scale - m.scale) <= 1e-12 * m.scale
        torch.testing.assert_close(dense(q), dense(m), rtol=1e-12, atol=0)


def test_dtype_conversion(adapter, tmp_path: Path) -> None:
    _, ad = adapter
    api.convert(ad, tmp_path / "h", to="peft", dtype="bf16")
    h = api.load_adapter(tmp_path / "h")
    assert {m.up.dtype for m in h.modules.values()} == {torch.bfloat16}


def test_pad_below_rank_is_refused(adapter, tmp_path: Path) -> None:
    _, ad = adapter
    with pytest.raises(UsageError, match="above --pad-rank 2"):
        api.convert(ad, tmp_path / "x", to="peft", pad_rank=2)
    with pytest.raises(UsageError, match="unknown --to"):
        api.convert(ad, tmp_path / "x", to="onnx")
    assert not (tmp_path / "x").exists()
