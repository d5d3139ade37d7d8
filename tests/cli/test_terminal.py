"""A real terminal: progress bars appear on a pty and never in a pipe; bash completion in a real bash."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TERM"] = "xterm-256color"
    env.pop("NO_COLOR", None)
    return env


def _read_all(
    fd: int, proc: subprocess.Popen | None = None, timeout: float = 60.0, until: bytes | None = None
) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not (until is not None and until in buf):
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            buf += data
        elif proc is not None and proc.poll() is not None:
            break
    return buf


def _on_pty(*args: str) -> tuple[int, bytes, bytes]:
    """Run ``python -m loractl ARGS`` with stderr on a pseudo-terminal; (exit code, stdout, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loractl", *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=_env(),
        close_fds=True,
    )
    os.close(slave)
    err = _read_all(master, proc)
    out = proc.stdout.read() if proc.stdout else b""
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, out, err


def _merge_args(tmp_path: Path) -> list[str]:
    """``merge`` of the bundled example into ``tmp_path/m``."""
    return [
        "merge",
        str(EXAMPLES / "tiny-llama"),
        str(EXAMPLES / "tiny-llama-lora"),
        "-o",
        str(tmp_path / "m"),
    ]


def _merge_on_pty(tmp_path: Path, *extra: str) -> tuple[int, bytes, bytes]:
    return _on_pty(*_merge_args(tmp_path), *extra)


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    code, out, err = _merge_on_pty(tmp_path)
    assert code == 0
    assert b"merging" in err and "━".encode() in err  # rich's bar, drawn on the terminal (stderr)
    assert b"merging" not in out and out.startswith(b"merged 1 adapter")


@pytest.mark.parametrize("flag", ["--json", "-q"])
def test_no_progress_bar_with_json_or_quiet(tmp_path: Path, flag: str) -> None:
    code, out, err = _merge_on_pty(tmp_path, flag)
    assert code == 0
    assert b"merging" not in err and "━".encode() not in err


def test_nothing_but_the_result_in_a_pipe(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "loractl", *_merge_args(tmp_path)], capture_output=True, env=_env()
    )
    assert p.returncode == 0
    assert p.stderr == b""
    assert p.stdout.startswith(b"merged 1 adapter") and b"\x1b[" not in p.stdout


def _bash_complete(line: str) -> list[str]:
    script = ROOT / "completions" / "loractl.bash"
    words = line.split(" ")
    code = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_loractl_completion loractl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    p = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", code], capture_output=True, text=True, env=_env()
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_of_commands_and_options() -> None:
    assert _bash_complete("loractl me") == ["merge"]
    assert _bash_complete("loractl merge --sh") == ["--shard-size"]
    assert "similarity" in _bash_complete("loractl s")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_with_a_real_tab_keypress(tmp_path: Path) -> None:
    """An interactive bash on a pty: type `loractl me<TAB>` and see the line completed to `merge`."""
    master, slave = pty.openpty()
    env = _env()
    env["PS1"] = "$ "
    env["INPUTRC"] = str(tmp_path / "inputrc")
    (tmp_path / "inputrc").write_text("set bell-style none\n")
    proc = subprocess.Popen(
        ["bash", "--norc", "--noprofile", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
        cwd=tmp_path,
    )
    os.close(slave)
    try:
        os.write(master, f"source {ROOT / 'completions' / 'loractl.bash'}\n".encode())
        _read_all(master, timeout=1.0)
        os.write(master, b"loractl me\t")
        seen = _read_all(master, timeout=15.0, until=b"merge")
        assert b"merge" in seen, seen
        os.write(master, b"\x15loractl merge --sh\t")  # ^U clears the line
        seen = _read_all(master, timeout=15.0, until=b"--shard-size")
        assert b"--shard-size" in seen, seen
    finally:
        os.write(master, b"\x15exit\n")
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(master)


def test_progress_bar_for_conversions_on_a_terminal_only(tmp_path: Path) -> None:
    args = ["convert", str(EXAMPLES / "tiny-llama-lora"), "--to", "peft", "--pad-rank", "16"]
    code, out, err = _on_pty(*args, "-o", str(tmp_path / "c1"))
    assert code == 0
    assert b"converting" in err and b"14/14" in err
    assert out.startswith(b"converted 14 modules")
    p = subprocess.run(
        [sys.executable, "-m", "loractl", *args, "-o", str(tmp_path / "c2")], capture_output=True, env=_env()
    )
    assert p.returncode == 0 and p.stderr == b"" and p.stdout.startswith(b"converted 14 modules")
