"""SafetensorsFile accepts exactly the files that ``safetensors.safe_open`` accepts.

The safetensors library is the oracle: for crafted headers (every rule of its ``read_metadata`` /
``Metadata::validate`` and of serde_json, on both sides of each limit) and for random mutations of
real files, our reader must accept when, and only when, ``safe_open(path, "pt")`` does, and then
see the same tensors; when it refuses, the refusal is one FormatError naming the file.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from loractl.errors import LoractlError
from loractl.io.safetensors import DTYPE_INFO, SafetensorsFile

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-lora" / "adapter_model.safetensors"
D8 = b"\0" * 8
ENTRY = b'"dtype":"F32","shape":[2],"data_offsets":[0,8]'


def _file(raw: bytes, data: bytes = b"", n: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _obj(header: dict, data: bytes = b"", n: int | None = None) -> bytes:
    return _file(json.dumps(header).encode(), data, n)


def _t(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


def _with_x(value: bytes) -> bytes:
    """A valid one-tensor file whose entry has an extra (ignored) field ``x`` holding ``value``."""
    return _file(b'{"t":{' + ENTRY + b',"x":' + value + b"}}", D8)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


U64MAX = 2**64 - 1
CASES: dict[str, bytes] = {
    # header length and the bytes around the JSON
    "plain": _obj({"t": _t()}, D8),
    "empty header": _obj({}),
    "too short for a length": b"\x01\x02\x03",
    "length one too long": _obj({"t": _t()}, D8, n=len(json.dumps({"t": _t()})) + 1),
    "length one too short": _obj({"t": _t()}, D8, n=len(json.dumps({"t": _t()})) - 1),
    "length beyond safetensors' limit": _obj({"t": _t()}, D8, n=100_000_001),
    "length 2^63": _obj({"t": _t()}, D8, n=2**63),
    "length zero": _file(b""),
    "leading whitespace": _file(b" \n{" + b'"t":{' + ENTRY + b"}}", D8),
    "trailing whitespace": _file(b'{"t":{' + ENTRY + b"}}\t\r\n ", D8),
    "trailing NUL": _file(b'{"t":{' + ENTRY + b"}}\0", D8),
    "UTF-8 BOM": _file(b'\xef\xbb\xbf{"t":{' + ENTRY + b"}}", D8),
    "UTF-16": _file('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.encode("utf-16-le"), D8),
    "not UTF-8": _file(b'{"\xff":{' + ENTRY + b"}}", D8),
    "a list": _file(b"[]"),
    "whitespace only": _file(b"  "),
    # the data: exact cover, in offset order
    "gap at the start": _obj({"t": _t(offsets=[8, 16])}, D8 * 2),
    "gap between tensors": _obj({"a": _t(offsets=[0, 8]), "b": _t(offsets=[16, 24])}, D8 * 3),
    "overlap": _obj({"a": _t(offsets=[0, 8]), "b": _t(offsets=[4, 12])}, D8 * 2),
    "trailing bytes": _obj({"t": _t()}, D8 + b"x"),
    "trailing bytes, no tensors": _obj({}, b"x"),
    "truncated": _obj({"t": _t()}, b"\0" * 7),
    "offsets reversed": _obj({"t": _t(shape=[0], offsets=[8, 0])}),
    "two empty tensors at one offset": _obj(
        {"a": _t(shape=[0], offsets=[0, 0]), "b": _t(shape=[0], offsets=[0, 0])}
    ),
    "empty tensor between two": _obj(
        {"a": _t(offsets=[0, 8]), "z": _t(shape=[0], offsets=[8, 8]), "b": _t(offsets=[8, 16])}, D8 * 2
    ),
    "offsets 2^64-1": _obj({"t": _t("U8", [8], [U64MAX, U64MAX])}, D8),
    "shape and size disagree": _obj({"t": _t(shape=[3])}, D8),
    # __metadata__
    "metadata null": _obj({"__metadata__": None, "t": _t()}, D8),
    "metadata 0": _obj({"__metadata__": 0, "t": _t()}, D8),
    "metadata a string": _obj({"__metadata__": "ab", "t": _t()}, D8),
    "metadata a list": _obj({"__metadata__": [], "t": _t()}, D8),
    "metadata value a number": _obj({"__metadata__": {"a": 1}, "t": _t()}, D8),
    "metadata value null": _obj({"__metadata__": {"a": None}, "t": _t()}, D8),
    "metadata after the tensors": _obj({"t": _t(), "__metadata__": {"a": "b"}}, D8),
    "metadata twice": _file(b'{"__metadata__":{},"__metadata__":{},"t":{' + ENTRY + b"}}", D8),
    "metadata twice, one escaped": _file(
        b'{"__metadata__":{},"__metad\\u0061ta__":{},"t":{' + ENTRY + b"}}", D8
    ),
    "metadata key twice": _file(b'{"__metadata__":{"a":"b","a":"c"},"t":{' + ENTRY + b"}}", D8),
    # entries
    "entry not an object": _obj({"t": 5}),
    "no dtype": _obj({"t": {"shape": [2], "data_offsets": [0, 8]}}, D8),
    "dtype twice": _file(b'{"t":{"dtype":"F32",' + ENTRY + b"}}", D8),
    "unknown field": _obj({"t": {**_t(), "extra": 1}}, D8),
    "unknown field twice": _file(b'{"t":{"x":1,"x":2,' + ENTRY + b"}}", D8),
    "tensor twice, last wins and fits": _file(b'{"t":{' + ENTRY + b'},"t":{' + ENTRY + b"}}", D8),
    "tensor twice, last wins and does not fit": _file(
        b'{"t":{' + ENTRY + b'},"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', D8 * 2
    ),
    "empty name": _obj({"": _t()}, D8),
    "NUL in a name": _file(b'{"a\\u0000":{' + ENTRY + b"}}", D8),
    "raw control character in a name": _file(b'{"a\x01":{' + ENTRY + b"}}", D8),
    "lone leading surrogate in a name": _file(b'{"\\ud800":{' + ENTRY + b"}}", D8),
    "lone trailing surrogate in a name": _file(b'{"\\udc00":{' + ENTRY + b"}}", D8),
    "surrogate pair in a name": _file(b'{"\\ud83d\\ude00":{' + ENTRY + b"}}", D8),
    "lone surrogate in metadata": _file(b'{"__metadata__":{"a":"\\ud800"},"t":{' + ENTRY + b"}}", D8),
    # dtype
    "dtype an object": _obj({"t": {**_t(), "dtype": {}}}, D8),
    "dtype {F32: null}": _obj({"t": {**_t(), "dtype": {"F32": None}}}, D8),
    "dtype {F32: 1}": _obj({"t": {**_t(), "dtype": {"F32": 1}}}, D8),
    "dtype lower case": _obj({"t": _t("f32")}, D8),
    "dtype unknown": _obj({"t": _t("Q9")}, D8),
    "dtype F8_E8M0": _obj({"t": _t("F8_E8M0", [8])}, D8),
    "dtype C64": _obj({"t": _t("C64", [1])}, D8),
    "dtype F4, whole bytes": _obj({"t": _t("F4", [4], [0, 2])}, b"\0\0"),
    "dtype F4, half a byte": _obj({"t": _t("F4", [3], [0, 2])}, b"\0\0"),
    "dtype F6_E2M3, whole bytes": _obj({"t": _t("F6_E2M3", [4], [0, 3])}, b"\0" * 3),
    "dtype F6_E3M2, not whole bytes": _obj({"t": _t("F6_E3M2", [2], [0, 2])}, b"\0" * 2),
    # shape
    "scalar": _obj({"t": _t(shape=[], offsets=[0, 4])}, b"\0" * 4),
    "shape 2.0": _file(b'{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', D8),
    "shape 2e0": _file(b'{"t":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}', D8),
    "shape 1e400": _file(b'{"t":{"dtype":"F32","shape":[1e400, 172],"data_offsets":[0,8]}}', D8),
    "shape -0": _file(b'{"t":{"dtype":"F32","shape":[-0,2],"data_offsets":[0,0]}}'),
    "shape -2": _file(b'{"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', D8),
    "shape a string": _file(b'{"t":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}', D8),
    "shape true": _file(b'{"t":{"dtype":"BOOL","shape":[true],"data_offsets":[0,1]}}', b"\0"),
    "shape null": _file(b'{"t":{"dtype":"F32","shape":null,"data_offsets":[0,8]}}', D8),
    "shape an object": _file(b'{"t":{"dtype":"F32","shape":{"a":2},"data_offsets":[0,8]}}', D8),
    "shape 2^64": _obj({"t": _t(shape=[2**64], offsets=[0, 0])}),
    "shape [2^64-1, 0]": _obj({"t": _t(shape=[U64MAX, 0], offsets=[0, 0])}),
    "shape [0, 2^32, 2^32]": _obj({"t": _t(shape=[0, 2**32, 2**32], offsets=[0, 0])}),
    "shape [2^32, 2^32, 0]": _obj({"t": _t(shape=[2**32, 2**32, 0], offsets=[0, 0])}),
    "shape 2^62 F32 (bytes overflow)": _obj({"t": _t(shape=[2**62], offsets=[0, 0])}),
    "shape 2^64-1 U8 (bits overflow)": _obj({"t": _t("U8", [U64MAX], [0, 0])}),
    "shape 2^62 F4 (bits overflow)": _obj({"t": _t("F4", [2**62], [0, 0])}),
    "2e9 elements declared, 8 bytes given": _obj({"t": _t("U8", [2 * 10**9], [0, 2 * 10**9])}, D8),
    # data_offsets
    "three offsets": _obj({"t": _t(offsets=[0, 8, 8])}, D8),
    "offsets Infinity": _file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,Infinity]}}', D8),
    "offsets NaN": _file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,NaN]}}', D8),
    "offsets 8E0": _file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8E0]}}', D8),
    "offsets false": _file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[false,8]}}', D8),
    "offsets -0": _file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', D8),
    "offsets an object": _file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":{"0":0,"1":8}}}', D8),
    # what an ignored field may hold
    "ignored 1e308": _with_x(b"1e308"),
    "ignored 1.8e308": _with_x(b"1.8e308"),
    "ignored 1e-400": _with_x(b"1e-400"),
    "ignored 30-digit integer": _with_x(b"1" * 30),
    "ignored 400-digit integer": _with_x(b"1" * 400),
    "ignored 5000-digit integer": _with_x(b"1" * 5000),
    "ignored negative 30-digit integer": _with_x(b"-" + b"1" * 30),
    "ignored NaN": _with_x(b"NaN"),
    "ignored -Infinity": _with_x(b"-Infinity"),
    "ignored leading zero": _with_x(b"01"),
    "ignored trailing comma": _with_x(b"[1,]"),
    "ignored bad escape": _with_x(b'"\\q"'),
    "ignored lone surrogate": _with_x(b'"\\ud800"'),
    "ignored duplicate keys": _with_x(b'{"a":1,"a":2}'),
    "ignored nesting to depth 127": _with_x(_nested(125)),
    "ignored nesting to depth 128": _with_x(_nested(126)),
    "100,000 nested [": _file(b"[" * 100_000),
    "100,000 nested [ in a tensor entry": _file(b'{"t":{' + ENTRY + b',"x":' + b"[" * 100_000 + b"}}", D8),
    "200 nested [ in metadata": _file(b'{"__metadata__":{"a":' + _nested(200) + b"}}"),
}


def _write(tmp_path: Path, content: bytes, name: str = "f.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def _theirs(path: Path) -> dict[str, tuple[str, list[int]]] | None:
    """What safe_open sees (name -> (dtype, shape)), or None when it refuses the file."""
    try:
        with safe_open(str(path), "pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (s.get_dtype(), list(s.get_shape()))
            return out
    except Exception:  # safetensors raises SafetensorError, and some others
        return None


def _ours(path: Path) -> dict[str, tuple[str, list[int]]] | LoractlError:
    try:
        with SafetensorsFile(path) as f:
            return {k: (i.dtype, list(i.shape)) for k, i in f.tensors.items()}
    except LoractlError as e:
        return e


def _agree(path: Path) -> None:
    theirs, ours = _theirs(path), _ours(path)
    if theirs is None:
        assert isinstance(ours, LoractlError), f"safe_open refuses {path.name}, we accept it"
        assert str(path) in ours.message and "\n" not in ours.message
    else:
        assert not isinstance(ours, LoractlError), f"safe_open accepts {path.name}, we refuse: {ours}"
        assert ours == theirs


@pytest.mark.parametrize("name", list(CASES))
def test_reader_accepts_exactly_what_safe_open_accepts(tmp_path: Path, name: str) -> None:
    _agree(_write(tmp_path, CASES[name]))


def test_crafted_cases_cover_both_answers(tmp_path: Path) -> None:
    """The table above is no trivial oracle: safe_open accepts some of its files and refuses others."""
    answers = {
        n: _theirs(_write(tmp_path, c, f"{i}.safetensors")) is not None
        for i, (n, c) in enumerate(CASES.items())
    }
    assert 15 < sum(answers.values()) < len(answers) - 40
    for name in ("gap between tensors", "trailing bytes", "length one too long", "metadata 0"):
        assert not answers[name], name  # what the issue says we accepted before


def test_accepted_tensors_read_as_safe_open_reads_them(tmp_path: Path) -> None:
    """Where both accept, every readable tensor has the same bytes."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randint(0, 9, (2, 2), generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "e8m0": torch.ones(4).to(torch.float8_e8m0fnu),
    }
    p = tmp_path / "ok.safetensors"
    save_file(tensors, str(p), metadata={"k": "v"})
    _agree(p)
    with SafetensorsFile(p) as f, safe_open(str(p), "pt") as theirs:
        assert f.metadata == theirs.metadata()
        for k in theirs.keys():
            ours, want = f.read(k), theirs.get_tensor(k)
            assert ours.dtype == want.dtype and ours.shape == want.shape, k
            assert (
                ours.reshape(-1).view(torch.uint8).tolist() == want.reshape(-1).view(torch.uint8).tolist()
            ), k


