"""truncate, combine, similarity and inspect --spectrum through the CLI: bad input is exit 2 with a
one-line reason and nothing written; --plot draws real PNGs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, build_model, make_adapter
from typer.testing import CliRunner

from loractl.cli.app import app


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("alg")
    shutil.copytree(EXAMPLES / "tiny-llama-lora", w / "lora")
    other = build_model("llama", torch.float32)  # hidden 32: another base than the example's
    make_adapter(other, w / "other", r=4, lora_alpha=8, target_modules=["q_proj"])
    return w


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "args, words",
    [
        (["truncate", "{lora}", "-o", "{out}", "--rank", "9"], "larger than the adapter's largest rank 8"),
        (["truncate", "{lora}", "-o", "{out}", "--rank", "0"], "at least 1"),
        (["truncate", "{lora}", "-o", "{out}", "--energy", "1.5"], "outside (0, 1]"),
        (["truncate", "{lora}", "-o", "{out}", "--sv-cumulative", "0"], "outside (0, 1]"),
        (["truncate", "{lora}", "-o", "{out}", "--rank", "4", "--nested"], "not a DyLoRA adapter"),
        (["combine", "{lora}", "{other}", "-o", "{out}"], "different base"),
        (["combine", "{lora}", "{lora}", "-o", "{out}", "--weight", "1"], "--weight"),
        (["combine", "{lora}", "{lora}", "-o", "{out}", "--method", "ties"], "--density"),
        (["similarity", "{lora}", "{other}"], "different dimensions"),
        (["similarity", "{lora}", "{lora}", "--module", "*nothing*"], "no module in common"),
        (["similarity", "{lora}", "{lora}", "--i", "9"], "within the ranks"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(work: Path, args: list[str], words: str) -> None:
    out = work / "out"
    argv = [a.format(lora=work / "lora", other=work / "other", out=out) for a in args]
    r = run(*argv)
    assert r.exit_code == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error:") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and not any("loractl-tmp" in p.name for p in work.iterdir())


def test_plots_are_real_pngs(work: Path) -> None:
    pytest.importorskip("matplotlib")
    r = run("truncate", str(work / "lora"), "-o", str(work / "r4"), "--rank", "4", "-q")
    assert r.exit_code == 0, r.stderr
    png = b"\x89PNG\r\n\x1a\n"
    r = run("inspect", str(work / "lora"), "--spectrum", "--plot", str(work / "s.png"), "-q")
    assert r.exit_code == 0, r.stderr
    assert (work / "s.png").read_bytes()[:8] == png
    r = run(
        "similarity",
        str(work / "lora"),
        str(work / "r4"),
        "--grid",
        "--plot",
        str(work / "phi.png"),
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["grid"]) == 8 and len(doc["grid"][0]) == 4  # mean φ(i, j) for i ≤ 8, j ≤ 4
    assert (work / "phi.png").read_bytes()[:8] == png
