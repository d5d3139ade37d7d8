"""Safe outputs: written beside the target under a temporary name, renamed into place when complete.

An interrupted or failed run (Ctrl-C, SIGTERM, disk full, a bad tensor midway) leaves neither a
partial output nor a temporary file, and never touches the inputs. A run killed outright (SIGKILL)
cannot clean up: the next run writing the same target removes what it left (:func:`remove_stale`).

No output may be, contain or lie inside a path an operation reads (:func:`check_output`), with or
without ``force``: paths are compared resolved (symlinks, ``..``) and by (device, inode), which
also catches hard links, bind mounts and a case-insensitive filesystem's other spellings.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import OutputError

log = logging.getLogger("loractl")

#: paths protected for every output written inside a :func:`protecting` block (a recipe's own file)
_protected: ContextVar[tuple[Path, ...]] = ContextVar("loractl_protected", default=())
#: names of the temporaries this process made (a later process given the same pid is told apart)
_ours: set[str] = set()
#: no temporary of this process is older than this
_STARTED = time.time()
_TEMP_RE = re.compile(r"\.loractl-(tmp|old)-(\d+)-[0-9a-f]+(\.spool)?")
#: the longest name of a folder entry (Linux, macOS), unless the folder says otherwise
_NAME_MAX = 255
#: the longest path the kernel takes (Linux's PATH_MAX, less its NUL)
_PATH_MAX = 4095
#: what a temporary adds to the output's name: ``.NAME.loractl-tmp-PID-HEX.spool`` (Linux's longest pid)
_TEMP_EXTRA = len("..loractl-tmp-4194304-01234567.spool")


@contextmanager
def protecting(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Protect ``paths`` from every output written inside the block, as if each were an input."""
    token = _protected.set(_protected.get() + tuple(Path(p) for p in paths))
    try:
        yield
    finally:
        _protected.reset(token)


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _chain(real: Path) -> list[Path]:
    """``real`` and every folder above it."""
    return [real, *real.parents]


def clash(target: Path, protected: Iterable[str | os.PathLike[str]]) -> tuple[Path, str] | None:
    """The first protected path that ``target`` is, contains or lies inside, and which of the three.

    Both sides are resolved (symlinks, ``..``) and compared as paths, and compared by (device,
    inode) along their chains of folders, so that a hard link, a bind mount or another spelling of
    the same folder on a case-insensitive filesystem is caught too.
    """
    if "\x00" in str(target):
        raise OutputError(f"{target}: a path cannot hold a NUL character")
    real = Path(os.path.realpath(target))
    t_chain = _chain(real)
    t_ids = [_ident(p) for p in t_chain]
    t_id = t_ids[0]
    for inp in protected:
        inp = Path(inp)
        r = Path(os.path.realpath(inp))
        i_chain = _chain(r)
        i_id = _ident(r)
        if real == r or (t_id is not None and t_id == i_id):
            return inp, "is"
        if real in r.parents or (t_id is not None and t_id in [_ident(p) for p in i_chain[1:]]):
            return inp, "contains"
        if r in real.parents or (i_id is not None and i_id in t_ids[1:]):
            return inp, "inside"
    return None


