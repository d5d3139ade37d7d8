"""Issue #11 "Trust", bullet 4: SIGTERM and SIGKILL (what `timeout`, `docker stop` and a cancelled
CI job send) in the middle of a real merge, in a real process.

SIGTERM: cleaned up like Ctrl-C: exit 143, one line on stderr, no temporary left, inputs intact.
SIGKILL cannot be caught: it leaves the temporary folder with partial shards and the receipt's
spool; the next run writing the same output removes them and says so.

The model (a Llama of hidden size 512, 4 layers, 2 shards, ~180 MB in float32) takes a few hundred
milliseconds to merge. To stop the merge at a known point, the test waits until the temporary
folder holds a shard, freezes the process (SIGSTOP), sends the signal, and lets it go on (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_model, make_adapter, save_base
from safetensors import safe_open

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("signals")
    model = build_model(
        "llama",
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    base = save_base(model, root / "base", max_shard_size="100MB")
    assert sorted(p.name for p in base.glob("*.safetensors")) == list(SHARDS)
    adapter = make_adapter(
        model,
        root / "lora",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return base, adapter


def _start_merge(base: Path, adapter: Path, out: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("LORACTL_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "loractl", "merge", str(base), str(adapter), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _freeze_mid_merge(proc: subprocess.Popen[str], out: Path) -> Path:
    """Wait until the temporary output folder holds a shard, then stop the process (SIGSTOP)."""
    deadline = time.monotonic() + 120
    prefix = f".{out.name}.loractl-tmp-{proc.pid}-"
    while time.monotonic() < deadline and proc.poll() is None:
        for p in out.parent.iterdir():
            if p.name.startswith(prefix) and p.is_dir() and any(p.glob("*.safetensors")):
                proc.send_signal(signal.SIGSTOP)
                return p
        time.sleep(0.001)
    out_, err = proc.communicate()
    pytest.fail(f"the merge ended (exit {proc.returncode}) before its temporary folder held a shard\n{err}")


def _inputs_state(*paths: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(f): (f.stat().st_mode, f.read_bytes()) for p in paths for f in sorted(p.rglob("*")) if f.is_file()
    }


def test_sigterm_midway_cleans_up_like_ctrl_c(big, tmp_path, tools):
    base, adapter = big
    before = _inputs_state(base, adapter)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    proc = _start_merge(base, adapter, out)
    try:
        tmp = _freeze_mid_merge(proc, out)
        assert (work / (tmp.name + ".spool")).exists(), "the receipt's spool lies beside the temporary folder"
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    msg = f"exit {proc.returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    assert proc.returncode == 143, msg
    assert stderr == "terminated (SIGTERM): nothing was written, the inputs are untouched\n", msg
    assert stdout == "", msg
    assert list(work.iterdir()) == [], msg
    assert tools.leftovers(tmp_path) == []
    assert _inputs_state(base, adapter) == before


def test_sigkill_leftovers_are_removed_by_the_next_run(big, tmp_path, tools):
    base, adapter = big
    before = _inputs_state(base, adapter)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    proc = _start_merge(base, adapter, out)
    try:
        tmp = _freeze_mid_merge(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    spool = work / (tmp.name + ".spool")
    assert tmp.is_dir() and any(tmp.glob("*.safetensors")) and spool.exists(), "SIGKILL left nothing to clean"
    assert not out.exists()

    r = tools.run_module(["merge", base, adapter, "-o", out])
    assert r.code == 0, r.stderr
    assert sorted(r.stderr_lines) == sorted(
        [
            f"note: removed stale temporary {tmp} left by process {proc.pid}",
            f"note: removed stale temporary {spool} left by process {proc.pid}",
        ]
    ), r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["merged"]
    assert tools.leftovers(tmp_path) == []
    for shard in SHARDS:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata()["loractl.operation"] == "merge"
    assert _inputs_state(base, adapter) == before


def test_a_live_runs_temporary_is_left_alone(big, tmp_path, tools):
    """A second run to the same output while the first is still writing (here: frozen) does not take
    the first run's temporary for a stale one; the first, finding the output there when it is done,
    does not replace it without --force."""
    base, adapter = big
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    proc = _start_merge(base, adapter, out)
    try:
        tmp = _freeze_mid_merge(proc, out)
        r = tools.run_module(["merge", base, adapter, "-o", out, "--no-receipt"])
        assert r.code == 0, r.stderr
        assert "stale" not in r.stderr and tmp.is_dir()
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, stderr
    assert stderr.splitlines()[0] == (
        f"error: {out}: appeared while this run was writing it (another run?); it was not replaced"
    )
    assert sorted(p.name for p in work.iterdir()) == ["merged"]
    assert not (out / "loractl.receipt").exists(), "the second run's output (--no-receipt) was replaced"
