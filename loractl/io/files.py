"""Opening input files safely: regular files only, and JSON with size, depth and type guards.

Every JSON document loractl reads (a safetensors header, ``adapter_config.json``, a shard index,
``config.json``, JSON kept in header metadata such as kohya's ``ss_network_args``) goes through
:func:`loads_json`, so a hostile one (100,000 nested ``[``, a 10 GB "config", a number that does
not fit a double) is one :class:`~loractl.errors.FormatError` naming the file, never a
``RecursionError`` or an exhausted memory. Files are opened with :func:`open_regular`, which
refuses FIFOs, devices and sockets instead of blocking on them or reading them forever.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputError, UsageError

#: the deepest nesting of arrays and objects accepted; serde_json (which safetensors uses) refuses 128
MAX_DEPTH = 127
#: the largest JSON file read whole (safetensors' own limit for a header)
MAX_JSON_BYTES = 100_000_000
#: the largest TOML file read (a recipe, loractl.toml, pyproject.toml)
MAX_TOML_BYTES = 10_000_000
_U64 = 2**64
_I64_MIN = -(2**63)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], what: str = "file") -> int:
    """Open ``path`` for reading and return the descriptor, refusing anything but a regular file.

    The file is opened with ``O_NONBLOCK`` (so that opening a FIFO returns at once instead of
    waiting for a writer) and checked with ``fstat`` on the descriptor itself (no window between a
    check and the open).

    Raises:
        InputError: missing, unreadable, or not a regular file (a directory, FIFO, device, socket).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected a {what}") from None
    except OSError as e:
        raise InputError(f"{p}: cannot be read ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:  # pragma: no cover - fstat on a fresh descriptor does not fail
        os.close(fd)
        raise InputError(f"{p}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _kind(mode)
        raise InputError(
            f"{p}: is {kind}, expected a {what}"
            if kind != "not a regular file"
            else f"{p}: is not a regular file",
            hint="loractl reads only regular files",
        )
    return fd


def read_regular(path: str | os.PathLike[str], what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Raises:
        InputError: see :func:`open_regular`; or the file is larger than ``limit``.
    """
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputError(f"{path}: {size} bytes, too large for a {what} (limit {limit})")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:  # it grew while being read
            raise InputError(f"{path}: too large for a {what} (limit {limit} bytes)")
        return b"".join(chunks)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)


class JsonObject(dict):
    """A JSON object as :func:`loads_json` returns it in strict mode: a dict (the last of duplicate
    keys wins, as serde_json does for maps) that remembers which keys were duplicated."""

    __slots__ = ("dups",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.dups: frozenset[str] = frozenset()
        if len(self) != len(pairs):
            self.dups = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)


class OutOfRange:
    """A number that does not fit a double (``1e400``), or ``NaN``/``Infinity`` (no JSON number), kept
    where it was in strict mode so that the error can name the key that holds it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def problem(self) -> str:
        return "is not a JSON number" if self.text in ("NaN", "Infinity", "-Infinity") else "is out of range"

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 24 else self.text[:20] + "..."


class _Numbers:
    """serde_json's numbers, as ``json.loads`` hooks: a float beyond a double is an :class:`OutOfRange`;
    integers are non-negative up to 2⁶⁴-1 or negative down to -2⁶³, and beyond (or ``-0``) a float,
    so never an unsigned integer. ``out_of_range`` tells whether any number was out of range."""

    def __init__(self) -> None:
        self.out_of_range = False

    def float(self, text: str) -> float | OutOfRange:
        value = float(text)
        if math.isinf(value):
            self.out_of_range = True
            return OutOfRange(text)
        return value

    def constant(self, text: str) -> OutOfRange:
        self.out_of_range = True
        return OutOfRange(text)

    def int(self, text: str) -> int | float | OutOfRange:
        if len(text) > 21:  # beyond 64 bits anyway, and int() refuses more than 4300 digits
            return self.float(text)
        value = int(text)
        if text.startswith("-"):
            return self.float(text) if value == 0 or value < _I64_MIN else value
        return self.float(text) if value >= _U64 else value


def _walk(doc: Any, where: str, strings: bool, numbers: bool) -> None:
    """Check the nesting depth, and lone surrogates in keys and strings (``strings``) and numbers out
    of range (``numbers``). Only what is to be checked is visited; the path to a node is kept as a
    linked list and spelled out only for the error."""
    leaf = (str, OutOfRange) if strings else (OutOfRange,) if numbers else ()
    stack: list[tuple[Any, int, Any]] = [(doc, 1, None)]
    while stack:
        node, depth, at = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise FormatError(f"{where}: nested more than {MAX_DEPTH} levels deep at {_spell(at)}")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if strings and isinstance(k, str) and _SURROGATE.search(k):
                    raise FormatError(f"{where}: key {k!r} holds a lone UTF-16 surrogate escape")
                if isinstance(v, (dict, list)) or (leaf and isinstance(v, leaf)):
                    stack.append((v, depth + 1, (at, k)))
        elif isinstance(node, str):
            if _SURROGATE.search(node):
                raise FormatError(f"{where}: the string at {_spell(at)} holds a lone UTF-16 surrogate escape")
        elif isinstance(node, OutOfRange):
            raise FormatError(f"{where}: the number {node!r} at {_spell(at)} {node.problem}")


def _spell(at: Any) -> str:
    keys: list[object] = []
    while at is not None:
        at, k = at
        keys.append(k)
    return "".join(f"[{k!r}]" for k in reversed(keys)) or "the top level"


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LEAF_PAIR = re.compile(r"\[\]|\{\}")


def _shallow(text: str) -> bool:
    """Is a valid JSON document nested at most :data:`MAX_DEPTH` deep? Decided on its brackets outside
    strings: each pass removes every innermost pair, so the deepest nesting loses one level a pass."""
    if "\\" in text:
        structure = _STRING.sub("", text)
    else:  # no escapes: strings are what lies between two quotes
        structure = "".join(text.split('"')[::2])
    brackets = _NOT_BRACKET.sub("", structure)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return True
        brackets = _LEAF_PAIR.sub("", brackets)
    return not brackets


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(text: str) -> int:
    """Where the nesting first goes beyond :data:`MAX_DEPTH` (an offset in ``text``), for the error."""
    depth = 0
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return m.start()
        elif tok in "]}":
            depth -= 1
    return len(text)


#: bytes -> b"0" for digits, b" " for the rest: to find runs of digits without a regex
_DIGITS = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))


def _odd_integers(text: str, data: bytes | None) -> bool:
    """Might the document hold an integer Python's parser reads differently from serde_json: ``-0``
    (a float there) or one of 19 digits or more (beyond 64 bits: a float there)? A cheap superset."""
    if "-0" in text:
        return True
    raw = data if data is not None else text.encode("utf-8", "surrogatepass")
    return b"0" * 19 in raw.translate(_DIGITS)


def loads_json(
    data: bytes | str, where: str | os.PathLike[str], *, strict: bool = False, duplicates: bool = True
) -> Any:
    """Parse a JSON document with guards, raising one :class:`FormatError` naming ``where``.

    Always: the bytes must be UTF-8 and the nesting at most :data:`MAX_DEPTH` deep. ``strict``
    follows serde_json as the safetensors library uses it, so that a safetensors header is accepted
    exactly when ``safetensors.safe_open`` accepts it: no ``NaN``/``Infinity``, no number beyond a
    double, no lone surrogate escape, integers beyond 64 bits are floats; objects are
    :class:`JsonObject` (duplicate keys are recorded) and a number beyond a double is an
    :class:`OutOfRange` left in place, so that the caller's check can name the key holding it.
    Otherwise Python's own JSON dialect (as PEFT and transformers read their files).

    Args:
        data: the document.
        where: the file (and part of it) for the error message, e.g. ``"x.safetensors: header"``.
        strict: the rules above.
        duplicates: in strict mode, record duplicate keys (:class:`JsonObject`); without, objects are
            plain dicts (the last of duplicate keys wins) and parsing is about four times faster.

    Raises:
        FormatError: not UTF-8, not JSON, nested too deeply, or (strict) a rule above broken.
    """
    where = str(where)
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{where}: not UTF-8 (byte {e.start})") from None
    else:
        text = data
    kwargs: dict[str, Callable[..., Any]] = {}
    numbers = _Numbers()
    if strict:
        kwargs = {"parse_float": numbers.float, "parse_constant": numbers.constant}
        if duplicates:
            kwargs["object_pairs_hook"] = JsonObject
        if _odd_integers(text, data if isinstance(data, bytes) else None):  # else Python's are serde's
            kwargs["parse_int"] = numbers.int
    try:
        doc = json.loads(text, **kwargs)
    except RecursionError:
        raise FormatError(
            f"{where}: nested more than {MAX_DEPTH} levels deep (at character {_too_deep(text)})"
        ) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise FormatError(f"{where}: not JSON ({e})") from None
    strings = strict and "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    deep = text.count("[") + text.count("{") > MAX_DEPTH and not _shallow(text)
    if deep or numbers.out_of_range or strings:
        _walk(doc, where, strings, numbers.out_of_range)
    return doc


def loads_toml(text: str, path: str | os.PathLike[str], hint: str | None = None) -> dict[str, Any]:
    """A TOML document (a recipe, loractl.toml, pyproject.toml), nested at most :data:`MAX_DEPTH` deep.

    Raises:
        UsageError: not TOML (naming the line), or nested too deeply, naming ``path``; with ``hint``.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        at = re.search(r"at line (\d+)", str(e))
        raise UsageError(f"{path}:{at[1] if at else 1}: not valid TOML ({e})", hint=hint) from None
    except RecursionError:  # tomllib parses nested arrays and tables by recursion
        raise UsageError(f"{path}: nested more than {MAX_DEPTH} levels deep", hint=hint) from None
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UsageError(f"{path}: nested more than {MAX_DEPTH} levels deep", hint=hint)
        items = node.values() if isinstance(node, dict) else node
        stack += [(v, depth + 1) for v in items if isinstance(v, (dict, list))]
    return doc


class FileObject(dict):
    """A JSON object read from a file by :func:`read_json`: a dict that remembers its file
    (``path``), so that a later check of one of its values (a base's ``config.json``) can name it."""

    __slots__ = ("path",)

    def __init__(self, items: dict[str, Any], path: Path) -> None:
        super().__init__(items)
        self.path = path


def shown(value: Any) -> str:
    """A JSON value as an error message shows it: short, and a list or object only by its kind."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    text = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def source_of(doc: Any, default: str) -> str:
    """The file ``doc`` was read from (a :class:`FileObject`'s), else ``default``."""
    path = getattr(doc, "path", None)
    return str(path) if path is not None else default


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """A JSON file (regular, at most :data:`MAX_JSON_BYTES`), parsed by :func:`loads_json`; an object
    is a :class:`FileObject`.

    Raises:
        InputError: see :func:`read_regular`.
        FormatError: see :func:`loads_json`.
    """
    doc = loads_json(read_regular(path, what), path)
    return FileObject(doc, Path(path)) if isinstance(doc, dict) else doc
