"""Bad inputs (Section 5 of the issue): every one is refused with exit 2 (3 for a bug, 130 for
Ctrl-C), a short message on stderr naming the file (and the module or tensor), no traceback,
no output and no temporary file left behind, and the inputs untouched.

Every test works on copies of examples/ in tmp_path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


def _truncate_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _cut_off_tensors(path: Path, size: int) -> set[str]:
    """Names of the tensors of a safetensors file that lie (partly) beyond ``size`` bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name for name, e in header.items() if 8 + n + e["data_offsets"][1] > size}


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _resave_with(path: Path, key: str, index: tuple[int, int], value: float) -> None:
    """Rewrite a safetensors file with one element of one tensor changed (metadata kept)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[key][index] = value
    save_file(tensors, str(path), metadata=meta)


# --------------------------------------------------------------------------------------------
# 1. missing paths
# --------------------------------------------------------------------------------------------
def test_missing_base_path(cli, inputs, tools, bad_input):
    snap = tools.Snapshot([inputs.root])
    missing = inputs.root / "no-such-base"
    out = inputs.work / "merged"
    r = cli("merge", missing, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[missing])


def test_missing_adapter_path(cli, inputs, tools, bad_input):
    snap = tools.Snapshot([inputs.root])
    missing = inputs.root / "no-such-adapter"
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, missing, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[missing])


# --------------------------------------------------------------------------------------------
# 2. truncated safetensors
# --------------------------------------------------------------------------------------------
def test_truncated_adapter(cli, inputs, tools, bad_input):
    weights = inputs.adapter / ADAPTER_FILE
    _truncate_half(weights)
    cut = _cut_off_tensors(weights, weights.stat().st_size)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[weights])
    assert any(name in r.stderr for name in cut), f"no cut-off tensor named in {r.stderr!r}"


@pytest.mark.parametrize("shard", [SHARD1, SHARD2])
def test_truncated_base_shard(cli, inputs, tools, bad_input, shard):
    weights = inputs.base / shard
    _truncate_half(weights)
    cut = _cut_off_tensors(weights, weights.stat().st_size)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[weights])
    assert any(name in r.stderr for name in cut), f"no cut-off tensor named in {r.stderr!r}"


# --------------------------------------------------------------------------------------------
# 3. random bytes named .safetensors
# --------------------------------------------------------------------------------------------
def _garbage(kind: str) -> bytes:
    if kind == "random":
        return _random_bytes(70_000, seed=3)
    # a plausible header length followed by bytes that are not JSON
    return struct.pack("<Q", 1000) + _random_bytes(70_000, seed=4)


@pytest.mark.parametrize("kind", ["random", "small-header-length"])
def test_random_bytes_as_adapter_file(cli, inputs, tools, bad_input, kind):
    fake = inputs.root / "lora.safetensors"
    fake.write_bytes(_garbage(kind))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, fake, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[fake])


def test_random_bytes_in_adapter_folder(cli, inputs, tools, bad_input):
    weights = inputs.adapter / ADAPTER_FILE
    weights.write_bytes(_garbage("random"))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[weights])


@pytest.mark.parametrize("kind", ["random", "small-header-length"])
def test_random_bytes_as_base_file(cli, inputs, tools, bad_input, kind):
    fake = inputs.root / "model.safetensors"
    fake.write_bytes(_garbage(kind))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged.safetensors"
    r = cli("merge", fake, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[fake])


def test_random_bytes_as_base_shard(cli, inputs, tools, bad_input):
    shard = inputs.base / SHARD1
    shard.write_bytes(_garbage("random"))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[shard])


# --------------------------------------------------------------------------------------------
# 4. an adapter for another model
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapter_for_another_model(cli, inputs, tools, bad_input):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=86,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=512,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    )
    other = inputs.root / "other-lora"
    model.save_pretrained(str(other))
    assert (other / ADAPTER_FILE).exists()
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, other, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[other])
    assert re.search(r"model\.layers\.[01]\.self_attn\.q_proj", r.stderr), r.stderr
    assert re.search(r"32\D{1,3}32", r.stderr), f"adapter shape [32, 32] not named: {r.stderr!r}"
    assert re.search(r"64\D{1,3}64", r.stderr), f"base shape [64, 64] not named: {r.stderr!r}"


@pytest.mark.parametrize(
    "field, value",
    [("lora_alpha", "x"), ("r", "eight"), ("lora_alpha", None)],
    ids=["alpha-not-a-number", "r-not-a-number", "alpha-null"],
)
def test_adapter_config_with_bad_values(cli, inputs, tools, bad_input, field, value):
    """adapter_config.json that parses as JSON but holds nonsense is an input error naming it, not a bug."""
    cfg_path = inputs.adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg, indent=2))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter])
    assert "adapter_config.json" in r.stderr or field in r.stderr, r.stderr


# --------------------------------------------------------------------------------------------
# 5. a pickle-only adapter
# --------------------------------------------------------------------------------------------
def _pickle_adapter(inputs) -> Path:
    pk = inputs.root / "pickle-lora"
    pk.mkdir()
    shutil.copyfile(inputs.adapter / "adapter_config.json", pk / "adapter_config.json")
    torch.save(load_file(str(inputs.adapter / ADAPTER_FILE)), pk / "adapter_model.bin")
    return pk


def test_pickle_adapter_refused_without_allow_pickle(cli, inputs, tools, bad_input):
    pk = _pickle_adapter(inputs)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, pk, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[pk / "adapter_model.bin"])
    assert "--allow-pickle" in r.stderr


def test_pickle_adapter_merged_with_allow_pickle(cli, inputs, tools):
    pk = _pickle_adapter(inputs)
    snap = tools.Snapshot([inputs.root])
    out_pk = inputs.work / "merged-pickle"
    out_st = inputs.work / "merged-safetensors"
    r = cli("merge", inputs.base, pk, "-o", out_pk, "--allow-pickle")
    assert r.code == 0, r.stderr
    r = cli("merge", inputs.base, inputs.adapter, "-o", out_st)
    assert r.code == 0, r.stderr
    snap.assert_unchanged()
    for shard in (SHARD1, SHARD2):
        a, b = load_file(str(out_pk / shard)), load_file(str(out_st / shard))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # and the adapter really changed something
    base = load_file(str(inputs.base / SHARD1))
    merged = load_file(str(out_pk / SHARD1))
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"]
    )
    assert tools.leftovers(inputs.work) == []


# --------------------------------------------------------------------------------------------
# 6. NaN / Inf in an adapter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_adapter(cli, inputs, tools, bad_input, value):
    weights = inputs.adapter / ADAPTER_FILE
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _resave_with(weights, key, (3, 5), value)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[weights, "model.layers.1.self_attn.v_proj"])


# --------------------------------------------------------------------------------------------
# 7. output that exists
# --------------------------------------------------------------------------------------------
def _existing_output(inputs) -> tuple[Path, dict[str, bytes]]:
    out = inputs.work / "merged"
    out.mkdir()
    contents = {"marker.txt": b"do not delete me\n", SHARD1: b"not really a shard"}
    for name, data in contents.items():
        (out / name).write_bytes(data)
    return out, contents


def test_existing_output_refused_without_force(cli, inputs, tools, bad_input):
    out, contents = _existing_output(inputs)
    snap = tools.Snapshot([inputs.root])
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[out], output_existed=True)
    assert "--force" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(contents)
    for name, data in contents.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in inputs.work.iterdir()) == ["merged"]


def test_existing_output_replaced_with_force(cli, inputs, tools):
    out, _ = _existing_output(inputs)
    snap = tools.Snapshot([inputs.root])
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--force")
    assert r.code == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    snap.assert_unchanged()
    assert not (out / "marker.txt").exists()
    with safe_open(str(out / SHARD1), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
    assert (out / "config.json").read_bytes() == (inputs.base / "config.json").read_bytes()
    assert sorted(p.name for p in inputs.work.iterdir()) == ["merged"]
    assert tools.leftovers(inputs.work) == []


# --------------------------------------------------------------------------------------------
# 8. output that is one of the inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("which", ["base", "adapter", "inside-base", "base-via-symlink"])
def test_output_is_an_input(cli, inputs, tools, bad_input, which, force):
    if which == "base":
        out = inputs.base
    elif which == "adapter":
        out = inputs.adapter
    elif which == "inside-base":
        out = inputs.base / "merged"
    else:
        out = inputs.work / "link"
        out.symlink_to(inputs.base, target_is_directory=True)
    before = sorted(p.name for p in out.parent.iterdir())
    snap = tools.Snapshot([inputs.root])
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, *(["--force"] if force else []))
    bad_input(r, output=out, snapshot=snap, names=[out], output_existed=which != "inside-base")
    assert sorted(p.name for p in out.parent.iterdir()) == before
    assert tools.leftovers(inputs.root.parent) == []


# --------------------------------------------------------------------------------------------
# 9. full disk
# --------------------------------------------------------------------------------------------
def test_disk_full_in_subprocess(inputs, tools, bad_input):
    """RLIMIT_FSIZE below the smallest shard: writes fail with EFBIG (Python ignores SIGXFSZ)."""
    limit = 16 * 1024
    assert limit < min((inputs.base / s).stat().st_size for s in (SHARD1, SHARD2))

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = tools.run_module(["merge", inputs.base, inputs.adapter, "-o", out], preexec_fn=small_files)
    bad_input(r, output=out, snapshot=snap, names=[out])
    errors = [line for line in r.stderr_lines if line.startswith("error:")]
    assert len(errors) == 1 and "no space" in errors[0], r.stderr
    assert list(inputs.work.iterdir()) == []


class _OsWithFailingWrite:
    """Stands for the ``os`` module inside loractl.io.safetensors; ``write`` and ``pwrite`` (the
    O_DIRECT shard writes) fail with ENOSPC from call N on."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.pwrites = 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def pwrite(self, fd: int, data, offset: int) -> int:
        self.calls += 1
        self.pwrites += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, offset)


