"""Safetensors files as bytes, in pure Python: read a header, rewrite a file with tensors changed.

The fuzzer's parent process must not run a single torch operation (it forks children that do), so
the mutators take files apart and put them back together here, without torch or numpy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list[int]
    data: bytes


@dataclass
class File:
    """A well-formed safetensors file: metadata and tensors in file order."""

    metadata: dict[str, str] | None
    tensors: list[Tensor] = field(default_factory=list)

    def get(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)


def split(raw: bytes) -> tuple[int, bytes, bytes]:
    """(header length, header bytes, data bytes) of a safetensors file; raises ValueError if it is not one."""
    if len(raw) < 8:
        raise ValueError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError("header longer than the file")
    return n, raw[8 : 8 + n], raw[8 + n :]


def parse(raw: bytes) -> File:
    """A well-formed file (as written by safetensors or loractl) taken apart."""
    _, header, data = split(raw)
    h = json.loads(header)
    meta = h.pop("__metadata__", None)
    entries = sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return File(
        metadata=meta,
        tensors=[
            Tensor(k, e["dtype"], list(e["shape"]), data[e["data_offsets"][0] : e["data_offsets"][1]])
            for k, e in entries
        ],
    )


def header_of(raw: bytes) -> dict:
    return json.loads(split(raw)[1])


def build_header(f: File) -> dict:
    h: dict = {}
    if f.metadata is not None:
        h["__metadata__"] = f.metadata
    off = 0
    for t in f.tensors:
        h[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + len(t.data)]}
        off += len(t.data)
    return h


def serialize(f: File) -> bytes:
    """The file's bytes, laid out as safetensors does (header padded with spaces to 8 bytes)."""
    return pack(
        json.dumps(build_header(f), separators=(",", ":")).encode(), b"".join(t.data for t in f.tensors)
    )


def pack(header: bytes, data: bytes, pad: bool = True) -> bytes:
    """8-byte length, header, data."""
    if pad and len(header) % 8:
        header += b" " * (8 - len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def read(path: Path) -> File:
    return parse(path.read_bytes())


def write(path: Path, f: File) -> None:
    path.write_bytes(serialize(f))


def concat(paths: list[Path]) -> File:
    """One file holding the tensors of several (shards into a single-file base)."""
    out = File(metadata={"format": "pt"})
    for p in paths:
        out.tensors.extend(read(p).tensors)
    return out
