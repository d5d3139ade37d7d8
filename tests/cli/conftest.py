"""Shared fixtures of the CLI tests: copies of the examples, running loractl, and the checks
every bad-input case must pass (exit code, short stderr naming the file, no traceback, nothing
left behind, inputs untouched)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASE_EXAMPLE = EXAMPLES / "tiny-llama"
ADAPTER_EXAMPLE = EXAMPLES / "tiny-llama-lora"
TMP_MARK = "loractl-tmp"


@dataclass
class Outcome:
    """What one run of loractl did."""

    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.strip("\n").splitlines() if self.stderr.strip() else []


@dataclass
class Inputs:
    """Private copies of the examples, under ``root`` (never the repo's examples/)."""

    root: Path  # tmp_path / "in": holds base/ and adapter/
    base: Path
    adapter: Path
    work: Path  # an empty folder for outputs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Snapshot:
    """sha256 of every file under some paths, to prove that the inputs were not modified."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.digests = self._take()
        assert self.digests, "nothing to snapshot"

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for p in self.paths:
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.is_file())
            elif p.exists():
                files.append(p)
        return files

    def _take(self) -> dict[str, str]:
        return {str(f): sha256_file(f) for f in self._files()}

    def assert_unchanged(self) -> None:
        assert self._take() == self.digests, "an input file was modified, added or removed"


def leftovers(folder: Path) -> list[str]:
    """Names of temporary files or folders loractl left in ``folder`` (recursively)."""
    if not folder.exists():
        return []
    return sorted(str(p) for p in folder.rglob("*") if TMP_MARK in p.name or "loractl-old" in p.name)


def run_module(
    args: Sequence[object], *, env: dict[str, str] | None = None, timeout: float = 300, **kwargs
) -> Outcome:
    """``python -m loractl ARGS`` in a real process."""
    full_env = dict(os.environ)
    full_env.pop("LORACTL_DEBUG", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "loractl", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kwargs,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Outcome]:
    """Run the typer app in-process with CliRunner (stdout and stderr kept apart)."""
    from loractl.cli.app import app

    monkeypatch.delenv("LORACTL_DEBUG", raising=False)

    def run(*args: object, env: dict[str, str] | None = None) -> Outcome:
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            # an exception that escaped the app entirely: make it visible in the assertion output
            stderr = result.stderr + f"\nTraceback (escaped CliRunner): {result.exception!r}"
        else:
            stderr = result.stderr
        return Outcome(result.exit_code, result.stdout, stderr)

    return run


def _copy_example(src: Path, dst: Path) -> None:
    """Copy the example's files (not hidden ones, e.g. another run's temporary files: the
    examples folder is shared with other processes)."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        shutil.copyfile(f, dst / f.name)
    assert any(dst.glob("*.safetensors")), f"no weights copied from {src}"


@pytest.fixture
def inputs(tmp_path: Path) -> Inputs:
    root = tmp_path / "in"
    root.mkdir()
    base = root / "tiny-llama"
    adapter = root / "tiny-llama-lora"
    _copy_example(BASE_EXAMPLE, base)
    _copy_example(ADAPTER_EXAMPLE, adapter)
    work = tmp_path / "work"
    work.mkdir()
    return Inputs(root=root, base=base, adapter=adapter, work=work)


def check_bad_input(
    outcome: Outcome,
    *,
    output: Path,
    snapshot: Snapshot,
    names: Sequence[object] = (),
    code: int = 2,
    output_existed: bool = False,
    loractl_error: bool = True,
) -> None:
    """The checks every bad-input case must pass.

    Args:
        outcome: the run.
        output: the ``-o`` given; it must not have been created (or, if it existed, must still be there).
        snapshot: taken of every input before the run.
        names: strings stderr must contain (file, module, tensor, shapes).
        code: the expected exit code.
        output_existed: the output existed before the run (its contents are checked by the caller).
        loractl_error: the message is loractl's own (``error: ...``), not a click usage error.
    """
    msg = f"exit {outcome.code}\n--- stdout ---\n{outcome.stdout}\n--- stderr ---\n{outcome.stderr}"
    assert outcome.code == code, msg
    assert "Traceback" not in outcome.stdout + outcome.stderr, msg
    lines = outcome.stderr_lines
    assert 1 <= len(lines) <= 4, msg
    if loractl_error:
        assert lines[0].startswith("error: "), msg
        assert all(line.startswith(("error: ", "hint: ")) for line in lines), msg
    for name in names:
        assert str(name) in outcome.stderr, f"stderr does not name {name!r}\n{msg}"
    if not output_existed:
        assert not os.path.lexists(output), f"{output} was created\n{msg}"
    assert leftovers(output.parent) == [], msg
    snapshot.assert_unchanged()


@pytest.fixture
def bad_input() -> Callable[..., None]:
    """:func:`check_bad_input`."""
    return check_bad_input


@pytest.fixture
def tools() -> SimpleNamespace:
    """The helpers of this module, for tests (conftest modules are not imported directly)."""
    return SimpleNamespace(
        Snapshot=Snapshot,
        run_module=run_module,
        leftovers=leftovers,
        sha256_file=sha256_file,
        check_bad_input=check_bad_input,
        Outcome=Outcome,
    )