def test_disk_full_via_api(inputs, tools, monkeypatch):
    import loractl.api
    import loractl.io.safetensors as st
    from loractl.errors import OutputError

    snap = tools.Snapshot([inputs.root])
    counter = _OsWithFailingWrite(None)
    with monkeypatch.context() as m:
        m.setattr(st, "os", counter)
        loractl.api.merge(inputs.base, [inputs.adapter], inputs.work / "counted")
    total = counter.calls
    assert total >= 3, "expected several os.write calls in a merge"
    assert counter.pwrites >= 2, "expected the shards to be written with pwrite (O_DIRECT)"
    shutil.rmtree(inputs.work / "counted")

    for n in sorted({1, 2, total // 2, total}):
        failing = _OsWithFailingWrite(n)
        out = inputs.work / f"merged-{n}"
        with monkeypatch.context() as m:
            m.setattr(st, "os", failing)
            with pytest.raises(OutputError) as exc:
                loractl.api.merge(inputs.base, [inputs.adapter], out)
        assert failing.calls >= n
        assert "no space" in str(exc.value), str(exc.value)
        assert not os.path.lexists(out)
        assert list(inputs.work.iterdir()) == [], f"left behind after ENOSPC at write {n}"
    snap.assert_unchanged()


def test_disk_full_while_writing_receipt_of_single_file_base(inputs, tools, monkeypatch):
    """A single-file base: the receipt is written after the merged file; a full disk then must not
    leave the merged file behind either (no partial output)."""
    import loractl.api
    import loractl.io.safetensors as st
    from loractl.errors import OutputError

    single = inputs.root / "tiny-llama.safetensors"
    tensors = {}
    for shard in (SHARD1, SHARD2):
        tensors.update(load_file(str(inputs.base / shard)))
    save_file(tensors, str(single), metadata={"format": "pt"})
    snap = tools.Snapshot([inputs.root])

    counter = _OsWithFailingWrite(None)
    with monkeypatch.context() as m:
        m.setattr(st, "os", counter)
        loractl.api.merge(single, [inputs.adapter], inputs.work / "counted.safetensors")
    for p in list(inputs.work.iterdir()):
        p.unlink()

    failing = _OsWithFailingWrite(counter.calls)  # the last write: the receipt's
    out = inputs.work / "merged.safetensors"
    with monkeypatch.context() as m:
        m.setattr(st, "os", failing)
        with pytest.raises(OutputError) as exc:
            loractl.api.merge(single, [inputs.adapter], out)
    assert "no space" in str(exc.value)
    assert sorted(p.name for p in inputs.work.iterdir()) == [], "a failed merge left files behind"
    snap.assert_unchanged()


def _copy_file_on_full_disk(src, dst) -> None:
    """Stands for ``copy_file`` inside loractl.api: copying a file fails with ENOSPC."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))


def test_disk_full_while_copying_config_files(cli, inputs, tools, bad_input, monkeypatch):
    """A full disk while config.json / tokenizer files are copied is an output error (exit 2), not a bug."""
    import loractl.io.layout

    monkeypatch.setattr(loractl.io.layout, "copy_file", _copy_file_on_full_disk)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[out])
    assert "no space" in r.stderr_lines[0], r.stderr
    assert list(inputs.work.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 10. Ctrl-C midway through a ~1.1B-parameter merge
# --------------------------------------------------------------------------------------------
BIG = {"hidden": 2048, "intermediate": 5632, "layers": 22, "vocab": 32000, "kv": 256}


def _big_shapes() -> dict[str, tuple[int, ...]]:
    h, i, kv, v = BIG["hidden"], BIG["intermediate"], BIG["kv"], BIG["vocab"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(BIG["layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _write_big_base(folder: Path) -> int:
    """A Llama-shaped bf16 base of ~1.1B parameters in two shards, from one reused random block."""
    from loractl.io.safetensors import SafetensorsWriter

    folder.mkdir()
    shapes = _big_shapes()
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
    largest = max(math.prod(s) for s in shapes.values())
    buf = block.repeat(math.ceil(largest / block.numel()))
    names = list(shapes)
    half = len(names) // 2
    weight_map: dict[str, str] = {}
    for k, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        w = SafetensorsWriter(folder / fname, [(n, "BF16", shapes[n]) for n in chunk], {"format": "pt"})
        try:
            for n in chunk:
                w.write(n, buf[: math.prod(shapes[n])].view(shapes[n]))
                weight_map[n] = fname
            w.close()
        finally:
            w.close()
    total = sum(math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": BIG["hidden"],
        "intermediate_size": BIG["intermediate"],
        "num_hidden_layers": BIG["layers"],
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": BIG["vocab"],
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def _write_big_adapter(folder: Path) -> None:
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(BIG["layers"]):
        for module, out_features in (("q_proj", BIG["hidden"]), ("v_proj", BIG["kv"])):
            p = f"base_model.model.model.layers.{layer}.self_attn.{module}."
            tensors[p + "lora_A.weight"] = torch.randn(8, BIG["hidden"], generator=g) * 0.01
            tensors[p + "lora_B.weight"] = torch.randn(out_features, 8, generator=g) * 0.01
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _bytes_under(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_ctrl_c_midway_through_big_merge(tmp_path, tools):
    big = tmp_path / "big"
    big.mkdir()
    try:
        base, adapter = big / "base", big / "lora"
        params = _write_big_base(base)
        assert 1.0e9 < params < 1.2e9
        assert len(list(base.glob("*.safetensors"))) == 2
        _write_big_adapter(adapter)
        snap = tools.Snapshot([base, adapter])
        work = big / "work"
        work.mkdir()
        out = work / "merged"

        env = dict(os.environ)
        env.pop("LORACTL_DEBUG", None)
        # SIGINT back to its default in the child: a test runner started in the background by a shell
        # without job control (`cmd &` in a script, CI) inherits SIGINT ignored, so does the merge, and
        # Python then installs no KeyboardInterrupt handler: the Ctrl-C would be ignored (exit 0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "loractl", "merge", str(base), str(adapter), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 60
            written = 0
            while time.monotonic() < deadline and proc.poll() is None:
                # the temporary folder (its receipt spool, a file beside it, matches the name too)
                tmps = [p for p in work.iterdir() if "loractl-tmp" in p.name and p.is_dir()]
                if tmps:
                    written = _bytes_under(tmps[0])
                    if written > 50_000_000:
                        break
                time.sleep(0.001)
            assert proc.poll() is None, f"the merge ended before it was interrupted: {proc.communicate()}"
            assert written > 50_000_000, "the temporary output never reached 50 MB"
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        msg = f"exit {proc.returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        assert proc.returncode == 130, msg
        assert "Traceback" not in stdout + stderr, msg
        assert len(stderr.strip().splitlines()) == 1, msg
        assert not os.path.lexists(out), msg
        assert list(work.iterdir()) == [], msg
        assert tools.leftovers(big) == []
        snap.assert_unchanged()
    finally:
        shutil.rmtree(big, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# 11. internal error
# --------------------------------------------------------------------------------------------
def _broken_delta_weight(*args, **kwargs):
    raise RuntimeError("boom from the test")


def test_internal_error_is_one_line(cli, inputs, tools, monkeypatch):
    import loractl.ops.merge

    monkeypatch.setattr(loractl.ops.merge, "delta_weight", _broken_delta_weight)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    msg = f"exit {r.code}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"
    assert r.code == 3, msg
    assert "Traceback" not in r.stdout + r.stderr, msg
    assert len(r.stderr_lines) == 1, msg
    assert "internal error" in r.stderr_lines[0], msg
    assert "LORACTL_DEBUG" in r.stderr, msg
    assert not os.path.lexists(out)
    assert list(inputs.work.iterdir()) == []
    snap.assert_unchanged()


def test_internal_error_traceback_with_debug(cli, inputs, tools, monkeypatch):
    import loractl.ops.merge

    monkeypatch.setattr(loractl.ops.merge, "delta_weight", _broken_delta_weight)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, env={"LORACTL_DEBUG": "1"})
    assert r.code == 3, r.stderr
    assert "Traceback" in r.stderr
    assert "boom from the test" in r.stderr
    assert "internal error" in r.stderr
    assert not os.path.lexists(out)
    assert list(inputs.work.iterdir()) == []
    snap.assert_unchanged()


# --------------------------------------------------------------------------------------------
# 12. usage errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [["1", "0.5"], ["1", "1", "1"]], ids=["two-for-one", "three-for-one"])
def test_weight_count_not_matching_adapters(cli, inputs, tools, bad_input, weights):
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    args = [a for w in weights for a in ("--weight", w)]
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, *args)
    bad_input(r, output=out, snapshot=snap, names=["--weight"])


def test_weight_count_two_adapters_one_weight(cli, inputs, tools, bad_input):
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, inputs.adapter, "-o", out, "--weight", "1")
    bad_input(r, output=out, snapshot=snap, names=["--weight"])


def test_unknown_dtype(cli, inputs, tools, bad_input):
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--dtype", "fp8")
    bad_input(r, output=out, snapshot=snap, names=["--dtype"])
    assert r.stderr_lines[1] == "hint: see loractl merge --help"


#: command lines click refuses, with what the one error line must name
USAGE_ERRORS = {
    "weight-not-a-number": (["merge", "{base}", "{adapter}", "-o", "{out}", "--weight", "x"], "merge", "--weight"),
    "weight-a-list": (["merge", "{base}", "{adapter}", "-o", "{out}", "-w", "-1", "--weight", "1,2", "--format", "kohya"],
                      "merge", "--weight"),
    "weight-empty": (["unmerge", "{base}", "{adapter}", "-o", "{out}", "--weight", ""], "unmerge", "--weight"),
    "energy-not-a-number": (["truncate", "{adapter}", "-o", "{out}", "--energy", "x"], "truncate", "--energy"),
    "density-not-a-number": (
        ["combine", "{adapter}", "{adapter}", "-o", "{out}", "--density", "x"], "combine", "--density"
    ),
    "to-empty": (["convert", "{adapter}", "-o", "{out}", "--to", ""], "convert", "--to"),
    "rank-empty": (["convert", "{adapter}", "-o", "{out}", "--to", "peft", "--rank", ""], "convert", "--rank"),
    "unknown-option": (["merge", "{base}", "{adapter}", "-o", "{out}", "--bogus"], "merge", "--bogus"),
    "option-without-value": (["merge", "{base}", "{adapter}", "-o"], "merge", "'-o'"),
    "missing-argument": (["merge", "-o", "{out}"], "merge", "'BASE'"),
    "unknown-command": (["bogus"], None, "'bogus'"),
    "unknown-top-option": (["--bogus"], None, "--bogus"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USAGE_ERRORS), ids=list(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_a_hint(cli, inputs, tools, bad_input, case):
    """A value click refuses, an unknown option or command, a missing argument: `error: ...` naming
    it and `hint: see loractl COMMAND --help`, exit 2, as every other error; not click's usage block."""
    argv, command, named = USAGE_ERRORS[case]
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "out"
    paths = {"base": inputs.base, "adapter": inputs.adapter, "out": out}
    r = cli(*[a.format(**paths) for a in argv])
    bad_input(r, output=out, snapshot=snap, names=[named])
    assert len(r.stderr_lines) == 2, r.stderr
    assert r.stderr_lines[1] == f"hint: see loractl{' ' + command if command else ''} --help", r.stderr
    assert "Usage:" not in r.stderr and "Try '" not in r.stderr


def test_help_version_and_no_arguments_are_untouched(cli):
    alone = cli()
    assert "Usage: loractl [OPTIONS] COMMAND [ARGS]..." in alone.stdout + alone.stderr
    assert "Commands:" in alone.stdout + alone.stderr
    assert not any(line.startswith("error:") for line in (alone.stdout + alone.stderr).splitlines())
    helped = cli("merge", "--help")
    assert helped.code == 0 and helped.stdout.startswith("Usage: loractl merge [OPTIONS] BASE ADAPTER...")
    version = cli("--version")
    assert version.code == 0 and version.stdout.startswith("loractl ")


def test_usage_errors_of_the_console_script_are_one_line(inputs, tools):
    """The same through the console script (``loractl.cli.app:main``), in a real process."""
    out = inputs.work / "merged"
    r = tools.run_module(["merge", inputs.base, inputs.adapter, "-o", out, "--weight", "x"])
    assert r.code == 2, r.stderr
    assert len(r.stderr_lines) == 2, r.stderr
    assert r.stderr_lines[0].startswith("error: Invalid value for '--weight'"), r.stderr
    assert r.stderr_lines[1] == "hint: see loractl merge --help", r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 13. output paths that cannot be written
# --------------------------------------------------------------------------------------------
def _odd_output(work: Path, kind: str) -> tuple[str, str]:
    """(the -o given, what the error line must say), for an output path of ``kind``."""
    if kind == "under-a-file":
        (work / "file").write_text("x")
        return str(work / "file" / "x"), "is not a folder"
    if kind == "name-too-long":
        return str(work / ("a" * 250)), "the name is too long"
    if kind == "folder-name-too-long":
        return str(work / ("a" * 300) / "x"), "File name too long"
    if kind == "path-too-long":
        return str(work / "/".join(["b" * 200] * 25) / "x"), "the path is too long"
    if kind == "proc":  # ENOENT when the temporary is made
        return "/proc/self/loractl-out", "cannot write"
    if kind == "proc-pid-1":
        return "/proc/1/x.safetensors", "cannot write"
    if kind == "sysfs":  # EACCES or EPERM, even for root
        return "/sys/loractl-out", "cannot write"
    if kind == "missing-folder":
        return str(work / "no" / "such" / "x"), "does not exist"
    if kind == "dot":
        return "./", "not a name for an output"
    if kind == "newline":
        return str(work / "a\nb" / "x"), "a\\nb"  # a missing folder, shown escaped on one line
    raise AssertionError(kind)


ODD_OUTPUTS = ["under-a-file", "name-too-long", "folder-name-too-long", "path-too-long", "proc",
               "proc-pid-1", "sysfs", "missing-folder", "dot", "newline"]  # fmt: skip


@pytest.mark.parametrize("command", ["merge", "convert", "truncate"])
@pytest.mark.parametrize("kind", ODD_OUTPUTS)
def test_an_output_path_that_cannot_be_written_is_one_clear_error(cli, inputs, tools, monkeypatch, command, kind):
    """Odd -o paths are refused up front (io.atomic.check_output) or, where only trying tells
    (/proc), when the temporary cannot be made: exit 2, one line naming the output (control
    characters escaped), nothing written, the inputs untouched; never exit 3."""
    monkeypatch.chdir(inputs.work)
    out, said = _odd_output(inputs.work, kind)
    snap = tools.Snapshot([inputs.root])
    before = sorted(p.name for p in inputs.work.iterdir())
    argv = {
        "merge": ["merge", inputs.base, inputs.adapter, "-o", out, "--force"],
        "convert": ["convert", inputs.adapter, "-o", out, "--to", "kohya", "--base", inputs.base, "--force"],
        "truncate": ["truncate", inputs.adapter, "-o", out, "--rank", "4", "--force"],
    }[command]
    r = cli(*argv)
    msg = f"exit {r.code}\n{r.stderr}"
    assert r.code == 2, msg
    assert 1 <= len(r.stderr_lines) <= 2 and r.stderr_lines[0].startswith("error: "), msg
    assert said in r.stderr_lines[0], msg
    shown = out.replace("\n", "\\n")
    assert shown in r.stderr_lines[0] or kind == "dot", msg
    assert sorted(p.name for p in inputs.work.iterdir()) == before  # nothing made, nothing left
    assert not [p for p in inputs.work.rglob("*") if "loractl-" in p.name]
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "out, said",
    [("readme.txt", "is not a folder"), ("/proc/loractl-fuzz", "cannot be made"), ("a" * 300, "File name too long")],
    ids=["under-a-file", "proc", "folder-name-too-long"],
)
def test_a_recipe_output_that_cannot_be_written_is_one_clear_error(inputs, tools, out, said):
    """A recipe's output folder under a file is refused before any step runs; one that cannot be
    made (/proc) fails its step: exit 2, one line naming the recipe and the output, nothing written."""
    recipe = inputs.work / "recipe.toml"
    recipe.write_text(
        f'[vars]\nout = "build"\n\n[[step]]\nname = "small"\nrun = "truncate"\nadapter = "{inputs.adapter}"\n'
        'output = "${out}/adapter-r4"\nrank = 4\n'
    )
    (inputs.root / "readme.txt").write_text("a file, not a folder")
    snap = tools.Snapshot([inputs.root, recipe])
    target = inputs.root / out if not out.startswith("/") else Path(out)
    r = tools.run_module(["run", recipe, "--set", f"out={target}"], cwd=inputs.work)
    assert r.code == 2, r.stderr
    assert len(r.stderr_lines) == 1 and r.stderr_lines[0].startswith(f"error: {recipe}:"), r.stderr
    assert said in r.stderr and str(target) in r.stderr, r.stderr
    assert sorted(p.name for p in inputs.work.iterdir()) == ["recipe.toml"]
    assert not os.path.lexists(target / "adapter-r4")
    snap.assert_unchanged()


def test_a_control_character_in_a_path_cannot_spread_an_error_over_lines(cli, inputs, tools):
    """Every error line is one line: a path with a newline, a carriage return or an escape sequence is
    shown escaped as Python writes it (cli/_errors.one_line), whatever the error."""
    missing = inputs.root / "no\nsuch\r\x1b[2Jadapter"
    out = inputs.work / "merged"
    snap = tools.Snapshot([inputs.root])
    r = cli("merge", inputs.base, missing, "-o", out)
    assert r.code == 2, r.stderr
    assert len(r.stderr.splitlines()) <= 2 and r.stderr_lines[0].startswith("error: "), repr(r.stderr)
    assert "no\\nsuch\\r\\x1b[2Jadapter" in r.stderr_lines[0], repr(r.stderr)
    assert "\x1b" not in r.stderr and "\r" not in r.stderr
    assert not out.exists()
    snap.assert_unchanged()


# --------------------------------------------------------------------------------------------
# 14. odd values the fuzzer (tests/fuzz) put in the files loractl reads
# --------------------------------------------------------------------------------------------
def _set_config(path: Path, key: str, raw: str) -> None:
    """Set ``key`` of a JSON file to the JSON text ``raw`` (``-Infinity`` included, as Python reads it)."""
    text = path.read_text()
    cfg = json.loads(text)
    cfg[key] = "@@RAW@@"
    path.write_text(json.dumps(cfg, indent=2).replace('"@@RAW@@"', raw))


BASE_CONFIG_VALUES = {
    "heads-minus-infinity": ("num_attention_heads", "-Infinity"),
    "heads-zero": ("num_attention_heads", "0"),
    "kv-heads-a-string": ("num_key_value_heads", '"2"'),
    "layers-a-fraction": ("num_hidden_layers", "1.5"),
    "layers-huge": ("num_hidden_layers", "1e300"),
    "architectures-a-number": ("architectures", "5"),
    "architectures-of-numbers": ("architectures", "[1, 2]"),
}


@pytest.mark.parametrize("case", list(BASE_CONFIG_VALUES), ids=list(BASE_CONFIG_VALUES))
def test_base_config_count_or_architecture_of_the_wrong_kind(cli, inputs, tools, bad_input, case):
    """convert --to gguf reads the base's architecture, layer and head counts: a count that is not a
    positive integer (-Infinity was an OverflowError, exit 3) or architectures that are not a list of
    class names is exit 2 naming config.json and the key."""
    key, raw = BASE_CONFIG_VALUES[case]
    _set_config(inputs.base / "config.json", key, raw)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "a.gguf"
    r = cli("convert", inputs.adapter, "-o", out, "--to", "gguf", "--base", inputs.base)
    bad_input(r, output=out, snapshot=snap, names=[inputs.base / "config.json"])
    assert key in r.stderr_lines[0], r.stderr


def test_base_config_heads_minus_infinity_when_checking_a_gguf_adapter(cli, inputs, tools, bad_input):
    """The fuzzer's case: `check lora.gguf --target vllm --base BASE` reads the base's head counts to
    undo llama.cpp's q/k permutation (an OverflowError, exit 3). check reports what it cannot read
    as an integrity finding (exit 1) naming config.json and the key."""
    gguf = inputs.root / "lora.gguf"
    assert cli("convert", inputs.adapter, "-o", gguf, "--to", "gguf", "--base", inputs.base).code == 0
    _set_config(inputs.base / "config.json", "num_attention_heads", "-Infinity")
    snap = tools.Snapshot([inputs.root])
    r = cli("check", gguf, "--target", "vllm", "--base", inputs.base, "--json")
    assert r.code == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert not doc["ok"] and [f["code"] for f in doc["findings"]] == ["integrity"], r.stdout
    message = doc["findings"][0]["message"]
    assert str(inputs.base / "config.json") in message and "num_attention_heads" in message, message
    snap.assert_unchanged()


def test_base_config_tie_word_embeddings_not_a_boolean(cli, inputs, tools, bad_input):
    _set_config(inputs.base / "config.json", "tie_word_embeddings", '"yes"')
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[inputs.base / "config.json"])
    assert "tie_word_embeddings" in r.stderr_lines[0], r.stderr


