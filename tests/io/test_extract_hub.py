"""``loractl extract`` with both models given as Hub references (org/name[@revision]), resolved by the
real huggingface_hub client against the local fake Hub of hub_server.py."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_st, same_bits

from loractl import api

from .hub_server import FakeHub, running

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract_oracle import make_tuned_pair  # noqa: E402


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with running(tmp_path / "hf", monkeypatch) as h:
        yield h


def test_extract_from_hub_references_equals_the_local_extraction(hub: FakeHub, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loractl.cli.app import app

    pair = make_tuned_pair(tmp_path / "local", "norms", rank=4)
    hub.add_folder("org/base", pair.base_dir)
    old = hub.add_folder("org/tuned", pair.base_dir)  # a first commit equal to the base
    hub.tag("org/tuned", "v0", old)
    hub.add_folder("org/tuned", pair.tuned_dir)
    api.extract("org/base", "org/tuned@main", tmp_path / "hub", rank=4)
    api.extract(pair.base_dir, pair.tuned_dir, tmp_path / "local-out", rank=4)
    got, want = read_st(tmp_path / "hub"), read_st(tmp_path / "local-out")
    assert got.keys() == want.keys() and all(same_bits(got[k], want[k]) for k in want)
    cfg = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base"
    r = CliRunner().invoke(app, ["extract", "org/base", "org/tuned@v0", "-o", str(tmp_path / "x"), "--rank", "4"])
    assert r.exit_code == 2 and "nothing to extract" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
