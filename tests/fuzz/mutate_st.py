"""Mutations of one safetensors file (a shard, an adapter, a receipt...), as bytes.

Families (the rows of the report):
    st-header   the header's JSON: dtype, shape, data_offsets, names, metadata, syntax, nesting
    st-length   the 8-byte header length
    st-size     the file cut short or made longer
    st-bytes    tensor bytes: flipped, NaN/Inf, zeros, huge values
    st-retype   a well-formed file that says something odd: dtype or shape changed consistently,
                a tensor dropped, renamed, added, transposed, its rank changed
Each mutator returns (kind, detail) and rewrites the file.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from . import st
from .values import Raw, dumps, nested, odd_value, short

ODD_DTYPES = ("F8", "F4", "I4", "Q4_0", "", "f32", "FLOAT", "F32 ", "C64", "U64", "F64", "BOOL", "I8",
              "F8_E4M3", "F8_E8M0", "F6_E3M2", "U1", None, 5, ["F32"], {"x": 1})  # fmt: skip
SAME_SIZE = {"F32": ("I32", "U32"), "BF16": ("F16", "I16", "U16"), "F16": ("BF16", "I16"), "F64": ("I64",),
             "I64": ("F64",), "U8": ("I8", "BOOL", "F8_E4M3")}  # fmt: skip
PACK = {"F32": "<f", "F64": "<d", "F16": "<e"}


def _header(raw: bytes) -> tuple[dict, bytes]:
    _, h, data = st.split(raw)
    return json.loads(h), data


def _names(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def _write(path: Path, header_text: str | bytes, data: bytes, pad: bool = True) -> None:
    hb = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    path.write_bytes(st.pack(hb, data, pad))


# ---------------------------------------------------------------- st-header
def header(rng: random.Random, path: Path) -> tuple[str, str]:
    h, data = _header(path.read_bytes())
    names = _names(h)
    name = rng.choice(names) if names else "x"
    e = h.get(name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    a, b = e["data_offsets"]
    what = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "missing", "extra", "entry", "metadata",
                       "metadata", "name", "duplicate", "toplevel", "syntax", "nonutf8", "padding"])  # fmt: skip
    if what == "dtype":
        e["dtype"] = v = rng.choice(ODD_DTYPES)
    elif what == "shape":
        s = list(e["shape"])
        v = rng.choice([
            [], [0], [-1], s + [1], s[:-1], [s[0] + 1, *s[1:]] if s else [1], [2**63], [2**32, 2**32],
            [2**63, 2], [2**64], [1.5], ["4"], None, "x", {}, [[1]], [*s[:-1], -1] if s else [-1],
            [1] * 100, nested(rng.choice([3, 200, 100_000])), [Raw("1e400")], list(reversed(s)),
        ])  # fmt: skip
        e["shape"] = v
    elif what == "offsets":
        end = len(data)
        v = rng.choice([
            [0, 0], [b, a], [a, b + 1], [max(a - 1, 0), b], [a, 2**64], [a, 2**64 + 4], [-8, b], [a, -1],
            [float(a), b], [str(a), b], [a], [a, b, b], None, [], [0, end], [a, end + 10**6], [2**63, 2**63 + 4],
            [a + 1, b + 1], [Raw("1e400"), b], [a, Raw("NaN")],
        ])  # fmt: skip
        e["data_offsets"] = v
    elif what == "missing":
        v = rng.choice(["dtype", "shape", "data_offsets"])
        e.pop(v, None)
    elif what == "extra":
        e[rng.choice(["foo", "dtype ", "", "__proto__"])] = v = odd_value(rng)
    elif what == "entry":
        h[name] = v = rng.choice([[e.get("dtype"), e.get("shape")], "x", None, 5, {}, nested(100_000)])
    elif what == "metadata":
        meta = h.get("__metadata__")
        if isinstance(meta, dict) and meta and rng.random() < 0.6:
            k = rng.choice(sorted(meta))
            v = rng.choice([odd_value(rng), "[", "null", "{}", "[1,", '{"a":', "[" * 100_000, "x" * 100_000,
                            "NaN", '[{"path": 5}]', "[null]", '[{"weight": "x"}]'])  # fmt: skip
            meta[k] = v
            what = f"metadata[{k!r}]"
        else:
            h["__metadata__"] = v = rng.choice([None, 5, [], "x", {"format": 5}, {"format": None}, {"a": {"b": "c"}},
                                                {"loractl.receipt": 5}, {"x": "y" * 100_000}, nested(100_000)])  # fmt: skip
    elif what == "name":
        v = rng.choice(["", "x" * 5000, "../../etc/passwd", "a/b", "é中", "__metadata__", "\u0000",
                        rng.choice(names) if names else "y", name + ".", name.replace("weight", "bias")])  # fmt: skip
        h = {(v if k == name else k): val for k, val in h.items()}
    elif what == "duplicate":  # the same key twice in the JSON text
        other = rng.choice(names) if names else name
        text = dumps(h)
        dup = dumps({name: h.get(other)})[1:-1]
        _write(path, text[:-1] + ("," if len(h) else "") + dup + "}", data)
        return "header:duplicate-key", f"{name!r} twice (second as {other!r})"
    elif what == "toplevel":
        v = rng.choice([[], 5, "x", None, {}, nested(100_000), Raw("[" + dumps(h) + "]")])
        _write(path, dumps(v), data)
        return "header:toplevel", short(v)
    elif what == "syntax":
        text = dumps(h)
        cut = rng.randrange(1, len(text))
        v = rng.choice(["truncated", "trailing", "bom", "comment", "single-quotes"])
        text = {"truncated": text[:cut], "trailing": text + "xyz", "bom": "\ufeff" + text,
                "comment": "/*c*/" + text, "single-quotes": text.replace('"', "'", 2)}[v]  # fmt: skip
        _write(path, text, data)
        return "header:syntax", v
    elif what == "nonutf8":
        hb = dumps(h).encode()
        i = rng.randrange(len(hb))
        hb = hb[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + hb[i:]
        _write(path, hb, data)
        return "header:non-utf8", f"at byte {i}"
    elif what == "padding":
        hb = dumps(h).encode() + rng.choice([b"\x00" * 7, b"\n" * 8, b" " * 100_000, b"\t"])
        _write(path, hb, data, pad=False)
        return "header:padding", short(hb[-8:])
    _write(path, dumps(h), data)
    if what.startswith("metadata"):
        return "header:metadata", f"{what[8:] or '__metadata__'} = {short(v)}"
    return f"header:{what}", f"tensor {short(name, 60)}: {short(v)}"


# ---------------------------------------------------------------- st-length
def length(rng: random.Random, path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    v = rng.choice([n - 1, n + 1, n - 8, n + 8, 0, 1, 2, 7, len(raw), len(raw) - 8, len(raw) + 1, 2**63, 2**64 - 1,
                    2**32 + n, 100 * 2**20 + 1, 2**31])  # fmt: skip
    path.write_bytes(struct.pack("<Q", v % 2**64) + raw[8:])
    return "length", f"{n} -> {v}"


# ---------------------------------------------------------------- st-size
def size(rng: random.Random, path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    what = rng.choice(["cut", "cut", "extend"])
    if what == "cut":
        at = rng.choice([0, rng.randrange(1, 8), 8, rng.randrange(9, 8 + n), 8 + n, rng.randrange(8 + n, len(raw)),
                         len(raw) - 1])  # fmt: skip
        path.write_bytes(raw[:at])
        return "cut", f"{len(raw)} -> {at} bytes"
    extra = rng.choice([b"\x00", b"\x00" * 8, rng.randbytes(1000), raw[8 + n :]])
    path.write_bytes(raw + extra)
    return "extend", f"+{len(extra)} bytes"


# ---------------------------------------------------------------- st-bytes
def _float_bytes(dtype: str, x: float) -> bytes:
    if dtype == "BF16":
        return struct.pack("<f", x)[2:]
    return struct.pack(PACK[dtype], x)


def tensor_bytes(rng: random.Random, path: Path) -> tuple[str, str]:
    f = st.read(path)
    floats = [t for t in f.tensors if t.dtype in ("F32", "F16", "BF16", "F64") and t.data]
    what = rng.choice(["flip", "value", "value", "zeros"]) if floats else "flip"
    if what == "flip":
        raw = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        if len(raw) <= 8 + n:
            return "flip", "no data"
        k = rng.choice([1, 4, 64])
        for _ in range(k):
            raw[rng.randrange(8 + n, len(raw))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        return "flip", f"{k} bits"
    t = rng.choice(floats)
    size = st.DTYPE_SIZE[t.dtype]
    count = len(t.data) // size
    if what == "zeros":
        t.data = b"\x00" * len(t.data)
        st.write(path, f)
        return "zeros", t.name
    x = rng.choice(
        [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 3e38, 1e-40, 65504.0, 1e5]
    )
    if t.dtype == "F16" and abs(x) > 65504 and x == x and abs(x) != float("inf"):
        x = float("inf")
    which = (
        range(count)
        if rng.random() < 0.3 or count == 1
        else rng.sample(range(count), min(count, rng.choice([1, 3])))
    )
    data = bytearray(t.data)
    for i in which:
        data[i * size : (i + 1) * size] = _float_bytes(t.dtype, x)
    t.data = bytes(data)
    st.write(path, f)
    return "value", f"{t.name} = {x} ({len(which)} of {count})"


# ---------------------------------------------------------------- st-retype
def retype(rng: random.Random, path: Path) -> tuple[str, str]:
    f = st.read(path)
    if not f.tensors:
        return "retype:none", "no tensors"
    t = rng.choice(f.tensors)
    names = [x.name for x in f.tensors]
    what = rng.choice(
        ["dtype", "reshape", "transpose", "drop", "rename", "add", "rank", "empty", "swap", "scalar"]
    )
    detail = t.name
    if what == "dtype":
        same = SAME_SIZE.get(t.dtype)
        if same and rng.random() < 0.6:
            t.dtype = rng.choice(same)
        else:  # another float width, shape adjusted to the bytes
            old = st.DTYPE_SIZE[t.dtype]
            new = rng.choice(["F16", "BF16", "F32", "F64", "U8", "I64"])
            n = len(t.data) // st.DTYPE_SIZE[new]
            if n * st.DTYPE_SIZE[new] != len(t.data) or not t.shape:
                t.data = t.data[: n * st.DTYPE_SIZE[new]]
                t.shape = [n]
            else:
                last = (
                    t.shape[-1] * old // st.DTYPE_SIZE[new]
                    if t.shape[-1] * old % st.DTYPE_SIZE[new] == 0
                    else None
                )
                t.shape = [*t.shape[:-1], last] if last else [n]
            t.dtype = new
        detail += f" -> {t.dtype} {t.shape}"
    elif what == "reshape":
        n = 1
        for d in t.shape:
            n *= d
        t.shape = rng.choice([[n], [1, n], [n, 1], [*t.shape, 1], [1, *t.shape]])
        detail += f" -> shape {t.shape}"
    elif what == "transpose" and len(t.shape) >= 2:
        t.shape = list(reversed(t.shape))
        detail += f" -> shape {t.shape}"
    elif what == "drop":
        f.tensors.remove(t)
    elif what == "rename":
        new = rng.choice([
            t.name.replace("lora_A", "lora_C"), t.name.replace("q_proj", "qq_proj"), t.name.replace("layers.0", "layers.7"),
            t.name.replace(".weight", ""), t.name + ".extra", t.name.replace("lora_down", "lora_middle"),
            rng.choice(names), t.name.upper(), "base_model.model." + t.name,
        ])  # fmt: skip
        if new in names and new != t.name:
            f.tensors = [x for x in f.tensors if x.name != new]
        detail += f" -> {new}"
        t.name = new
    elif what == "add":
        base = t.name.rsplit(".", 2)[0] if "." in t.name else t.name
        new = rng.choice([base + ".lora_magnitude_vector", base + ".alpha", base + ".lora_A.weight",
                          base + ".lora_embedding_A", base + ".hada_w1_a", base + ".lokr_w1", "x.lora_A.weight",
                          base + ".dora_scale", base + ".lora_up.weight"])  # fmt: skip
        shape = rng.choice([[], [1], list(t.shape), [3, 5]])
        n = 1
        for d in shape:
            n *= d
        f.tensors.append(st.Tensor(new, "F32", shape, rng.randbytes(4 * n)))
        detail = f"{new} {shape}"
    elif what == "rank" and len(t.shape) == 2 and t.shape[0] > 1:
        r = t.shape[0] - rng.choice([1, t.shape[0] - 1])
        row = len(t.data) // t.shape[0]
        t.data, t.shape = t.data[: r * row], [r, t.shape[1]]
        detail += f" -> {t.shape}"
    elif what == "empty":
        t.shape = [0, *t.shape[1:]] if t.shape else [0]
        t.data = b""
        detail += f" -> {t.shape}"
    elif what == "swap" and len(f.tensors) > 1:
        u = rng.choice([x for x in f.tensors if x is not t])
        t.name, u.name = u.name, t.name
        detail = f"{t.name} <-> {u.name}"
    else:  # scalar: the tensor becomes a 0-d one
        t.shape, t.data = [], t.data[: st.DTYPE_SIZE.get(t.dtype, 4)]
        what = "scalar"
        detail += " -> 0-d"
    st.write(path, f)
    return f"retype:{what}", detail


FAMILIES = {
    "st-header": header,
    "st-length": length,
    "st-size": size,
    "st-bytes": tensor_bytes,
    "st-retype": retype,
}