def _empty_first(path: Path, suffix: str) -> str:
    """Make the first tensor of ``path`` whose name ends with ``suffix`` empty (its rank 0); its name."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[name] = torch.zeros(0, tensors[name].shape[1], dtype=tensors[name].dtype)
    save_file(tensors, str(path), metadata=meta)
    return name


def test_loralib_adapter_with_an_empty_factor(cli, inputs, tools, bad_input):
    """A loralib lora_A of shape [0, 64] (a ZeroDivisionError, exit 3, in inspect) is exit 2 naming
    the file and the tensor."""
    loralib = inputs.root / "loralib.safetensors"
    r = cli("convert", inputs.adapter, "-o", loralib, "--to", "loralib")
    assert r.code == 0, r.stderr
    name = _empty_first(loralib, "lora_A")
    snap = tools.Snapshot([inputs.root])
    r = cli("inspect", loralib, loralib)
    bad_input(r, output=inputs.work / "nothing", snapshot=snap, names=[loralib])
    assert name in r.stderr_lines[0] and "empty" in r.stderr_lines[0], r.stderr


def test_peft_adapter_with_an_empty_factor(cli, inputs, tools, bad_input):
    weights = inputs.adapter / ADAPTER_FILE
    name = _empty_first(weights, "lora_A.weight")
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter])
    module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert module in r.stderr_lines[0], r.stderr


def _recipe(inputs, text: str | None = None) -> Path:
    recipe = inputs.work / "recipe.toml"
    if text is None:
        text = (
            f'[[step]]\nname = "small"\nrun = "truncate"\nadapter = "{inputs.adapter}"\n'
            'output = "build/adapter-r4"\nrank = 4\n'
        )
    recipe.write_text(text)
    return recipe


@pytest.mark.parametrize("kind", ["dev-zero", "dev-urandom", "fifo", "folder", "nested", "huge"])
def test_a_recipe_that_is_not_a_toml_file(inputs, tools, kind):
    """A recipe that is a link to /dev/zero (a MemoryError, exit 3) or /dev/urandom, a FIFO, a
    folder, TOML nested 10,000 deep (a RecursionError, exit 3), or too large a file: exit 2, one line
    naming the recipe, nothing written. Run in a real process (a FIFO must not block)."""
    recipe = inputs.work / "recipe.toml"
    if kind == "dev-zero":
        recipe.symlink_to("/dev/zero")
    elif kind == "dev-urandom":
        recipe.symlink_to("/dev/urandom")
    elif kind == "fifo":
        os.mkfifo(recipe)
    elif kind == "folder":
        recipe.mkdir()
    elif kind == "nested":
        recipe.write_text("x = " + "[" * 10_000 + "]" * 10_000 + "\n")
    elif kind == "huge":
        recipe.write_text("# " + "x" * 11_000_000 + "\n")
    snap = tools.Snapshot([inputs.root])
    before = sorted(p.name for p in inputs.work.iterdir())
    r = tools.run_module(["run", recipe], cwd=inputs.work, timeout=120)
    assert r.code == 2, r.stderr
    assert 1 <= len(r.stderr_lines) <= 2 and r.stderr_lines[0].startswith(f"error: {recipe}"), r.stderr
    assert sorted(p.name for p in inputs.work.iterdir()) == before
    snap.assert_unchanged()


def test_a_config_file_nested_too_deeply(inputs, tools):
    """./loractl.toml nested 10,000 deep: exit 2 naming it, not a RecursionError."""
    config = inputs.work / "loractl.toml"
    config.write_text("x = " + "[" * 10_000 + "]" * 10_000 + "\n")
    out = inputs.work / "merged"
    r = tools.run_module(["merge", inputs.base, inputs.adapter, "-o", out], cwd=inputs.work)
    assert r.code == 2, r.stderr
    assert 1 <= len(r.stderr_lines) <= 2 and str(config) in r.stderr_lines[0], r.stderr
    assert "nested" in r.stderr_lines[0], r.stderr
    assert not out.exists()


def test_convert_pad_rank_beyond_the_module(cli, inputs, tools, bad_input):
    """--pad-rank 2**40 tried to allocate 756 TB (a RuntimeError of torch's allocator, exit 3): a
    pad rank above a module's larger dimension is exit 2 naming the adapter and the module."""
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "padded"
    r = cli("convert", inputs.adapter, "-o", out, "--to", "peft", "--pad-rank", str(2**40))
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter])
    assert "--pad-rank 1099511627776" in r.stderr_lines[0] and "module" in r.stderr_lines[0], r.stderr


