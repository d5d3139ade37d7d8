"""Issue #11 ("Trust"), the reading side: every bad input is exit 2 with one line naming the file and
the key or tensor, no traceback, nothing written, the inputs unchanged; never exit 3, never a hang.

Every test works on copies of examples/ in tmp_path (fixtures in conftest.py). Cases that could
hang before the fix run in a subprocess with a timeout, so that a regression fails instead of
blocking the test run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
TIMEOUT = 240  # seconds for a subprocess that used to hang; loractl itself takes a few


def _split(path: Path) -> tuple[bytes, bytes]:
    """(JSON header, data) of a safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n], blob[8 + n :]


def _rewrite_header(path: Path, edit) -> str:
    """Rewrite the header of ``path`` with ``edit(header_text, name) -> text``, ``name`` the tensor
    the edit is about (the first in the file, or the last for edits that grow it): returns ``name``."""
    raw, data = _split(path)
    header = json.loads(raw)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    name = order[-1] if getattr(edit, "last", False) else order[0]
    new = edit(raw.decode(), name).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)
    return name


def _entry_span(text: str, name: str) -> tuple[int, int]:
    """Where the JSON object of tensor ``name`` lies in a header text."""
    start = text.index(json.dumps(name) + ":") + len(json.dumps(name)) + 1
    return start, text.index("}", start) + 1


def _set_field(field: str, raw_value: str):
    """An edit replacing ``field`` of a tensor's entry by the raw JSON ``raw_value``."""

    def edit(text: str, name: str) -> str:
        a, b = _entry_span(text, name)
        entry = json.loads(text[a:b])
        entry[field] = "@@"
        return text[:a] + json.dumps(entry).replace('"@@"', raw_value) + text[b:]

    return edit


def _shape_2e9(text: str, name: str) -> str:
    """A header that declares 2·10⁹ elements for the last tensor (the file keeps its few bytes)."""
    a, b = _entry_span(text, name)
    entry = json.loads(text[a:b])
    begin = entry["data_offsets"][0]
    entry.update(dtype="U8", shape=[2 * 10**9], data_offsets=[begin, begin + 2 * 10**9])
    return text[:a] + json.dumps(entry) + text[b:]


_shape_2e9.last = True  # type: ignore[attr-defined]


HEADER_CASES = {
    "shape 1e400": (_set_field("shape", "[1e400, 172]"), "1e400"),
    "data_offsets Infinity": (_set_field("data_offsets", "[0, Infinity]"), "Infinity"),
    "dtype {}": (_set_field("dtype", "{}"), "dtype"),
    "2e9 elements": (_shape_2e9, "2000000000"),
}


# --------------------------------------------------------------------------------------------
# 1. safetensors headers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["adapter", "base shard"])
@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_header_value_is_exit_2_naming_file_and_tensor(cli, inputs, tools, bad_input, which, case):
    target = inputs.adapter / ADAPTER_FILE if which == "adapter" else inputs.base / SHARD1
    edit, shown = HEADER_CASES[case]
    tensor = _rewrite_header(target, edit)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[target, tensor, shown])


@pytest.mark.parametrize("which", ["adapter", "base shard"])
def test_header_of_100000_nested_brackets_is_exit_2(cli, inputs, tools, bad_input, which):
    target = inputs.adapter / ADAPTER_FILE if which == "adapter" else inputs.base / SHARD1
    target.write_bytes(struct.pack("<Q", 100_000) + b"[" * 100_000)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[target, "nested"])


def test_header_declaring_2e9_elements_allocates_nothing(inputs) -> None:
    """Sizes are checked against the file before anything is allocated: opening the file takes no
    memory in proportion to what the header claims."""
    import subprocess
    import sys

    target = inputs.adapter / ADAPTER_FILE
    _rewrite_header(target, _shape_2e9)
    code = (
        "import resource, sys\n"
        "from loractl.formats import load_adapter\n"
        "from loractl.errors import LoractlError\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"  # 1 GiB: 2e9 bytes cannot fit
        "try:\n    load_adapter(sys.argv[1])\nexcept LoractlError as e:\n    print(e.message)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(inputs.adapter)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout and "2000000000" in proc.stdout


def test_lora_factor_retyped_to_int32_is_refused(cli, inputs, tools, bad_input):
    """lora_A declared I32 (same bytes, now integers) is a valid safetensors file but no LoRA."""
    target = inputs.adapter / ADAPTER_FILE

    def retype(text: str, name: str) -> str:
        header = json.loads(text)
        for k, e in header.items():
            if k != "__metadata__" and ".lora_A." in k:
                e["dtype"] = "I32"
        return json.dumps(header)

    _rewrite_header(target, retype)
    with safe_open(str(target), "pt") as f:  # the file itself is valid safetensors
        assert len(list(f.keys())) > 0
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[target, "lora_A", "int32", "model.layers.0."])