def refuse_inputs(target: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (or a path protected by
    :func:`protecting`).

    Raises:
        OutputError: naming the output and the input.
    """
    found = clash(target, [*inputs, *_protected.get()])
    if found is None:
        return
    inp, how = found
    what = {
        "is": f"is an input ({inp})",
        "contains": f"contains an input ({inp})",
        "inside": f"lies inside an input ({inp})",
    }[how]
    raise OutputError(
        f"{target}: the output {what}; refusing to overwrite an input, with or without --force",
        hint="write to another path",
    )


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # a folder still to be made, or no pathconf here
        return _NAME_MAX


def check_name(target: Path) -> None:
    """Refuse an output path whose last part is no name ('.', '..', '/'), or too long a name or path
    for the filesystem once the temporary's marks are added to it.

    Raises:
        OutputError: naming the output.
    """
    target = Path(target)
    name = target.name
    if "\x00" in str(target):
        raise OutputError(f"{target}: a path cannot hold a NUL character")
    if name in ("", ".", ".."):
        raise OutputError(
            f"{target}: not a name for an output ('.', '..' and '/' name an existing folder by its place)",
            hint="give the output a new name, such as out/merged",
        )
    limit = _name_max(target.parent) - _TEMP_EXTRA
    size = len(os.fsencode(name))
    if size > limit:
        raise OutputError(
            f"{target}: the name is too long ({size} bytes; at most {limit} here, with room for the temporary beside it)",
            hint="choose a shorter name",
        )
    try:
        size = len(os.fsencode(os.path.abspath(target))) + _TEMP_EXTRA
    except OSError:  # the current folder is gone: the folder check says so
        size = 0
    if size > _PATH_MAX:
        raise OutputError(
            f"{target}: the path is too long ({size} bytes with the temporary beside it; at most {_PATH_MAX})",
            hint="choose a shorter path",
        )


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except OSError:
        return None


def _exists(p: Path) -> bool:
    """Whether ``p`` exists (a dangling link does); an OSError other than ENOENT (a name too long,
    a file as a folder, no permission) is raised."""
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    return True


def check_folder(target: Path, *, made: bool = False) -> None:
    """Refuse an output whose folder is missing (or, with ``made``, cannot be made: a part of it is
    a file) or is not a folder.

    Raises:
        OutputError: naming the output and the folder.
    """
    target = Path(target)
    folder = target.parent
    try:
        if made:  # the nearest existing folder above; the rest is made (mkdir -p)
            while folder != folder.parent and not _exists(folder):
                folder = folder.parent
        st = os.stat(folder)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise OutputError(f"{target}: the folder {folder} does not exist") from None
        if e.errno == errno.ENOTDIR:
            raise OutputError(f"{target}: {folder} is not a folder (a part of it is a file)") from None
        raise OutputError(f"{target}: the folder {folder} cannot be used ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{target}: {folder} is not a folder")


def make_folders(target: Path) -> None:
    """Make the folders above the output ``target`` (mkdir -p).

    Raises:
        OutputError: a folder cannot be made (a file in the way, ``/proc``, no permission...).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target}: its folder {target.parent} cannot be made ({e.strerror})") from None


def check_output(target: Path, inputs: Sequence[str | os.PathLike[str]], force: bool) -> None:
    """Refuse an output that is (or contains, or lies inside) an input, that exists without
    ``force``, whose name or folder cannot be used (:func:`check_name`, :func:`check_folder`).

    Raises:
        OutputError: with the reason and what to do.
    """
    target = Path(target)
    refuse_inputs(target, inputs)
    check_name(target)
    check_folder(target)
    if _lstat(target) is not None and not force:
        raise OutputError(
            f"{target}: already exists", hint="pass --force to replace it, or choose another -o"
        )


def _remove(p: Path) -> None:
    st = _lstat(p)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:  # gone already, or never ours to remove
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process, alive
        return True
    return True


def remove_stale(target: Path) -> list[str]:
    """Remove the temporaries that a process stopped by SIGKILL (or a power cut) left beside ``target``.

    A temporary is ``.{target.name}.loractl-tmp-<pid>-<hex>`` (``.spool`` for a receipt's spool,
    ``.loractl-old-<pid>-<hex>`` for a replaced output not yet removed). It is stale when it belongs
    to this user and process ``pid`` is gone (a pid equal to this process's own is stale when this
    process did not make it and it is older than this process). A replaced output is put back when
    the target is missing (the process was stopped between the two renames of a replacement).

    Returns:
        One line per temporary removed or output restored (also logged as warnings of ``loractl``).
    """
    target = Path(target)
    prefix = f".{target.name}"
    done: list[str] = []
    try:
        entries = sorted(e for e in os.listdir(target.parent) if e.startswith(prefix))
    except OSError:
        return done
    uid = os.getuid() if hasattr(os, "getuid") else None
    for name in entries:
        m = _TEMP_RE.fullmatch(name[len(prefix) :])
        if m is None:
            continue
        path = target.parent / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        pid = int(m[2])
        if pid == os.getpid():
            stale = name not in _ours and st.st_mtime < _STARTED
        else:
            stale = not _alive(pid)
        if not stale:
            continue
        if m[1] == "old" and not os.path.lexists(target):
            try:
                os.rename(path, target)
            except OSError:
                continue
            line = f"restored {target} from {path}, left by process {pid} (stopped while replacing it)"
        else:
            _remove(path)
            if os.path.lexists(path):
                continue
            line = f"removed stale temporary {path} left by process {pid}"
        log.warning(line)
        done.append(line)
    return done


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Linux ``renameat2(a, b, flag)``; False where this libc, kernel or filesystem lacks it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step; False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _appeared(target: Path) -> OutputError:
    return OutputError(
        f"{target}: appeared while this run was writing it (another run?); it was not replaced",
        hint="pass --force to replace it, or choose another -o",
    )