def test_gguf_tensor_offset_past_2_to_the_64(cli, inputs, tools, bad_input):
    """A GGUF tensor's data offset of 2**64 - 1 made the gguf reader print numpy's RuntimeWarning
    (overflow) on stderr before loractl's error: only the one error line now."""
    from tests.fuzz.mutate_gguf import fields

    gguf = inputs.root / "lora.gguf"
    assert cli("convert", inputs.adapter, "-o", gguf, "--to", "gguf", "--base", inputs.base).code == 0
    raw = bytearray(gguf.read_bytes())
    field = next(f for f in fields(bytes(raw))[0] if f.what == "offset")
    struct.pack_into(field.fmt, raw, field.offset, 2**64 - 1)
    gguf.write_bytes(bytes(raw))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "out.safetensors"
    r = tools.run_module(["convert", gguf, "-o", out, "--to", "peft", "--base", inputs.base])
    bad_input(r, output=out, snapshot=snap, names=[gguf])
    assert "Warning" not in r.stderr, r.stderr


def test_a_recipe_step_writing_inside_a_later_steps_input(inputs, tools):
    """Step 'small' writes into the base folder that step 'merged' reads (force = true): exit 2
    naming the recipe, the step and the base, before any step runs; the base is untouched."""
    recipe = inputs.work / "recipe.toml"
    recipe.write_text(
        f'[[step]]\nname = "small"\nrun = "truncate"\nadapter = "{inputs.adapter}"\n'
        f'output = "{inputs.base}/sub"\nrank = 4\nforce = true\n\n'
        f'[[step]]\nname = "merged"\nrun = "merge"\nbase = "{inputs.base}"\nadapters = ["@small"]\n'
        'output = "build/merged"\n'
    )
    snap = tools.Snapshot([inputs.root, recipe])
    r = tools.run_module(["run", recipe], cwd=inputs.work)
    assert r.code == 2, r.stderr
    assert len(r.stderr_lines) <= 2 and r.stderr_lines[0].startswith(f"error: {recipe}:"), r.stderr
    assert "'small'" in r.stderr_lines[0] and str(inputs.base) in r.stderr_lines[0], r.stderr
    assert sorted(p.name for p in inputs.work.iterdir()) == ["recipe.toml"]
    assert not (inputs.base / "sub").exists()
    snap.assert_unchanged()