@pytest.mark.parametrize("metadata", [0, "ab", []], ids=["0", "string", "list"])
def test_header_metadata_that_safetensors_refuses_is_refused(cli, inputs, tools, bad_input, metadata):
    target = inputs.adapter / ADAPTER_FILE

    def edit(text: str, name: str) -> str:
        header = json.loads(text)
        header["__metadata__"] = metadata
        return json.dumps(header)

    _rewrite_header(target, edit)
    with pytest.raises(Exception):  # noqa: B017 - the oracle: safe_open refuses it too
        safe_open(str(target), "pt")
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[target, "__metadata__"])


@pytest.mark.parametrize("change", ["trailing bytes", "gap", "header length + 1"])
def test_files_safetensors_refuses_are_refused(cli, inputs, tools, bad_input, change):
    """Accepted before (exit 0), refused by safe_open: now refused here too."""
    target = inputs.base / SHARD2
    raw, data = _split(target)
    if change == "trailing bytes":
        blob = struct.pack("<Q", len(raw)) + raw + data + b"\0" * 8
    elif change == "gap":
        header = json.loads(raw)
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        last = header[names[-1]]
        cut = last["data_offsets"][0]
        last["data_offsets"] = [cut + 8, last["data_offsets"][1] + 8]
        new = json.dumps(header).encode()
        blob = struct.pack("<Q", len(new)) + new + data[:cut] + b"\0" * 8 + data[cut:]
    else:
        blob = struct.pack("<Q", len(raw) + 1) + raw + data
    target.write_bytes(blob)
    with pytest.raises(Exception):  # noqa: B017 - the oracle
        safe_open(str(target), "pt")
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[target])


# --------------------------------------------------------------------------------------------
# 1-2. adapter_config.json values
# --------------------------------------------------------------------------------------------
CONFIG_CASES = {
    "rank_pattern Infinity": ({"rank_pattern": {"q_proj": float("inf")}}, "rank_pattern"),
    "modules_to_save 16": ({"modules_to_save": 16}, "modules_to_save"),
    'r "4"': ({"r": "4"}, "r is"),
    "r 0": ({"r": 0}, "r is"),
    "r 8.0": ({"r": 8.0}, "r is"),
    'lora_alpha "-Infinity"': ({"lora_alpha": "-Infinity"}, "lora_alpha"),
    "lora_alpha -Infinity": ({"lora_alpha": float("-inf")}, "lora_alpha"),
    "lora_alpha NaN": ({"lora_alpha": float("nan")}, "lora_alpha"),
    "lora_alpha true": ({"lora_alpha": True}, "lora_alpha"),
    "alpha_pattern NaN": ({"alpha_pattern": {"v_proj": float("nan")}}, "alpha_pattern"),
    "alpha_pattern a list": ({"alpha_pattern": [1]}, "alpha_pattern"),
    'use_rslora "yes"': ({"use_rslora": "yes"}, "use_rslora"),
    "fan_in_fan_out 1": ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
    "target_modules 5": ({"target_modules": 5}, "target_modules"),
    "target_modules [1]": ({"target_modules": [1]}, "target_modules"),
    "rank_pattern key not a regex": ({"rank_pattern": {"q_proj(": 8}}, "q_proj("),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_value_of_wrong_type_or_range_is_exit_2(cli, inputs, tools, bad_input, case):
    change, key = CONFIG_CASES[case]
    cfg_path = inputs.adapter / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))  # Python writes NaN/Infinity as PEFT's json.load reads them
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[cfg_path, key])


def test_nested_adapter_config_is_exit_2(cli, inputs, tools, bad_input):
    cfg_path = inputs.adapter / CONFIG
    cfg_path.write_text("[" * 100_000)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[cfg_path, "nested"])


