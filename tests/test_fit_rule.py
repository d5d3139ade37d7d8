"""One rule for "does this adapter fit this base?" (``plan.match``): ``inspect --base`` reports complete
coverage exactly when ``merge`` (without ``--allow-partial``) accepts the adapter, and exactly when
``check --base`` reports no fit error (``unmatched-module``, ``shape-mismatch``).

Each pair is a real base (transformers, saved) and a real PEFT adapter; the misfits are the ways an
adapter goes wrong in practice: a ``lora_bias`` adapter on a base layer without bias, a base that
lacks one targeted weight, an adapter for another model, an adapter for another size of the same
model, and a saved module (``modules_to_save``) of the wrong shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_adapter, save_base
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.errors import LoractlError

FIT_CODES = {"unmatched-module", "shape-mismatch"}


def _drop_tensor(base: Path, name: str) -> None:
    """The base without one tensor (its file rewritten, its index updated)."""
    index_path = base / "model.safetensors.index.json"
    files = sorted(base.glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        if name in tensors:
            del tensors[name]
            save_file(tensors, f, metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"].pop(name, None)
        index_path.write_text(json.dumps(index))


def _pair(kind: str, tmp: Path) -> tuple[Path, Path]:
    """(base, adapter) for one case."""
    if kind == "llama-fits":
        model = build_model("llama")
        return save_base(model, tmp / "base"), make_adapter(
            model, tmp / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
    if kind == "gpt2-fan-in-fan-out-fits":
        model = build_model("gpt2")
        return save_base(model, tmp / "base"), make_adapter(
            model, tmp / "ad", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
        )
    if kind == "lora-bias-on-a-layer-without-bias":
        with_bias = build_model("llama", attention_bias=True)
        without = build_model("llama", attention_bias=False)
        return save_base(without, tmp / "base"), make_adapter(
            with_bias, tmp / "ad", r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj"]
        )
    if kind == "base-missing-a-targeted-weight":
        model = build_model("llama")
        base = save_base(model, tmp / "base")
        _drop_tensor(base, "model.layers.1.self_attn.v_proj.weight")
        return base, make_adapter(model, tmp / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if kind == "adapter-for-another-model":
        return save_base(build_model("llama"), tmp / "base"), make_adapter(
            build_model("bert"), tmp / "ad", r=4, lora_alpha=8, target_modules=["query", "value"]
        )
    if kind == "adapter-for-another-size":
        return save_base(build_model("llama"), tmp / "base"), make_adapter(
            build_model("llama", hidden_size=48, intermediate_size=64),
            tmp / "ad",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
        )
    if kind == "saved-module-of-another-shape":
        base = save_base(build_model("llama"), tmp / "base")
        ad = make_adapter(
            build_model("llama", vocab_size=128),
            tmp / "ad",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            modules_to_save=["lm_head"],
        )
        return base, ad
    raise ValueError(kind)


CASES = {
    "llama-fits": True,
    "gpt2-fan-in-fan-out-fits": True,
    "lora-bias-on-a-layer-without-bias": False,
    "base-missing-a-targeted-weight": False,
    "adapter-for-another-model": False,
    "adapter-for-another-size": False,
    "saved-module-of-another-shape": False,
}


@pytest.mark.parametrize("kind", list(CASES))
def test_coverage_merge_and_check_agree(tmp_path: Path, kind: str) -> None:
    base, adapter = _pair(kind, tmp_path)
    coverage = api.inspect(adapter, base=base).adapters[0].base.coverage  # type: ignore[union-attr]
    try:
        api.merge(base, adapter, tmp_path / "merged", receipt=False)
        merged = True
    except LoractlError:
        merged = False
    findings = api.check(adapter, base=base).findings
    fit_errors = [f for f in findings if f.code in FIT_CODES]
    assert coverage.complete is merged is (not fit_errors) is CASES[kind], (kind, coverage, fit_errors)
    if not CASES[kind]:  # each side names what does not fit
        assert coverage.unmatched or coverage.shape_mismatch or coverage.incompatible
        assert all(f.module for f in fit_errors)
        assert not (tmp_path / "merged").exists()
    else:
        assert coverage.matched == len(api.load_adapter(adapter).modules)
        assert torch.is_tensor(load_file(sorted((tmp_path / "merged").glob("*.safetensors"))[0]).popitem()[1])