def test_a_recipe_input_with_a_name_too_long(inputs, tools):
    """A step's base named by 300 characters (an OSError ENAMETOOLONG, exit 3): exit 2 naming the
    recipe, its line and the step, nothing written."""
    recipe = inputs.work / "recipe.toml"
    recipe.write_text(
        f'[[step]]\nname = "gate"\nrun = "check"\nadapter = "{inputs.adapter}"\nbase = "{"x" * 300}"\n'
    )
    snap = tools.Snapshot([inputs.root, recipe])
    r = tools.run_module(["run", recipe], cwd=inputs.work)
    assert r.code == 2, r.stderr
    assert len(r.stderr_lines) <= 2 and r.stderr_lines[0].startswith(f"error: {recipe}:5: step 'gate'"), r.stderr
    assert sorted(p.name for p in inputs.work.iterdir()) == ["recipe.toml"]
    snap.assert_unchanged()


def test_lora_factors_of_different_dimensions(cli, inputs, tools, bad_input):
    """lora_B reshaped to [out, r, 1] beside a 2-D lora_A (a matmul RuntimeError, exit 3, in
    merge): exit 2 naming the file, the module and both shapes."""
    weights = inputs.adapter / ADAPTER_FILE
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[name] = tensors[name].unsqueeze(-1).contiguous()
    save_file(tensors, str(weights), metadata=meta)
    cfg = json.loads((inputs.adapter / "adapter_config.json").read_text())
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[weights])
    module = name.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    assert module in r.stderr_lines[0] and "do not make a low-rank pair" in r.stderr_lines[0], r.stderr
    assert cfg["r"] == tensors[name].shape[1]


