"""io/receipt, the reading side (issue #11, "Trust"): a receipt whose metadata or tensors are not
what merge wrote (null, a wrong type, JSON nested thousands deep, a part dropped, swapped, retyped,
pointing outside its tensor) is refused with one InputError naming the receipt and the key or the
tensor, before anything is written; never a KeyError, a TypeError, a RecursionError or a wrong result.

Each case merges the example base (one file) with the example adapter, edits the receipt written
beside it, and unmerges through the command line and the library.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loractl import api
from loractl.errors import InputError
from loractl.io.receipt import Receipt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DOWN = "model.layers.0.mlp.down_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture(scope="module")
def merged_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example base as one file, merged with the example adapter (with its receipt), once."""
    root = tmp_path_factory.mktemp("receipt")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted((EXAMPLES / "tiny-llama").glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    save_file(tensors, str(root / "base.safetensors"), metadata={"format": "pt"})
    adapter = root / "lora"
    adapter.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(EXAMPLES / "tiny-llama-lora" / f, adapter / f)
    api.merge(root / "base.safetensors", [adapter], root / "merged.safetensors")
    assert (root / "merged.safetensors.loractl.receipt").exists()
    return root


@pytest.fixture
def case(merged_once: Path, tmp_path: Path) -> Path:
    """A private copy of the merged model, its receipt and the adapter."""
    for name in ("merged.safetensors", "merged.safetensors.loractl.receipt"):
        shutil.copyfile(merged_once / name, tmp_path / name)
    shutil.copytree(merged_once / "lora", tmp_path / "lora")
    return tmp_path


def _receipt(folder: Path) -> Path:
    return folder / "merged.safetensors.loractl.receipt"


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> None:
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _meta(key: str, value: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    """Set metadata ``key``; ``crc32`` makes the receipt one of format 1 (whose checksums it holds)."""

    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        meta[key] = value
        if key == "crc32":
            meta["loractl.receipt"] = "1"
            meta.pop("sum64", None)

    return edit


METADATA = {
    "shard_metadata null": ("shard_metadata", "null"),
    "shard_metadata a list": ("shard_metadata", "[1, 2]"),
    "shard_metadata of numbers": ("shard_metadata", '{"base.safetensors": {"format": 5}}'),
    "sum64 nested deeply": ("sum64", "[" * 5000 + "]" * 5000),
    "sum64 of numbers": ("sum64", json.dumps({DOWN: 123})),
    "sum64 not hex": ("sum64", json.dumps({DOWN: "z" * 32})),
    "sum64 too short": ("sum64", json.dumps({DOWN: "0" * 16})),
    "format 1 crc32 nested deeply": ("crc32", "[" * 5000 + "]" * 5000),
    "format 1 crc32 of strings": ("crc32", json.dumps({DOWN: "123"})),
    "format 1 crc32 negative": ("crc32", json.dumps({DOWN: -1})),
    "format 1 crc32 beyond 32 bits": ("crc32", json.dumps({DOWN: 2**40})),
    "dtypes of an unknown dtype": ("dtypes", json.dumps({DOWN: "F128"})),
    "dtypes a string": ("dtypes", '"BF16"'),
    "adapters an object": ("adapters", '{"path": "lora"}'),
    "adapters of numbers": ("adapters", "[1]"),
    "adapters not JSON": ("adapters", "[{"),
}


@pytest.mark.parametrize("what", list(METADATA), ids=list(METADATA))
def test_odd_metadata_is_refused_naming_the_receipt_and_key(case: Path, what: str) -> None:
    key, value = METADATA[what]
    receipt = _receipt(case)
    _rewrite(receipt, _meta(key, value))
    with pytest.raises(InputError) as e:
        Receipt(receipt).close()
    assert str(receipt) in e.value.message and repr(key) in e.value.message, e.value.message
    assert "\n" not in e.value.message


def _drop(part: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        del tensors[f"{DOWN}::{part}"]

    return edit


def _swap(a: str, b: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        a_, b_ = f"{DOWN}::{a}", f"{DOWN}::{b}"
        tensors[a_], tensors[b_] = tensors[b_], tensors[a_]

    return edit


def _set(part: str, make: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tensors[f"{DOWN}::{part}"] = make(tensors)

    return edit


def _shape_of(name: str) -> list[int]:
    with safe_open(str(next((EXAMPLES / "tiny-llama").glob("model-00001-*.safetensors"))), "pt") as f:
        return list(f.get_slice(name).get_shape())


TENSORS = {
    # (edit, the part named, a fragment of the message)
    "gap8 dropped": (_drop("gap8"), "gap8", "is missing"),
    "d8 dropped": (_drop("d8"), "d8", "is missing"),
    "gap8 of another tensor": (_set("gap8", lambda t: t[f"{GATE}::gap8"].clone()), "d8", "values for"),
    "gap8 and d8 swapped": (_swap("gap8", "d8"), "gap8|d8", "not a vector of"),  # whichever is read first
    "d8 as float32": (_set("d8", lambda t: t[f"{DOWN}::d8"].float()), "d8", "not a vector of int8"),
    "gap8 as a matrix": (_set("gap8", lambda t: t[f"{DOWN}::gap8"].reshape(1, -1)), "gap8", "not a vector"),
    "valbig of another dtype": (_set("valbig", lambda t: t[f"{DOWN}::valbig"].float()), "valbig", "not a vector"),
    "valbig one value short": (_set("valbig", lambda t: t[f"{DOWN}::valbig"][:-1]), "valbig", "d8 counts"),
    "gaps past the tensor": (
        _set("gap8", lambda t: torch.full_like(t[f"{DOWN}::gap8"], 254)), "gap8", "past the tensor"
    ),
    "an unknown part": (_set("x", lambda t: torch.zeros(3)), "x", "not a part loractl writes"),
    "full of another shape": (_set("full", lambda t: torch.zeros(3, 3, dtype=torch.bfloat16)), "full", "[3, 3]"),
    "full of another dtype": (
        _set("full", lambda t: torch.zeros(_shape_of(DOWN), dtype=torch.float32)), "full", "float32"
    ),
    "a DoRA factor that does not broadcast": (_set("dora0", lambda t: torch.ones(7, 1)), "dora0", "does not fit"),
}


@pytest.mark.parametrize("what", list(TENSORS), ids=list(TENSORS))
def test_odd_receipt_tensors_are_refused_naming_the_tensor(case: Path, what: str) -> None:
    edit, part, fragment = TENSORS[what]
    receipt = _receipt(case)
    _rewrite(receipt, edit)
    before = _digests(case)
    out = case / "restored.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "loractl", "unmerge", str(case / "merged.safetensors"), str(case / "lora"), "-o", str(out)],
        capture_output=True, text=True, env={**os.environ, "LORACTL_DEBUG": ""}, timeout=300,
    )  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), r.stderr
    assert str(receipt) in lines[0], r.stderr
    assert any(repr(f"{DOWN}::{p}") in lines[0] for p in part.split("|")), r.stderr
    assert fragment in lines[0], r.stderr
    assert not os.path.lexists(out)
    assert not [p for p in case.iterdir() if "loractl-tmp" in p.name]
    assert _digests(case) == before
    with pytest.raises(InputError, match="not the receipt loractl wrote"):
        api.unmerge(case / "merged.safetensors", [case / "lora"], out)
    assert not os.path.lexists(out)


def test_the_receipt_merge_wrote_still_restores_the_base(case: Path, merged_once: Path) -> None:
    out = case / "restored.safetensors"
    res = api.unmerge(case / "merged.safetensors", [case / "lora"], out)
    assert res.exact
    restored, base = load_file(str(out)), load_file(str(merged_once / "base.safetensors"))
    assert restored.keys() == base.keys()
    for k, t in base.items():
        assert torch.equal(restored[k].view(torch.int16), t.view(torch.int16)), k


@pytest.mark.parametrize("what", ["shard_metadata null", "sum64 nested deeply", "adapters not JSON"])
def test_odd_metadata_through_the_command_line(case: Path, what: str) -> None:
    """unmerge with such a receipt (a TypeError, exit 3, for shard_metadata null): exit 2, one line
    naming the receipt and the key, nothing written, nothing changed."""
    key, value = METADATA[what]
    receipt = _receipt(case)
    _rewrite(receipt, _meta(key, value))
    before = _digests(case)
    out = case / "restored.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "loractl", "unmerge", str(case / "merged.safetensors"), str(case / "lora"), "-o", str(out)],
        capture_output=True, text=True, env={**os.environ, "LORACTL_DEBUG": ""}, timeout=300,
    )  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), r.stderr
    assert str(receipt) in lines[0] and repr(key) in lines[0], r.stderr
    assert not os.path.lexists(out)
    assert not [p for p in case.iterdir() if "loractl-tmp" in p.name]
    assert _digests(case) == before
