"""``loractl verify``: exit 0 for a correct merge, 1 with every finding (table or --json), 2 for bad
input (one line naming the file and module, nothing written, inputs untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

FINDING_KEYS = {"code", "module", "message", "tensor", "ratio", "outside", "elements"}


@pytest.fixture
def merged(cli, inputs) -> Path:
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "-q")
    assert r.code == 0, r.stderr
    return out


def _unmerge_one(merged: Path, base: Path, dst: Path, key: str) -> Path:
    """A copy of ``merged`` whose tensor ``key`` is the base's again (a module left unmerged)."""
    shutil.copytree(merged, dst)
    (f,) = [f for f in dst.glob("*.safetensors") if key in load_file(f)]
    (b,) = [b for b in base.glob("*.safetensors") if key in load_file(b)]
    t = load_file(f)
    t[key] = load_file(b)[key]
    save_file(t, f, metadata={"format": "pt"})
    return dst


def test_a_correct_merge_exits_0(cli, inputs, merged) -> None:
    r = cli("verify", merged, inputs.adapter, "--base", inputs.base)
    assert r.code == 0, r.stderr
    assert r.stdout.startswith(f"ok: {merged}: 21 tensors checked against {inputs.base} and 1 adapter(s)")
    assert (
        "14 changed with a correct merge's exact bits, 0 changed within the rounding bound, 7 equal to the base"
        in r.stdout
    )
    r = cli("verify", merged, inputs.adapter, "--base", inputs.base, "-q")
    assert (r.code, r.stdout, r.stderr) == (0, "", "")


def test_json_of_a_correct_merge(cli, inputs, merged) -> None:
    r = cli("verify", merged, inputs.adapter, "--base", inputs.base, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["schema_version"], doc["command"], doc["ok"], doc["findings"]) == (1, "verify", True, [])
    assert doc["tensors"] == {
        "tensors": 21, "changed": 14, "exact": 14, "within_bound": 0, "untouched": 7, "failed": 0,
        "orders": {"base": 7, "peft": 14},
    }  # fmt: skip
    assert (
        doc["adapters"][0]["weight"] == 1.0
        and doc["merged"] == str(merged)
        and doc["base"] == str(inputs.base)
    )


def test_findings_exit_1_with_the_module_named(cli, inputs, merged) -> None:
    key = "model.layers.0.self_attn.k_proj.weight"
    bad = _unmerge_one(merged, inputs.base, inputs.work / "bad", key)
    r = cli("verify", bad, inputs.adapter, "--base", inputs.base, "--json")
    assert r.code == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    (f,) = doc["findings"]
    assert set(f) == FINDING_KEYS
    assert (f["code"], f["module"], f["tensor"]) == ("not-merged", "model.layers.0.self_attn.k_proj", key)
    r = cli("verify", bad, inputs.adapter, "--base", inputs.base)
    assert r.code == 1
    row = next(line for line in r.stdout.splitlines() if "not-merged" in line)
    assert "model.layers.0.self_attn.k_proj " in row and f"tensor {key!r} equals the base" in row
    assert r.stdout.splitlines()[-1].startswith(f"FAILED (1 finding(s)): {bad}: 21 tensors checked")


def test_wrong_weight_is_a_wrong_scale_with_its_ratio(cli, inputs, merged) -> None:
    r = cli("verify", merged, inputs.adapter, "--base", inputs.base, "--weight", "0.5", "--json")
    assert r.code == 1
    doc = json.loads(r.stdout)
    assert len(doc["findings"]) == 14 and {f["code"] for f in doc["findings"]} == {"wrong-scale"}
    assert all(abs(f["ratio"] - 2.0) < 0.01 for f in doc["findings"])


@pytest.mark.parametrize("width", [60, 240])
def test_findings_table_keeps_module_names_whole(width: int) -> None:
    from rich.console import Console

    from loractl.cli.verify import findings_table
    from loractl.verifying import Finding

    module = "model.layers.11.self_attn.q_proj"
    message = "tensor 'model.layers.11.self_attn.q_proj.weight' holds 2× the expected update; " * 3
    findings = [
        Finding("wrong-scale", module, message, module + ".weight", ratio=2.0),
        Finding("extra", None, "x", "x"),
    ]
    con = Console(width=width, record=True, soft_wrap=True, color_system=None)
    con.print(findings_table(findings, width))
    lines = con.export_text().splitlines()
    assert any(module in line for line in lines), lines
    assert all(len(line.rstrip()) <= width for line in lines), lines
    assert "…" not in con.export_text()
    if width == 240:  # a table: code, module and the start of the message on one line
        assert any(
            line.lstrip().startswith("wrong-scale") and module in line and "tensor" in line for line in lines
        )


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_adapter_for_another_base_is_exit_2(cli, inputs, merged, tools, bad_input, tmp_path) -> None:
    from conftest import build_model, make_adapter

    other = make_adapter(
        build_model("llama", hidden_size=48, num_attention_heads=4), tmp_path / "other", r=2, lora_alpha=4,
        target_modules=["v_proj"],
    )  # fmt: skip
    snap = tools.Snapshot([inputs.root, merged, other])
    r = cli("verify", merged, other, "--base", inputs.base)
    bad_input(
        r,
        output=inputs.work / "none",
        snapshot=snap,
        names=[other, "model.layers.0.self_attn.v_proj", "[24, 48]", "is [32, 64]"],
    )


def test_missing_merged_model_and_weight_count_are_exit_2(cli, inputs, merged, tools, bad_input) -> None:
    snap = tools.Snapshot([inputs.root, merged])
    nowhere = inputs.work / "nowhere"
    r = cli("verify", nowhere, inputs.adapter, "--base", inputs.base)
    bad_input(r, output=nowhere, snapshot=snap, names=[nowhere, "no such file"])
    r = cli("verify", merged, inputs.adapter, "--base", inputs.base, "-w", "1", "-w", "2")
    bad_input(r, output=inputs.work / "none", snapshot=snap, names=["2 --weight values for 1 adapters"])
    r = cli("verify", merged, inputs.adapter)
    assert r.code == 2 and "--base" in r.stderr and "Traceback" not in r.stderr