def test_dora_magnitude_of_the_wrong_size(cli, inputs, tools, bad_input):
    """A lora_magnitude_vector [3, 5] added to a module with 64 outputs (a broadcasting RuntimeError
    in merge, exit 3): exit 2 naming the file, the module and the shape."""
    weights = inputs.adapter / ADAPTER_FILE
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(weights))
    a = next(k for k in sorted(tensors) if k.endswith("mlp.down_proj.lora_A.weight"))
    module = a.removesuffix(".lora_A.weight")
    tensors[module + ".lora_magnitude_vector"] = torch.ones(3, 5, dtype=tensors[a].dtype)
    save_file(tensors, str(weights), metadata=meta)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    bad_input(r, output=out, snapshot=snap, names=[weights])
    assert module.removeprefix("base_model.model.") in r.stderr_lines[0], r.stderr
    assert "lora_magnitude_vector [3, 5]" in r.stderr_lines[0], r.stderr


def test_a_base_value_beyond_the_output_dtype_names_the_base_file(cli, inputs, tools, bad_input):
    """A base weight of 1e38 (no adapter touches model.embed_tokens) written with --dtype fp16
    overflows to Inf: refused, and the error names the base file holding the tensor (it named only
    the tensor)."""
    shard = next(
        inputs.base / s for s in (SHARD1, SHARD2) if "model.embed_tokens.weight" in load_file(str(inputs.base / s))
    )
    _resave_with(shard, "model.embed_tokens.weight", (0, 0), 1e38)
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--dtype", "fp16")
    bad_input(r, output=out, snapshot=snap, names=[shard])
    assert r.stderr_lines[0].startswith(f"error: {shard}: tensor 'model.embed_tokens.weight'"), r.stderr


