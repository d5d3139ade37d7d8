"""Running one loractl command: in a child forked from a warm server, or as a real subprocess.

A fresh ``python -m loractl`` spends ~1.5 s importing torch; the fuzzer runs thousands of commands.
:class:`ForkRunner` imports the CLI, the library and torch once (and runs no torch operation, so
no thread pool exists yet), then forks a child per command that sets its folder, arguments,
environment and limits and calls the console script's own entry point (``loractl.cli.app:main``),
which leaves with ``os._exit`` as the real process does. :class:`SubprocessRunner` runs the real
``python -m loractl`` the same way; ``--subprocess`` uses it, and ``--compare`` checks on a sample
that both give the same exit code and output.
"""

from __future__ import annotations

import importlib
import os
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# modules the commands import late: imported once in the server instead of in every child
# (besides every module of loractl itself)
WARM_IMPORTS = (
    "typer._adapters",
    "typer._click.decorators",
    "pydantic",
    "zoneinfo",
    "sysconfig",
    "rich.table",
    "rich.console",
    "safetensors.torch",
    "huggingface_hub",
    "gguf",
    "peft",  # check --target peft asks PEFT itself: 1-10 s of imports per command otherwise
)
CAPTURE = 1 << 20  # bytes of stdout and of stderr kept per command
# address space per command: a header asking for a petabyte fails, the machine does not
MEMORY_LIMIT = 3 << 30


@dataclass
class Outcome:
    code: int  # the exit code; -N when killed by signal N
    stdout: str
    stderr: str
    seconds: float
    hang: bool = False


def command_env(top: Path) -> dict[str, str]:
    """Variables set for every command (on top of the fuzzer's own environment)."""
    return {
        "TMPDIR": str(top / "tmp"),
        "LORACTL_DEBUG": "",
        "COLUMNS": "120",
        "NO_COLOR": "1",
    }


def global_env(run_root: Path) -> dict[str, str]:
    """Variables that must be set before loractl, torch and huggingface_hub are imported."""
    return {
        "HF_HUB_OFFLINE": "1",  # an argument that looks like org/name must not reach the network
        "HF_HOME": str(run_root / "hf-home"),
        "OMP_NUM_THREADS": "1",  # else OpenBLAS starts a thread at import, and a fork copies only one
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
    }


def _limits(fsize: int | None) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if fsize is not None:
        # a full disk, deterministically: writes past `fsize` bytes fail with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except ProcessLookupError:
            continue
        except PermissionError:
            continue


def threads() -> int:
    """Threads of this process (a fork copies only the calling one)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        import threading

        return threading.active_count()


class ForkRunner:
    """Import loractl once; fork a child per command."""

    name = "fork"

    def __init__(self) -> None:
        import torch  # noqa: F401
        import typer

        import loractl
        import loractl.api  # noqa: F401  (everything a command imports late, imported once here)
        import loractl.cli.app  # noqa: F401
        import loractl.recipe  # noqa: F401

        typer.main.get_command(loractl.cli.app.app)  # builds the click command: imports typer's parsers
        import pkgutil

        mods = [
            m.name
            for m in pkgutil.walk_packages(loractl.__path__, "loractl.")
            if not m.name.endswith("__main__")
        ]
        for name in (*mods, *WARM_IMPORTS):
            try:
                importlib.import_module(name)
            except ImportError:  # pragma: no cover - an optional part not installed
                pass
        n = threads()
        if n != 1:
            raise RuntimeError(f"the fork server has {n} threads after importing loractl; use --subprocess")

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float, fsize: int | None = None
    ) -> Outcome:
        sys.stdout.flush()
        sys.stderr.flush()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgid(0, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                for fd in (out_r, out_w, err_r, err_w):
                    os.close(fd)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                os.chdir(cwd)
                os.environ.update(env)
                import tempfile

                tempfile.tempdir = None  # the parent's cached choice must not hide TMPDIR
                _limits(fsize)
                sys.argv = ["loractl", *argv]
                from loractl.cli.app import main

                main()  # leaves with os._exit once torch is loaded; SystemExit otherwise
                code = 0
            except SystemExit as e:  # what the interpreter would do with it
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    sys.stderr.write(f"{e.code}\n")
                    code = 1
            except BaseException:
                import traceback

                traceback.print_exc()  # an exception escaping main(): Python prints it and exits 1
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                except BaseException:
                    pass
                os._exit(code & 0xFF)
        os.close(out_w)
        os.close(err_w)
        streams, hang, status = _collect(pid, {out_r: bytearray(), err_r: bytearray()}, t0 + timeout)
        return Outcome(
            os.waitstatus_to_exitcode(status),
            _text(streams[out_r]),
            _text(streams[err_r]),
            time.monotonic() - t0,
            hang,
        )


def _text(b: bytearray) -> str:
    return bytes(b).decode("utf-8", "replace")


def _collect(
    pid: int, streams: dict[int, bytearray], deadline: float
) -> tuple[dict[int, bytearray], bool, int]:
    """Read the child's stdout and stderr until they close and it exits; kill its process group at
    ``deadline``. Returns (what was read, killed, wait status)."""
    pidfd = os.pidfd_open(pid)
    open_fds = set(streams)
    exited = hang = False
    status = 0
    try:
        while open_fds or not exited:
            left = deadline - time.monotonic()
            if left <= 0 and not hang:
                hang = True
                _kill_group(pid)
                deadline = time.monotonic() + 5  # the killed group's pipes close at once
            ready, _, _ = select.select([*open_fds, *([] if exited else [pidfd])], [], [], max(left, 0.01))
            for fd in ready:
                if fd == pidfd:
                    _, status = os.waitpid(pid, 0)
                    exited = True
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    open_fds.discard(fd)
                elif len(streams[fd]) < CAPTURE:
                    streams[fd] += chunk
            if hang and time.monotonic() > deadline:  # a grandchild holds a pipe: stop reading
                break
    finally:
        os.close(pidfd)
        for fd in streams:
            os.close(fd)
        if not exited:
            _, status = os.waitpid(pid, 0)
    return streams, hang, status


class SubprocessRunner:
    """A real ``python -m loractl`` per command."""

    name = "subprocess"

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float, fsize: int | None = None
    ) -> Outcome:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.monotonic()
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "loractl", *argv],
                cwd=cwd,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
                preexec_fn=lambda: _limits(fsize),
            )
        finally:
            os.close(out_w)
            os.close(err_w)
        streams, hang, status = _collect(p.pid, {out_r: bytearray(), err_r: bytearray()}, t0 + timeout)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped by _collect
        return Outcome(
            p.returncode, _text(streams[out_r]), _text(streams[err_r]), time.monotonic() - t0, hang
        )