# --------------------------------------------------------------------------------------------
# random mutations of a real adapter file
# --------------------------------------------------------------------------------------------
def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _json_mutation(header: dict, data: bytes, rng: random.Random) -> tuple[bytes, bytes, int | None]:
    """A header with one field changed to a value from a list of plausible-and-wrong ones."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(12)
    values: list[object] = [
        -1,
        0,
        1,
        2**63,
        2**64 - 1,
        2**64,
        1.5,
        1e300,
        "8",
        None,
        True,
        [],
        {},
        [1, 2, 3],
    ]
    n_override = None
    raw_override: bytes | None = None
    if choice == 0:
        entry["dtype"] = rng.choice(
            ["F16", "BF16", "I32", "U8", "F64", "F4", "C64", "X", 3, None, {"F32": None}]
        )
    elif choice == 1:
        i = rng.randrange(len(entry["shape"]) + 1)
        shape = list(entry["shape"])
        if i < len(shape):
            shape[i] = rng.choice(values)
        else:
            shape.append(rng.choice([0, 1, 2]))
        entry["shape"] = shape
    elif choice == 2:
        entry["data_offsets"][rng.randrange(2)] += rng.choice([-8, -4, -1, 1, 4, 8])
    elif choice == 3:
        entry["data_offsets"] = rng.choice(values)
    elif choice == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 5:
        header["__metadata__"] = rng.choice([0, "ab", None, [], {"a": 1}, {"a": "b"}, {}])
    elif choice == 6:
        entry["extra"] = rng.choice(values)
    elif choice == 7:
        data = data + b"\0" * rng.choice([1, 7, 8])
    elif choice == 8:
        data = data[: len(data) - rng.choice([1, 8, len(data) // 2])]
    elif choice == 9:  # a gap: shift every tensor after this one
        cut = entry["data_offsets"][1]
        for e in header.values():
            if isinstance(e, dict) and "data_offsets" in e and e["data_offsets"][0] >= cut:
                e["data_offsets"] = [e["data_offsets"][0] + 8, e["data_offsets"][1] + 8]
        data = data[:cut] + b"\0" * 8 + data[cut:]
    elif choice == 10:
        header[name + ".twin"] = dict(entry)  # overlaps its twin
    else:
        text = json.dumps(header).encode()
        raw_override = text.replace(b"]", rng.choice([b",Infinity]", b",1e400]", b",-0]", b",NaN]"]), 1)
    raw = raw_override if raw_override is not None else json.dumps(header).encode()
    if rng.random() < 0.15:
        n_override = len(raw) + rng.choice([-2, -1, 1, 2])
    return raw, data, n_override


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_adapters_agree_with_safe_open(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    header, data = _split(EXAMPLE.read_bytes())
    raw, data, n = _json_mutation(header, data, rng)
    _agree(_write(tmp_path, _file(raw, data, n), f"m{seed}.safetensors"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_byte_flipped_headers_agree_with_safe_open(tmp_path: Path, seed: int) -> None:
    """Random bytes of the length field and the JSON header overwritten."""
    rng = random.Random(seed)
    blob = bytearray(EXAMPLE.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(rng.choice([1, 1, 2, 4])):
        i = rng.randrange(min(8 + n, len(blob)))
        blob[i] = rng.choice([rng.randrange(256), ord("["), ord("{"), ord('"'), ord("9"), ord("-"), ord(" ")])
    _agree(_write(tmp_path, bytes(blob), f"b{seed}.safetensors"))


def test_every_readable_dtype_is_one_safe_open_knows(tmp_path: Path) -> None:
    for i, name in enumerate(DTYPE_INFO):
        p = _write(
            tmp_path,
            _obj({"t": _t(name, [8], [0, 8 * DTYPE_INFO[name][0]])}, D8 * DTYPE_INFO[name][0]),
            f"{i}.st",
        )
        assert _theirs(p) is not None, name
        _agree(p)


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(LoractlError, match="FIFO") as e:
        SafetensorsFile(fifo)
    assert str(fifo) in e.value.message
