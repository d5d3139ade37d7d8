"""Safe outputs: written beside the target under a temporary name, renamed into place when complete.

An interrupted or failed run (Ctrl-C, disk full, a bad tensor midway) leaves neither a partial
output nor a temporary file, and never touches the inputs.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def _same_or_nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(target: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output that is (or contains, or lies inside) an input, or that exists without ``force``.

    Raises:
        OutputError: with the reason and what to do.
    """
    real = target.resolve()
    for inp in inputs:
        if _same_or_nested(real, Path(inp).resolve()):
            raise OutputError(
                f"{target}: the output is one of the inputs ({inp}); refusing to overwrite an input",
                hint="write to another path",
            )
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputError(
                f"{target}: already exists", hint="pass --force to replace it, or choose another -o"
            )
    if not target.parent.exists():
        raise OutputError(f"{target}: the folder {target.parent} does not exist")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(
    target: str | os.PathLike[str], *, is_dir: bool, inputs: Sequence[Path] = (), force: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block completes.

    Args:
        target: the final output (a file or a folder).
        is_dir: create the temporary path as an empty folder (else the block creates a file or a folder there).
        inputs: paths the output must not be, nor contain, nor lie inside.
        force: replace an existing target.
    """
    target = Path(target)
    check_output(target, inputs, force)
    tmp = target.parent / f".{target.name}.loractl-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if tmp.is_dir():
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync_file(f)
        elif tmp.is_file():
            _fsync_file(tmp)
        else:
            raise OutputError(f"{target}: nothing was written")
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.loractl-old-{secrets.token_hex(4)}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            _remove(old)
        _fsync_dir(target.parent)
    except OutputError as e:
        _remove(tmp)
        # name the output the user asked for, not the temporary path
        e.message = e.message.replace(str(tmp), str(target))
        e.args = (e.message,)
        raise
    except OSError as e:
        _remove(tmp)
        if e.errno in (28, 27, 122):  # ENOSPC, EFBIG, EDQUOT anywhere in the block (index, config copies...)
            raise OutputError(
                f"{target}: no space left on the device while writing it ({e.strerror})",
                hint="free some disk space or write elsewhere; nothing was left behind",
            ) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _fsync_file(f: Path) -> None:
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OutputError(f"{f}: cannot be synced to disk ({e.strerror})") from None
    finally:
        os.close(fd)