# --------------------------------------------------------------------------------------------
# found by the final 5,000-case fuzz run (seed 23)
# --------------------------------------------------------------------------------------------
def test_combine_seed_beyond_torchs_range(cli, inputs, tools, bad_input):
    """--seed 2**64 gave torch's "Overflow when unpacking long long" naming no option (case 1572)."""
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "c"
    r = cli("combine", inputs.adapter, inputs.adapter, "-o", out, "--method", "dare-linear", "--density", "0.5",
            "--seed", str(2**64))  # fmt: skip
    bad_input(r, output=out, snapshot=snap, names=["--seed"])


def test_combine_of_updates_that_overflow(cli, inputs, tools, bad_input):
    """alpha_pattern {".*": 1e308} made the weighted sum infinite and torch's SVD raised LinAlgError
    (exit 3, case 955): exit 2 naming the adapters and the module."""
    cfg = inputs.adapter / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    doc["alpha_pattern"] = {".*": 1e308}
    cfg.write_text(json.dumps(doc))
    snap = tools.Snapshot([inputs.root])
    out = inputs.work / "c"
    r = cli("combine", inputs.adapter, inputs.adapter, "-o", out, "--method", "ties", "--density", "0.9")
    bad_input(r, output=out, snapshot=snap, names=[inputs.adapter])
    assert "module" in r.stderr_lines[0] and "not finite" in r.stderr_lines[0], r.stderr