@pytest.mark.parametrize("target", ["vllm", "peft"])
def test_non_finite_alpha_fails_check_instead_of_passing(cli, inputs, tools, target):
    """``"lora_alpha": "-Infinity"`` passed ``check --target vllm`` (exit 0): now an integrity error."""
    cfg_path = inputs.adapter / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = "-Infinity"
    cfg_path.write_text(json.dumps(cfg))
    snap = tools.Snapshot([inputs.root])
    r = cli("check", inputs.adapter, "--target", target, "--json")
    assert r.code == 1, r.stderr
    doc = json.loads(r.stdout)
    (f,) = [f for f in doc["findings"] if f["code"] == "integrity"]
    assert "lora_alpha" in f["message"] and str(cfg_path) in f["message"]
    snap.assert_unchanged()


def test_pathological_pattern_is_matched_fast_with_re_semantics(inputs, tools):
    """``(.*)*q_proj`` backtracks forever in ``re`` on every name it does not match; loractl decides it
    in linear time, with re's answers (checked on short names, where re itself finishes)."""
    cfg_path = inputs.adapter / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {"(.*)*q_proj": 32, "(.*)*Z": 64}
    cfg_path.write_text(json.dumps(cfg))
    snap = tools.Snapshot([inputs.root])
    r = tools.run_module(["inspect", inputs.adapter, "--json"], timeout=TIMEOUT)
    assert r.code == 0, r.stderr
    mods = json.loads(r.stdout)["adapters"][0]["module_list"]
    for m in mods:
        assert m["alpha"] == (32 if m["name"].endswith("q_proj") else 16), m
    snap.assert_unchanged()
    from loractl.formats.patterns import matches, peft_regex

    for name in ("a.q_proj", "q_proj", "x.k_proj", "aaaaaaaaZ", "Z", "q_projZ"):
        for key in ("(.*)*q_proj", "(.*)*Z"):
            assert matches(key, name) == (re.match(peft_regex(key), name) is not None), (key, name)


# --------------------------------------------------------------------------------------------
# 1, 4. shard index and config.json
# --------------------------------------------------------------------------------------------
def _index_edit(inputs, change) -> tuple[Path, str]:
    idx = inputs.base / INDEX
    doc = json.loads(idx.read_text())
    key = change(doc, inputs)
    idx.write_text(json.dumps(doc))
    return idx, key


def _first_shard_to(value):
    def change(doc, inputs):
        first = next(iter(doc["weight_map"]))
        doc["weight_map"][first] = value(inputs) if callable(value) else value
        return first

    return change


def _outside(inputs) -> str:
    shutil.copyfile(inputs.base / SHARD1, inputs.root / "x.safetensors")
    return "../x.safetensors"


def _absolute(inputs) -> str:
    shutil.copyfile(inputs.base / SHARD1, inputs.root / "x.safetensors")
    return str(inputs.root / "x.safetensors")


def _receipt(inputs) -> str:
    shutil.copyfile(inputs.base / SHARD1, inputs.base / "loractl.receipt")
    return "loractl.receipt"


INDEX_CASES = {
    "weight_map null": (lambda d, i: d.update(weight_map=None) or "weight_map"),
    "weight_map a number": (lambda d, i: d.update(weight_map=5) or "weight_map"),
    "weight_map a list": (lambda d, i: d.update(weight_map=[1, 2]) or "weight_map"),
    "metadata a string": (lambda d, i: d.update(metadata="ab") or "metadata"),
    "a null shard name": _first_shard_to(None),
    "a 300-character shard name": _first_shard_to("a" * 288 + ".safetensors"),
    "a shard outside the folder": _first_shard_to(_outside),
    "an absolute shard path": _first_shard_to(_absolute),
    "a shard named loractl.receipt": _first_shard_to(_receipt),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index_is_exit_2_naming_index_and_key(cli, inputs, tools, bad_input, case):
    idx, key = _index_edit(inputs, INDEX_CASES[case])
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[idx, key])


@pytest.mark.parametrize("name", [INDEX, "config.json"])
def test_nested_index_or_config_json_is_exit_2(cli, inputs, tools, bad_input, name):
    (inputs.base / name).write_text("[" * 100_000)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[inputs.base / name, "nested"])


FIFO_CASES = {
    "a shard named in the index": ("base", SHARD2),
    "the index": ("base", INDEX),
    "config.json": ("base", "config.json"),
    "the adapter weights": ("adapter", ADAPTER_FILE),
    "adapter_config.json": ("adapter", CONFIG),
}