def _commit(tmp: Path, target: Path, force: bool) -> None:
    """Put ``tmp`` in place of ``target``, never leaving a moment without either the old or the new
    output; without ``force``, never over a target that appeared meanwhile (another run's)."""
    if not force:
        try:
            if _renameat2(tmp, target, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise _appeared(target) from None
        if target.exists() or target.is_symlink():
            raise _appeared(target)
        os.rename(tmp, target)
        return
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    target_is_dir = target.is_dir() and not target.is_symlink()
    if not target_is_dir and not tmp.is_dir():
        os.replace(tmp, target)  # one atomic step
        return
    if _exchange(tmp, target):  # tmp now holds the old output
        _remove(tmp)
        return
    old = target.parent / f".{target.name}.loractl-old-{os.getpid()}-{secrets.token_hex(4)}"
    _ours.add(old.name)
    os.rename(target, old)
    os.rename(tmp, target)
    _remove(old)


def temp_name(target: Path) -> Path:
    """A new temporary name beside ``target``, recorded as this process's own."""
    tmp = target.parent / f".{target.name}.loractl-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    _ours.add(tmp.name)
    _ours.add(tmp.name + ".spool")
    return tmp


@contextmanager
def atomic_output(
    target: str | os.PathLike[str],
    *,
    is_dir: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
    force: bool = False,
) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block completes.

    Stale temporaries of the same target left by killed processes are removed first
    (:func:`remove_stale`).

    Args:
        target: the final output (a file or a folder).
        is_dir: create the temporary path as an empty folder (else the block creates a file or a folder there).
        inputs: paths the output must not be, nor contain, nor lie inside.
        force: replace an existing target.
    """
    target = Path(target)
    check_output(target, inputs, force)
    remove_stale(target)
    tmp = temp_name(target)
    _make_temp(tmp, target, is_dir)
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
        _commit(tmp, target, force)
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
        if _within(e, tmp):  # the output's own files cannot be made (/proc, a read-only place...)
            raise _unwritable(target, e) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _unwritable(target: Path, e: OSError) -> OutputError:
    return OutputError(
        f"cannot write {target}: {e.strerror or e}",
        hint="choose an output in a folder you can write to",
    )


def _make_temp(tmp: Path, target: Path, is_dir: bool) -> None:
    """Make the temporary ``tmp`` (an empty folder with ``is_dir``; else try a file there, and
    remove it for the block to write), so that a place no output can be made in (``/proc``, a
    read-only filesystem, a folder without write permission, a part of the path that is a file)
    is refused before any work.

    Raises:
        OutputError: ``cannot write TARGET: REASON`` (ENOENT, ENOTDIR, EACCES, EPERM, EROFS, EISDIR...).
    """
    try:
        if is_dir:
            tmp.mkdir()
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(tmp)
    except OSError as e:
        _remove(tmp)
        raise _unwritable(target, e) from None


def _within(e: OSError, tmp: Path) -> bool:
    """Whether the error ``e`` is about the temporary ``tmp``, its spool or a file inside it."""
    top = str(tmp)
    for f in (e.filename, e.filename2):
        if isinstance(f, (str, os.PathLike)):
            f = os.fspath(f)
            if f == top or f.startswith((top + os.sep, top + ".")):
                return True
    return False


def copy_file(src: Path, dst: Path) -> None:
    """Copy the regular file ``src`` (not a link) to the new file ``dst`` with ``src``'s permission bits."""
    from .safetensors import copy_range

    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{src}: not a regular file; it is not copied")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o777)
            copy_range(fd, 0, out, st.st_size)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _fsync_file(f: Path) -> None:
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OutputError(f"{f}: cannot be synced to disk ({e.strerror})") from None
    finally:
        os.close(fd)
