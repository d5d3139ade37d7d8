"""GGUF through the commands: convert with --base, then inspect (and --spectrum) it with --base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loractl.cli.app import app

pytest.importorskip("gguf")
EX = Path(__file__).resolve().parents[2] / "examples"


def test_convert_then_inspect_gguf_with_base(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "a.gguf"
    r = runner.invoke(
        app,
        [
            "convert",
            str(EX / "tiny-llama-lora"),
            "-o",
            str(out),
            "--to",
            "gguf",
            "--base",
            str(EX / "tiny-llama"),
        ],
    )
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["inspect", str(out), "--base", str(EX / "tiny-llama"), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)["adapters"][0]
    assert doc["format"] == "gguf" and doc["modules"] == 14 and doc["base"]["coverage"]["matched"] == 14
    r = runner.invoke(app, ["inspect", str(out), "--spectrum", "--base", str(EX / "tiny-llama"), "--json"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["inspect", str(out)])  # q/k need the base's head counts
    assert r.exit_code == 2 and "--base" in r.stderr