@pytest.mark.parametrize("case", list(FIFO_CASES))
def test_fifo_is_refused_not_waited_on(inputs, tools, bad_input, case):
    where, name = FIFO_CASES[case]
    folder = inputs.base if where == "base" else inputs.adapter
    (folder / name).unlink()
    os.mkfifo(folder / name)
    snap = tools.Snapshot([folder.parent / n for n in ("tiny-llama", "tiny-llama-lora")])
    out = inputs.work / "merged"
    r = tools.run_module(["merge", inputs.base, inputs.adapter, "-o", out], timeout=TIMEOUT)
    bad_input(r, output=out, snapshot=snap, names=[folder / name, "FIFO"])


# --------------------------------------------------------------------------------------------
# 2. NaN/Inf is never written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra", [[], ["--no-receipt"], ["--dtype", "fp16"]], ids=["receipt", "no-receipt", "fp16"]
)
def test_merge_that_overflows_writes_nothing(cli, inputs, tools, bad_input, extra):
    """A finite adapter whose update overflows the output dtype: exit 2 naming tensor and module, on
    the row-block path (receipt or not) and on the general one (a dtype change)."""
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--weight", "1e39", *extra)
    bad_input(r, output=out, snapshot=snap, names=["NaN/Inf", inputs.adapter])
    assert re.search(r"tensor 'model\.layers\.\d\.[\w.]+\.weight'", r.stderr), r.stderr
    assert re.search(r"module 'model\.layers\.\d\.[\w.]+'", r.stderr), r.stderr


def test_infinities_the_base_already_holds_are_kept(cli, inputs, tools):
    """The check refuses only NaN/Inf where the original was finite: a base that holds an infinity in a
    targeted weight merges as before, the infinity kept and every other value as without it."""
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = next(s for s in (SHARD1, SHARD2) if key in load_file(str(inputs.base / s)))
    clean = inputs.work / "clean"
    assert cli("merge", inputs.base, inputs.adapter, "-o", clean, "--no-receipt").code == 0
    with safe_open(str(inputs.base / shard), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(inputs.base / shard))
    tensors[key][1, 2] = float("inf")
    save_file(tensors, str(inputs.base / shard), metadata=meta)
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--no-receipt")
    assert r.code == 0, r.stderr
    got, want = load_file(str(out / shard))[key], load_file(str(clean / shard))[key]
    assert torch.isinf(got[1, 2])
    got[1, 2] = want[1, 2]
    assert torch.equal(got, want)


def test_unmerge_that_overflows_writes_nothing(cli, inputs, tools, bad_input):
    """Unmerging (without a receipt) a weight so large that the subtraction overflows."""
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "unmerged"
    r = cli("unmerge", inputs.base, inputs.adapter, "-o", out, "--weight", "1e39")
    bad_input(r, output=out, snapshot=snap, names=["NaN/Inf", "unmerging"])


def test_fused_row_blocks_are_checked(monkeypatch) -> None:
    """The row-block path raises on the first non-finite block, whatever the thread, and leaves no
    helper thread writing into the output."""
    from loractl.adapter import LoraModule
    from loractl.ops import merge as merge_ops

    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=g).to(torch.bfloat16)
    a, b = torch.randn(4, 1024, generator=g), torch.randn(512, 4, generator=g)
    m = LoraModule("x", "linear", a, b, alpha=4.0)
    out = torch.empty_like(w)
    merge_ops.fused_merge(w, m, 1.0, out=out)  # finite: fine
    for row in (3, 500):  # in the first half (this thread) and the second (the helper's)
        w2 = w.clone()
        w2[row, 7] = float("nan")
        with pytest.raises(merge_ops.NonFiniteBlock):
            merge_ops.fused_merge(w2, m, 1.0, out=w2)
        with pytest.raises(merge_ops.NonFiniteBlock):
            merge_ops.fused_merge(w2, m, 1.0, out=torch.empty_like(w2), residual=True)
        with pytest.raises(merge_ops.NonFiniteBlock):
            merge_ops.fused_unmerge(w2, m, 1.0, out=w2.clone())


# --------------------------------------------------------------------------------------------
# 3. no adapter_config.json: the scale is unknown
# --------------------------------------------------------------------------------------------
def _no_config(inputs) -> float:
    cfg = json.loads((inputs.adapter / CONFIG).read_text())
    (inputs.adapter / CONFIG).unlink()
    return float(cfg["lora_alpha"])


