"""Every command's --json output against docs/json.md: each documented key is there, each top-level
key is documented, and the document is alone on stdout with schema_version 1."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loractl.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"


def documented() -> dict[str, list[str]]:
    """Section title -> the key paths of its table."""
    out: dict[str, list[str]] = {}
    section = None
    for line in (ROOT / "docs" / "json.md").read_text().splitlines():
        m = re.match(r"^## `(.+)`\s*$", line)
        if m:
            section = m[1]
            out[section] = []
            continue
        m = re.match(r"^\| `([^`]+)` \|", line)
        if m and section is not None:
            out[section].append(m[1])
    return out


def present(doc: Any, path: str) -> bool:
    """Is ``path`` (``a[].b.c``) in ``doc``? A null or empty list on the way stops the walk (true)."""
    nodes = [doc]
    for part in path.split("."):
        is_list = part.endswith("[]")
        key = part[:-2] if is_list else part
        nxt = []
        for n in nodes:
            if n is None:
                continue
            if not isinstance(n, dict) or key not in n:
                return False
            v = n[key]
            if is_list:
                if not isinstance(v, list):
                    return False
                nxt.extend(v)
            else:
                nxt.append(v)
        nodes = nxt
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("json")
    for name in ("tiny-llama", "tiny-llama-lora", "recipe.toml"):
        src = EX / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, w / name)
    r = CliRunner().invoke(app, ["truncate", str(w / "tiny-llama-lora"), "-o", str(w / "t"), "--rank", "4"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, ["merge", str(w / "tiny-llama"), str(w / "t"), "-o", str(w / "m"), "-q"])
    assert r.exit_code == 0, r.stderr
    return w


def invocations(w: Path) -> dict[str, list[str]]:
    lora, base, t = str(w / "tiny-llama-lora"), str(w / "tiny-llama"), str(w / "t")
    return {
        "inspect": ["inspect", lora, "--base", base],
        "inspect --spectrum": ["inspect", lora, "--spectrum"],
        "merge": ["merge", base, lora, "-o", str(w / "jm")],
        "unmerge": ["unmerge", str(w / "m"), t, "-o", str(w / "ju")],
        "truncate": ["truncate", lora, "-o", str(w / "jt"), "--rank", "2"],
        "combine": ["combine", lora, t, "-o", str(w / "jc")],
        "similarity": ["similarity", lora, t, "--i", "2", "--j", "2", "--grid"],
        "similarity --base": ["similarity", t, "--base", base, "--module", "*layers.0.self_attn.q_proj"],
        "convert": ["convert", t, "-o", str(w / "jv"), "--to", "peft", "--pad-rank", "8"],
        "check": ["check", t, "--base", base, "--target", "lorax"],
        # merged at weight 1, checked at weight 2: exit 1, with findings, so their keys are checked too
        "verify": ["verify", str(w / "m"), t, "--base", base, "--weight", "2"],
        "extract": ["extract", base, str(w / "m"), "-o", str(w / "je"), "--rank", "8"],
        "run": ["run", str(w / "recipe.toml"), "--set", f"out={w / 'recipe-out'}"],
    }


SECTIONS = documented()
#: sections whose invocation fails its check on purpose (exit 1, after printing the document)
EXIT_CODES = {"verify": 1}


def test_every_command_has_a_section() -> None:
    commands = {
        "inspect",
        "merge",
        "unmerge",
        "truncate",
        "combine",
        "similarity",
        "convert",
        "check",
        "verify",
        "run",
        "extract",
    }
    assert commands <= {s.split()[0] for s in SECTIONS}
    assert all(SECTIONS[s] for s in SECTIONS), "a section without a key table"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_json_matches_the_documented_keys(work: Path, section: str) -> None:
    argv = invocations(work)[section]
    r = CliRunner().invoke(app, [*argv, "--json"])
    assert r.exit_code == EXIT_CODES.get(section, 0), r.stderr
    doc = json.loads(r.stdout)  # exactly one document: json.loads fails on trailing output
    assert doc["schema_version"] == 1 and doc["command"] == argv[0]
    keys = SECTIONS[section]
    missing = [k for k in keys if not present(doc, k)]
    assert not missing, f"documented but absent: {missing}"
    top = {k.split(".")[0].removesuffix("[]") for k in keys}
    undocumented = set(doc) - top - {"schema_version", "command"}
    assert not undocumented, f"in the output but not in docs/json.md: {undocumented}"
