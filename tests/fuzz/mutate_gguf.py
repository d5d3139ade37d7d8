"""Mutations of a GGUF adapter: its counts, lengths, types, dimensions and offsets, and its values.

A small reader (pure Python) lists every integer field of the header with its offset and width;
a mutation overwrites one with an odd value, or changes a string or a metadata value.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


@dataclass
class Field:
    what: str  # "n_tensors", "key-len", "value-type", "string-len", "array-count", "n_dims", "dim", "ggml-type", "offset", "f32", ...
    offset: int
    fmt: str  # struct format
    name: str  # the key or tensor it belongs to


def fields(raw: bytes) -> tuple[list[Field], list[tuple[int, int, str]]]:
    """Every number of the header, and (offset, length, owner) of every string's bytes."""
    out: list[Field] = []
    strings: list[tuple[int, int, str]] = []
    pos = 4

    def take(fmt: str, what: str, name: str) -> int | float:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, raw, pos)
        out.append(Field(what, pos, fmt, name))
        pos += struct.calcsize(fmt)
        return v

    def string(what: str, name: str) -> str:
        nonlocal pos
        n = int(take("<Q", what, name))
        s = raw[pos : pos + n]
        strings.append((pos, n, name))
        pos += n
        return s.decode("utf-8", "replace")

    def value(t: int, name: str) -> None:
        nonlocal pos
        if t == 8:
            string("string-len", name)
        elif t == 9:
            at = int(take("<I", "array-type", name))
            n = int(take("<Q", "array-count", name))
            for _ in range(min(n, 1000)):
                value(at, name)
        else:
            take(SCALAR[t], f"value-{SCALAR[t][1]}", name)

    take("<I", "version", "")
    n_t = int(take("<Q", "n_tensors", ""))
    n_kv = int(take("<Q", "n_kv", ""))
    for _ in range(n_kv):
        key = string("key-len", "")
        t = int(take("<I", "value-type", key))
        value(t, key)
    for _ in range(n_t):
        name = string("name-len", "")
        nd = int(take("<I", "n_dims", name))
        for _ in range(nd):
            take("<Q", "dim", name)
        take("<I", "ggml-type", name)
        take("<Q", "offset", name)
    return out, strings


ODD = {
    "<Q": (0, 1, 2**32, 2**63, 2**64 - 1, 2**62, 100_000_000),
    "<q": (0, -1, 2**63 - 1, -(2**63)),
    "<I": (0, 1, 2, 13, 30, 99, 2**31, 2**32 - 1),
    "<i": (0, -1, 2**31 - 1, -(2**31)),
    "<f": (float("nan"), float("inf"), float("-inf"), 0.0, -16.0, 1e38),
    "<d": (float("nan"), float("inf"), 0.0, -1.0),
    "<B": (0, 255), "<b": (-1, 127), "<H": (0, 65535), "<h": (-1,), "<?": (2, 255),
}  # fmt: skip


def mutate(rng: random.Random, path: Path) -> tuple[str, str]:
    raw = bytearray(path.read_bytes())
    fs, strings = fields(bytes(raw))
    what = rng.choice(["field", "field", "field", "magic", "string", "cut"])
    if what == "field":
        f = rng.choice(fs)
        old = struct.unpack_from(f.fmt, raw, f.offset)[0]
        choices = list(ODD[f.fmt])
        if f.fmt in ("<Q", "<I") and isinstance(old, int):
            choices += [old + 1, max(old - 1, 0)]
        v = rng.choice(choices)
        struct.pack_into(f.fmt, raw, f.offset, v)
        path.write_bytes(bytes(raw))
        return f"gguf:{f.what}", f"{f.name or f.what}: {old} -> {v}"
    if what == "magic":
        raw[:4] = rng.choice([b"GGUG", b"FUGG", b"\x00\x00\x00\x00", b"GGML"])
        path.write_bytes(bytes(raw))
        return "gguf:magic", bytes(raw[:4]).decode("latin-1")
    if what == "string":
        off, n, owner = rng.choice([s for s in strings if s[1]])
        i = off + rng.randrange(n)
        repl = rng.choice([b"\xff", b"\x00", b"/", b"."])
        raw[i : i + 1] = repl
        path.write_bytes(bytes(raw))
        return "gguf:string", f"{owner or 'a key'}: byte {i - off} -> {repl!r}"
    cut = rng.choice([8, 16, 24, rng.randrange(24, len(raw)), len(raw) - 1])
    path.write_bytes(bytes(raw[:cut]))
    return "gguf:cut", f"{len(raw)} -> {cut} bytes"