def _commands(inputs, out: Path) -> dict[str, list[object]]:
    a = inputs.adapter
    return {
        "merge": ["merge", inputs.base, a, "-o", out],
        "unmerge": ["unmerge", inputs.base, a, "-o", out],
        "inspect": ["inspect", a],
        "inspect --spectrum": ["inspect", a, "--spectrum"],
        "truncate": ["truncate", a, "-o", out, "--rank", "2"],
        "combine": ["combine", a, a, "-o", out],
        "convert": ["convert", a, "-o", out, "--to", "kohya"],
        "similarity --base": ["similarity", a, "--base", inputs.base],
    }


@pytest.mark.parametrize(
    "command",
    [
        "merge",
        "unmerge",
        "inspect",
        "inspect --spectrum",
        "truncate",
        "combine",
        "convert",
        "similarity --base",
    ],
)
def test_adapter_without_config_needs_alpha(cli, inputs, tools, bad_input, command):
    _no_config(inputs)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "out"
    r = cli(*_commands(inputs, out)[command])
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter, CONFIG, "--alpha"])


def test_adapter_without_config_merges_with_alpha_as_with_its_config(cli, inputs, tools):
    with_cfg = inputs.work / "with-config"
    assert cli("merge", inputs.base, inputs.adapter, "-o", with_cfg, "--no-receipt").code == 0
    alpha = _no_config(inputs)
    without = inputs.work / "with-alpha"
    r = cli("merge", inputs.base, inputs.adapter, "-o", without, "--no-receipt", "--alpha", alpha)
    assert r.code == 0, r.stderr
    for shard in (SHARD1, SHARD2):  # the same tensors (the provenance metadata differs: other files)
        a, b = load_file(str(with_cfg / shard)), load_file(str(without / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard
    assert not torch.equal(
        load_file(str(without / SHARD1))["model.layers.0.self_attn.q_proj.weight"],
        load_file(str(inputs.base / SHARD1))["model.layers.0.self_attn.q_proj.weight"],
    )
    # check: an integrity error without --alpha, clean with it
    r = cli("check", inputs.adapter, "--json")
    assert r.code == 1 and "--alpha" in r.stdout
    r = cli("check", inputs.adapter, "--alpha", alpha, "--json")
    assert r.code == 0, r.stdout
    # similarity compares A factors: no scale needed
    r = cli("similarity", inputs.adapter, inputs.adapter, "--json")
    assert r.code == 0, r.stderr


def test_alpha_for_an_adapter_that_states_it_is_refused(cli, inputs, tools, bad_input):
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--alpha", "4")
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter / CONFIG, "--alpha"])


def test_lone_peft_file_needs_alpha_too(cli, inputs, tools, bad_input):
    lone = inputs.root / "lone.safetensors"
    shutil.copyfile(inputs.adapter / ADAPTER_FILE, lone)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, lone, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[lone, "--alpha"])


# --------------------------------------------------------------------------------------------
# 5. arguments swapped, a config file given for a folder
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_swapped_arguments_say_so(cli, inputs, tools, bad_input, command):
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "out"
    r = cli(command, inputs.adapter, inputs.base, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter, "not a base model", "swapped"])


def test_swapped_single_files_say_so(cli, inputs, tools, bad_input):
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "out.safetensors"
    r = cli("merge", inputs.adapter / ADAPTER_FILE, inputs.base / SHARD1, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter / ADAPTER_FILE, "swapped"])


def test_base_given_as_adapter_says_so(cli, inputs, tools):
    snap = tools.Snapshot([inputs.root])
    r = cli("inspect", inputs.base)
    assert r.code == 2 and "base model" in r.stderr and "swapped" in r.stderr, r.stderr
    snap.assert_unchanged()


@pytest.mark.parametrize("command", ["merge", "inspect"])
def test_adapter_config_given_as_adapter_asks_for_the_folder(cli, inputs, tools, bad_input, command):
    cfg = inputs.adapter / CONFIG
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    args = ["merge", inputs.base, cfg, "-o", out] if command == "merge" else ["inspect", cfg]
    r = cli(*args)
    bad_input(r, output=out, snapshot=snap, names=[cfg, "pass the folder"])
    assert "header" not in r.stderr  # not a header-length error
