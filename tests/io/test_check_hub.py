"""`check ORG/NAME` and `check ... --base ORG/NAME` resolve Hub references as every other command
does, with the real huggingface_hub client against the local fake Hub of hub_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_model, make_adapter, save_base
from typer.testing import CliRunner

from loractl.checks import check
from loractl.cli.app import app

from .hub_server import FakeHub, fake_hub, set_offline  # noqa: F401 (fake_hub is a fixture)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check-hub")
    model = build_model("llama")
    return {
        "base": save_base(model, root / "base"),
        "adapter": make_adapter(
            model, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),
    }


@pytest.fixture
def repos(fake_hub: FakeHub, local: dict[str, Path]) -> FakeHub:  # noqa: F811
    fake_hub.add_folder("org/base", local["base"])
    sha = fake_hub.add_folder("org/adapter", local["adapter"])
    fake_hub.tag("org/adapter", "v1", sha)
    return fake_hub


def _summary(r) -> list[tuple[str, str, str | None]]:
    return [(f.code, f.severity, f.module) for f in r.findings]


def test_check_resolves_hub_adapter_and_base(repos: FakeHub, local: dict[str, Path]) -> None:
    by_hub = check("org/adapter", base="org/base", target="vllm", max_rank=2)
    by_path = check(local["adapter"], base=local["base"], target="vllm", max_rank=2)
    assert by_hub.adapter == "org/adapter" and not by_hub.ok
    assert _summary(by_hub) == _summary(by_path) and "integrity" not in {f.code for f in by_hub.findings}
    # fixes name the reference as given, so they can be run as written
    fixes = {f.fix for f in by_hub.findings if f.code == "rank-too-large"}
    assert fixes == {"loractl truncate org/adapter -o OUT --rank 2"}
    assert repos.downloads("org/adapter") and repos.downloads("org/base")


def test_check_cli_with_hub_references(repos: FakeHub) -> None:
    res = CliRunner().invoke(
        app, ["check", "org/adapter@v1", "--base", "org/base", "--target", "vllm", "--json"]
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and doc["adapter"] == "org/adapter@v1"
    assert [f["code"] for f in doc["findings"]] == ["vllm-max-lora-rank"]


@pytest.mark.parametrize(
    "args, names",
    [
        (["org/nope"], "org/nope"),
        (["org/adapter", "--base", "org/nobase"], "org/nobase"),
        (["org/adapter@v9"], "v9"),
    ],
)
def test_check_with_a_missing_hub_reference_is_exit_2(repos: FakeHub, args: list[str], names: str) -> None:
    res = CliRunner().invoke(app, ["check", *args, "--json"])
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and names in lines[0] and len(lines) <= 2, res.stderr
    assert "Traceback" not in res.stderr


def test_check_offline_uses_the_cache(repos: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check("org/adapter", base="org/base").ok  # downloads once
    set_offline(monkeypatch)
    repos.clear()
    assert check("org/adapter", base="org/base").ok
    assert repos.requests == []
