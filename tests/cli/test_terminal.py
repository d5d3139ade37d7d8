"""A real terminal: progress bars appear on a pty and never in a pipe; bash completion in a real bash."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
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


def _on_pty(
    *args: str, columns: int | None = None, stdout: bool = False, cwd: Path | None = None
) -> tuple[int, bytes, bytes]:
    """Run ``python -m loractl ARGS`` (in ``cwd``) with stderr (and with ``stdout``, stdout too) on
    a pseudo-terminal ``columns`` wide; (exit code, stdout, what the terminal received)."""
    master, slave = pty.openpty()
    if columns is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = _env()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loractl", *args],
        stdin=slave,
        stdout=slave if stdout else subprocess.PIPE,
        stderr=slave,
        env=env,
        close_fds=True,
        cwd=cwd,
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
def test_bash_completion_of_format_choices_and_no_hidden_device() -> None:
    assert _bash_complete("loractl merge --format ") == ["peft", "kohya", "diffusers", "loralib", "gguf"]
    assert _bash_complete("loractl check x --format k") == ["kohya"]
    assert _bash_complete("loractl merge --dev") == []  # --device is hidden until it works


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


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _frames(terminal: bytes) -> list[str]:
    """What the terminal showed, one entry per line drawn (ANSI escapes removed, split at \\r and \\n)."""
    text = ANSI.sub(b"", terminal).decode()
    return [f.rstrip() for f in re.split(r"[\r\n]", text) if f.strip()]


@pytest.mark.parametrize("columns", [40, 80, 120])
def test_progress_bar_fits_the_terminal(tmp_path: Path, columns: int) -> None:
    code, _, err = _on_pty(*_merge_args(tmp_path), columns=columns)
    assert code == 0
    bars = [f for f in _frames(err) if f.startswith("merging")]
    assert bars, err
    assert all(len(f) <= columns for f in _frames(err)), _frames(err)
    # every frame of the bar is one line: what it shows after the bar is on the same line
    assert all(f.endswith(("%", "0:00:00", "0:00:01", "0:00:02", "-:--:--")) for f in bars), bars
    if columns >= 80:
        assert any(" kB " in f or " MB " in f for f in bars), bars  # size and speed when there is room


@pytest.mark.parametrize(
    "args, word", [(("merge",), "merging"), (("convert",), "converting"), (("verify",), "verifying")]
)
def test_progress_bar_starts_with_its_total(tmp_path: Path, args: tuple[str, ...], word: str) -> None:
    """No frame of a bar of unknown length ("0/?", a pulsing bar): the first frame knows the total."""
    if args[0] == "merge":
        argv = _merge_args(tmp_path)
    elif args[0] == "verify":
        assert subprocess.run([sys.executable, "-m", "loractl", *_merge_args(tmp_path), "-q"], env=_env()).returncode == 0
        argv = ["verify", str(tmp_path / "m"), str(EXAMPLES / "tiny-llama-lora"), "--base", str(EXAMPLES / "tiny-llama")]
    else:
        argv = ["convert", str(EXAMPLES / "tiny-llama-lora"), "--to", "peft", "-o", str(tmp_path / "c")]
    code, _, err = _on_pty(*argv, columns=120)
    assert code == 0
    bars = [f for f in _frames(err) if f.startswith(word)]
    # a total of "?" is a bar of unknown length; a speed of "?" (a frame drawn before the second update) is not
    assert bars and not any(re.search(r"/\s*\?", f) for f in bars), bars
    if word == "converting":
        assert all("/14" in f for f in bars), bars


def test_extract_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    """extract draws its bar (bytes read, total known from the start) on a terminal, never with --json."""
    from loractl import api

    api.merge(EXAMPLES / "tiny-llama", [EXAMPLES / "tiny-llama-lora"], tmp_path / "m", receipt=False)
    argv = ["extract", str(EXAMPLES / "tiny-llama"), str(tmp_path / "m"), "--rank", "8", "-o"]
    code, _, err = _on_pty(*argv, str(tmp_path / "e"), columns=120)
    assert code == 0
    bars = [f for f in _frames(err) if f.startswith("extracting")]
    assert bars and "━".encode() in err and all("?" not in f for f in bars), err
    code, out, err = _on_pty(*argv, str(tmp_path / "e2"), "--json", columns=120)
    assert code == 0 and b"extracting" not in err and b'"command": "extract"' in out


def _check_rank4(tmp_path: Path, columns: int) -> list[str]:
    """``loractl check tiny-llama-lora --max-rank 4`` (14 modules of rank 8) on a terminal."""
    shutil.copytree(EXAMPLES / "tiny-llama-lora", tmp_path / "tiny-llama-lora")
    code, _, term = _on_pty(
        "check", "tiny-llama-lora", "--max-rank", "4", columns=columns, stdout=True, cwd=tmp_path
    )
    assert code == 1
    return _frames(term)


@pytest.mark.parametrize("columns", [80, 200])
def test_check_keeps_module_names_and_fix_commands_whole(tmp_path: Path, columns: int) -> None:
    lines = _check_rank4(tmp_path, columns)
    fix = "loractl truncate tiny-llama-lora -o OUT --rank 4"
    modules = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    for m in modules:
        assert any(m in line for line in lines), lines
    assert sum(fix in line for line in lines) == 14, lines  # one whole fix per finding
    assert all(len(line) <= columns for line in lines), lines
    assert "…" not in "".join(lines)
    if columns == 200:  # a table: module, message and fix on one line
        assert any(modules[0] in line and fix in line for line in lines), lines


def test_findings_table_wraps_the_message_not_the_module_or_fix() -> None:
    from rich.console import Console

    from loractl.checks import Finding
    from loractl.cli.check import findings_table

    module = "base_model.model.encoder.layer.11.attention.self.query_key_value"
    fix = "loractl truncate /data/adapters/some-long-name/adapter -o OUT --rank 16"
    message = "module has rank 64, above --max-rank 16; " * 4
    findings = [Finding("rank-too-large", "error", module, message, fix), Finding("x", "info", None, "short")]
    for width in (80, 120, 240):
        con = Console(width=width, record=True, soft_wrap=True, color_system=None)
        con.print(findings_table(findings, width))
        lines = con.export_text().splitlines()
        assert any(module in line for line in lines) and any(fix in line for line in lines), lines
        assert all(len(line.rstrip()) <= width for line in lines), lines
        assert "…" not in con.export_text()
        if width == 240:
            assert any(module in line and fix in line for line in lines), lines  # one table row
            assert sum("module has rank 64" in line for line in lines) > 1  # the message wrapped