def test_similarity_base_weight_holding_inf(cli, inputs, tools, bad_input):
    """A base weight holding inf made the amplification's SVD fail to converge (exit 3, case 1525):
    exit 2 naming the shard and the tensor."""
    shard = next(p for p in sorted(inputs.base.glob("*.safetensors")) if "q_proj" in " ".join(load_file(p)))
    tensors = load_file(shard)
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key][0, :3] = float("inf")
    save_file(tensors, str(shard), metadata=meta)
    snap = tools.Snapshot([inputs.root])
    r = cli("similarity", inputs.adapter, "--base", inputs.base, "--json")
    bad_input(r, output=inputs.work / "none", snapshot=snap, names=[shard.name])
    assert key in r.stderr_lines[0], r.stderr


def test_recipe_output_holding_a_nul_character(cli, inputs, tools, bad_input, tmp_path):
    """A recipe output "build/a\\u0000b" reached os.path.realpath (ValueError, exit 3, cases 288,
    1123, 4915): exit 2 naming the recipe's step and the path."""
    recipe = inputs.root / "recipe.toml"
    recipe.write_text(
        f'[[step]]\nname = "small"\nrun = "truncate"\nadapter = "{inputs.adapter}"\nrank = 4\n'
        'output = "build/a\\u0000b"\n'
    )
    snap = tools.Snapshot([inputs.root])
    r = cli("run", recipe)
    bad_input(r, output=inputs.root / "build", snapshot=snap, names=["recipe.toml"])
    assert "NUL" in r.stderr_lines[0], r.stderr


def test_gguf_output_past_the_file_size_limit(inputs, tools, tmp_path):
    """The gguf package's short write under RLIMIT_FSIZE ("1376 requested and 0 written", an OSError
    without errno: exit 3, case 466) is the usual disk error: exit 2 naming the output, nothing left."""
    out = inputs.work / "a.gguf"
    snap = tools.Snapshot([inputs.root])

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {k: v for k, v in os.environ.items() if k != "LORACTL_DEBUG"}
    p = subprocess.run(
        [sys.executable, "-m", "loractl", "convert", str(inputs.adapter), "-o", str(out), "--to", "gguf",
         "--base", str(inputs.base)],
        capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300,
    )  # fmt: skip
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[0].startswith("error: ") and "a.gguf" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not out.exists()
    assert tools.leftovers(inputs.work) == []
    snap.assert_unchanged()


def test_base_config_model_type_not_a_string_merges(cli, inputs):
    """config.json "model_type": [] was looked up in a dict (TypeError, exit 3, case 2040); a model type
    that is not a string is simply no known mixture of experts."""
    cfg = inputs.base / "config.json"
    doc = json.loads(cfg.read_text())
    doc["model_type"] = []
    cfg.write_text(json.dumps(doc))
    r = cli("merge", inputs.base, inputs.adapter, "-o", inputs.work / "m")
    assert r.code == 0, r.stderr


def test_similarity_default_j_beyond_the_basis(tmp_path):
    """A loralib module of 8 slices of rank 8 on an 8-wide weight (rank 64 > 8 dimensions): the default
    j (its rank) was beyond the overlap matrix (ValueError, exit 3, case 4344); φ is taken over all of it."""
    from loractl import api

    g = torch.Generator().manual_seed(0)
    f = tmp_path / "loralib.safetensors"
    save_file({"m.v_proj.lora_A": torch.randn(64, 8, generator=g), "m.v_proj.lora_B": torch.randn(32, 8, generator=g)}, str(f))
    r = api.similarity(f, f, i=4, format="loralib")
    assert [round(m.phi, 6) for m in r.modules] == [1.0]


def test_similarity_base_amplification_against_a_zero_weight_in_json(cli, inputs):
    """A zero base weight makes ‖UᵀWV‖ zero and the amplification infinite; `--json` raised
    "Out of range float values are not JSON compliant" (exit 3, fuzz seed 31 case 582): it is null."""
    shard = next(p for p in sorted(inputs.base.glob("*.safetensors")) if "o_proj" in " ".join(load_file(p)))
    tensors = load_file(shard)
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.o_proj.weight"))
    tensors[key].zero_()
    save_file(tensors, str(shard), metadata=meta)
    r = cli("similarity", inputs.adapter, "--base", inputs.base, "--json")
    assert r.code == 0, r.stderr
    mods = {m["name"]: m for m in json.loads(r.stdout)["modules"]}
    assert mods[key.removesuffix(".weight")]["amplification"] is None
    assert all(m["amplification"] is not None for n, m in mods.items() if n != key.removesuffix(".weight"))
