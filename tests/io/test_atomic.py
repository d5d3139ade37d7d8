"""io/atomic: which temporaries count as stale (issue #11, bullet 4), how an output replaces
another, and how clashes with inputs are told (bullet 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loractl.errors import OutputError
from loractl.io import atomic


def _old(path: Path) -> Path:
    """Make ``path`` look a day old (older than this process)."""
    t = time.time() - 86400
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_processs_temporaries_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    pid = _dead_pid()
    folder = tmp_path / f".merged.loractl-tmp-{pid}-0a1b2c3d"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    spool = tmp_path / f".merged.loractl-tmp-{pid}-0a1b2c3d.spool"
    spool.write_bytes(b"\0" * 100)
    lines = atomic.remove_stale(target)
    assert lines == [
        f"removed stale temporary {folder} left by process {pid}",
        f"removed stale temporary {spool} left by process {pid}",
    ]
    assert list(tmp_path.iterdir()) == []


def test_what_is_not_stale_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [
            tmp_path / f".merged.loractl-tmp-{live.pid}-0a1b2c3d",  # a live process's
            tmp_path / f".merged2.loractl-tmp-{_dead_pid()}-0a1b2c3d",  # another target's
            tmp_path / f".merged.loractl-tmp-{_dead_pid()}-nothex",  # not loractl's name
            tmp_path / f".merged.loractl-tmp-{os.getpid()}-0a1b2c3d",  # this process's pid, new
        ]
        for p in keep:
            p.mkdir()
        link = tmp_path / f".merged.loractl-tmp-{_dead_pid()}-0a1b2c3d"  # a link named like one
        link.symlink_to(tmp_path / "elsewhere")
        assert atomic.remove_stale(target) == []
        assert all(p.is_dir() for p in keep) and link.is_symlink()
    finally:
        live.kill()
        live.wait()


def test_an_old_temporary_with_this_processs_pid_is_a_former_process_s(tmp_path: Path) -> None:
    """In a container every run may be pid 1: a temporary with this pid that this process did not
    make, older than this process, was left by an earlier one."""
    mine = atomic.temp_name(tmp_path / "merged")
    other = _old_dir(tmp_path / f".merged.loractl-tmp-{os.getpid()}-00ff00ff")
    mine.mkdir()
    _old(mine)
    lines = atomic.remove_stale(tmp_path / "merged")
    assert lines == [f"removed stale temporary {other} left by process {os.getpid()}"]
    assert mine.is_dir()


def _old_dir(p: Path) -> Path:
    p.mkdir()
    return _old(p)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_another_users_temporary_is_left_alone(tmp_path: Path) -> None:
    p = tmp_path / f".merged.loractl-tmp-{_dead_pid()}-0a1b2c3d"
    p.mkdir()
    os.chown(p, 12345, 12345)
    assert atomic.remove_stale(tmp_path / "merged") == []
    assert p.is_dir()


def test_a_replaced_output_left_midway_is_put_back(tmp_path: Path) -> None:
    """Killed between the two renames of a replacement (where renameat2 is missing): the target is
    gone and the old output sits under its old-name; it is put back, never deleted."""
    pid = _dead_pid()
    old = tmp_path / f".merged.loractl-old-{pid}-0a1b2c3d"
    old.mkdir()
    (old / "config.json").write_text("{}")
    lines = atomic.remove_stale(tmp_path / "merged")
    assert lines == [
        f"restored {tmp_path / 'merged'} from {old}, left by process {pid} (stopped while replacing it)"
    ]
    assert (tmp_path / "merged" / "config.json").read_text() == "{}"
    # once the target is there, a leftover old output is garbage
    old.mkdir()
    assert atomic.remove_stale(tmp_path / "merged") == [
        f"removed stale temporary {old} left by process {pid}"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_a_folder_leaving_nothing_behind(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda a, b, flag: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.atomic_output(target, is_dir=True, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_without_force_an_output_that_appeared_meanwhile_is_not_replaced(
    tmp_path: Path, monkeypatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda a, b, flag: False)
    target = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        with atomic.atomic_output(target, is_dir=False) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"another run's")
    assert target.read_bytes() == b"another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_clash_tells_is_contains_and_inside(tmp_path: Path) -> None:
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "w.safetensors").write_bytes(b"x")
    assert atomic.clash(ad / "w.safetensors", [ad / "w.safetensors"]) == (ad / "w.safetensors", "is")
    assert atomic.clash(tmp_path, [ad / "w.safetensors"]) == (ad / "w.safetensors", "contains")
    assert atomic.clash(ad / "new", [ad]) == (ad, "inside")
    assert atomic.clash(tmp_path / "elsewhere", [ad]) is None
    assert atomic.clash(ad / "w2.safetensors", [ad / "w.safetensors"]) is None  # a sibling file is fine
