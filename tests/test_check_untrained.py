"""`check` on adapters trained by PEFT itself: a module that got no gradient is a warning, an
adapter whose every update is zero is an error, and `--strict` turns warnings into failures.

The case from the issue: a MiniLM (BERT) adapter on query, value and `pooler.dense`, trained with a
mean-pooling loss (as sentence-transformers does); the pooler is not in the loss, gets no gradient,
and its lora_B keeps PEFT's zero init. Here the same on a tiny BERT, trained for real with PEFT and
torch, and a fresh `get_peft_model` saved without training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, save_base
from safetensors.torch import load_file
from typer.testing import CliRunner

from loractl.checks import check
from loractl.cli.app import app

POOLER = "pooler.dense"


def _peft_model(model):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", POOLER])
    return peft.get_peft_model(copy.deepcopy(model), config)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("untrained")
    bert = build_model("bert")
    out = {"base": save_base(bert, root / "base")}

    trained = _peft_model(bert).train()
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        hidden = trained(input_ids=ids).last_hidden_state
        loss = hidden.mean(dim=1).pow(2).mean()  # mean pooling: the pooler is not in the loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained.save_pretrained(root / "trained")
    out["trained"] = root / "trained"

    _peft_model(bert).save_pretrained(root / "fresh")  # PEFT's init, never trained
    out["fresh"] = root / "fresh"
    return out


def _lora_b(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k}


def test_the_adapters_are_what_peft_made(adapters: dict[str, Path]) -> None:
    """The premise, from PEFT's own files: only the pooler's B is zero after training; all are fresh."""
    trained = _lora_b(adapters["trained"])
    zero = sorted(k for k, v in trained.items() if not v.any())
    assert zero == [f"base_model.model.{POOLER}.lora_B.weight"]
    assert len(trained) == 5  # query and value of 2 layers, and the pooler
    assert all(not v.any() for v in _lora_b(adapters["fresh"]).values())


def test_a_module_without_gradient_is_a_warning(adapters: dict[str, Path]) -> None:
    r = check(adapters["trained"], base=adapters["base"])
    assert r.ok, r.findings
    assert [(f.code, f.severity, f.module) for f in r.findings] == [("untrained-module", "warning", POOLER)]
    assert "lora_B is all zero" in r.findings[0].message and POOLER in r.findings[0].message


def test_strict_fails_on_the_warning(adapters: dict[str, Path]) -> None:
    r = check(adapters["trained"], base=adapters["base"], strict=True)
    assert not r.ok and [f.code for f in r.failures] == ["untrained-module"]


def test_an_adapter_whose_every_update_is_zero_is_an_error(adapters: dict[str, Path]) -> None:
    r = check(adapters["fresh"], base=adapters["base"])
    assert not r.ok
    # one error for the adapter, not a warning per module
    assert [(f.code, f.severity, f.module) for f in r.findings] == [("all-zero", "error", None)]
    assert "all 5 modules" in r.findings[0].message and "every update is zero" in r.findings[0].message


def test_cli_exit_codes_and_json(adapters: dict[str, Path]) -> None:
    def loractl(*args: object):
        res = CliRunner().invoke(app, ["check", *map(str, args)])
        return res.exit_code, res.stdout

    code, out = loractl(adapters["trained"], "--base", adapters["base"], "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["strict"] is False
    assert [f["code"] for f in doc["findings"]] == ["untrained-module"]
    code, out = loractl(adapters["trained"], "--base", adapters["base"], "--strict", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["strict"] is True
    code, out = loractl(adapters["trained"], "--strict")
    assert code == 1 and "FAILED" in out and "1 warning(s)" in out and "--strict" in out
    code, out = loractl(adapters["fresh"], "--json")
    doc = json.loads(out)
    assert code == 1 and [f["code"] for f in doc["findings"]] == ["all-zero"]
