"""``loractl extract`` on the command line: the table, --json, and every bad input of issue #14 (exit 2,
one line naming the file and the tensor, nothing written, inputs unchanged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

PAIR: dict[str, torch.Tensor] = {}


def _pair(root: Path) -> tuple[Path, Path]:
    """A base file and a tuned file (two linear weights changed at rank 2, a norm changed, a head unchanged)."""
    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.q_proj.weight": torch.randn(16, 12, generator=g),
        "model.layers.0.v_proj.weight": torch.randn(16, 12, generator=g),
        "model.layers.0.norm.weight": torch.ones(12),
        "lm_head.weight": torch.randn(20, 12, generator=g),
    }
    tuned = dict(base)
    for k in ("model.layers.0.q_proj.weight", "model.layers.0.v_proj.weight"):
        tuned[k] = base[k] + torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)
    tuned["model.layers.0.norm.weight"] = base["model.layers.0.norm.weight"] + 0.1
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root / "base.safetensors", root / "tuned.safetensors"


def test_table_and_json(cli, tmp_path: Path) -> None:
    b, t = _pair(tmp_path / "in")
    r = cli("extract", b, t, "-o", tmp_path / "out", "--rank", "4")
    assert r.code == 0, r.stderr
    assert "model.layers.0.q_proj" in r.stdout and "saved in full: model.layers.0.norm.weight" in r.stdout
    r = cli("extract", b, t, "-o", tmp_path / "out2", "--rank", "4", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["command"] == "extract" and doc["schema_version"] == 1
    mods = {m["name"]: m for m in doc["modules"]}
    assert set(mods) == {"model.layers.0.q_proj", "model.layers.0.v_proj"}
    assert all(m["rank"] == 2 and m["rel_error"] < 1e-6 and m["energy_kept"] > 0.999999 for m in mods.values())
    assert [s["name"] for s in doc["saved_full"]] == ["model.layers.0.norm.weight"]
    assert doc["total"]["modules"] == 2 and doc["unchanged"] == 1
    written = load_file(str(tmp_path / "out2" / "adapter_model.safetensors"))
    assert not any("lm_head" in k for k in written)  # unchanged: not in the adapter


def _refused(cli, bad_input, tools, tmp_path: Path, b: Path, t: Path, *names: object, rule=("--rank", "4")) -> None:
    snap = tools.Snapshot([b, t])
    out = tmp_path / "out"
    r = cli("extract", b, t, "-o", out, *rule)
    bad_input(r, output=out, snapshot=snap, names=names)
    assert r.stderr_lines[0].startswith("error: ")


def test_different_shapes_name_the_tensor(cli, bad_input, tools, tmp_path: Path) -> None:
    b, t = _pair(tmp_path / "in")
    tuned = load_file(str(t))
    tuned["model.layers.0.v_proj.weight"] = torch.zeros(8, 12)
    save_file(tuned, str(t))
    _refused(cli, bad_input, tools, tmp_path, b, t, t, "model.layers.0.v_proj.weight", "[8, 12]", "[16, 12]")


def test_a_tensor_in_one_model_only(cli, bad_input, tools, tmp_path: Path) -> None:
    b, t = _pair(tmp_path / "in")
    tuned = load_file(str(t))
    tuned["model.layers.0.k_proj.weight"] = torch.zeros(16, 12)
    save_file(tuned, str(t))
    _refused(cli, bad_input, tools, tmp_path, b, t, t, "model.layers.0.k_proj.weight", b)


def test_a_tensor_missing_from_tuned(cli, bad_input, tools, tmp_path: Path) -> None:
    b, t = _pair(tmp_path / "in")
    tuned = load_file(str(t))
    del tuned["lm_head.weight"]
    save_file(tuned, str(t))
    _refused(cli, bad_input, tools, tmp_path, b, t, b, "lm_head.weight", t)


def test_identical_models_nothing_to_extract(cli, bad_input, tools, tmp_path: Path) -> None:
    b, _ = _pair(tmp_path / "in")
    copy = tmp_path / "in" / "copy.safetensors"
    shutil.copyfile(b, copy)
    _refused(cli, bad_input, tools, tmp_path, b, copy, copy, b, "nothing to extract")


def test_the_same_path_twice(cli, bad_input, tools, tmp_path: Path) -> None:
    b, _ = _pair(tmp_path / "in")
    _refused(cli, bad_input, tools, tmp_path, b, b, b, "nothing to extract")


def test_different_architectures(cli, bad_input, tools, tmp_path: Path) -> None:
    """Two model folders whose config.json names other model types."""
    b, t = _pair(tmp_path / "in")
    folders = []
    for f, mtype in ((b, "llama"), (t, "mistral")):
        d = tmp_path / "in" / f.stem
        d.mkdir()
        shutil.move(f, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": mtype}))
        folders.append(d)
    _refused(cli, bad_input, tools, tmp_path, *folders, folders[1], "'mistral'", "'llama'")


def test_nan_in_tuned_names_the_tensor(cli, bad_input, tools, tmp_path: Path) -> None:
    b, t = _pair(tmp_path / "in")
    tuned = load_file(str(t))
    tuned["model.layers.0.q_proj.weight"][3, 3] = float("nan")
    save_file(tuned, str(t))
    _refused(cli, bad_input, tools, tmp_path, b, t, t, "model.layers.0.q_proj.weight", "NaN")


@pytest.mark.parametrize(
    "rule, words",
    [
        ((), ["--rank", "--energy", "--budget"]),
        (("--rank", "4", "--energy", "0.9"), ["--rank and --energy"]),
        (("--rank", "0"), ["--rank 0"]),
        (("--energy", "1.5"), ["--energy"]),
        (("--budget", "10"), ["--budget"]),
        (("--rank", "2", "--module", "nothing.*"), ["nothing.*"]),
    ],
)
def test_bad_rules(cli, bad_input, tools, tmp_path: Path, rule: tuple[str, ...], words: list[str]) -> None:
    b, t = _pair(tmp_path / "in")
    _refused(cli, bad_input, tools, tmp_path, b, t, *words, rule=rule)


def test_existing_output_refused(cli, bad_input, tools, tmp_path: Path) -> None:
    b, t = _pair(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    snap = tools.Snapshot([b, t])
    r = cli("extract", b, t, "-o", out, "--rank", "2")
    bad_input(r, output=out, snapshot=snap, names=[out], output_existed=True)
    assert list(out.iterdir()) == []
