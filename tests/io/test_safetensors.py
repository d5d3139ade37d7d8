"""The streaming reader and writer against the safetensors library itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loractl.errors import FormatError, InputError
from loractl.io import safetensors as st_io
from loractl.io.safetensors import SafetensorsFile, SafetensorsWriter, dtype_name, write_file

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5),
    dtype_idx=st.lists(st.integers(0, len(DTYPES) - 1), min_size=5, max_size=5),
)
def test_writer_output_reads_back_with_safetensors(tmp_path_factory, shapes, dtype_idx) -> None:
    tmp = tmp_path_factory.mktemp("st")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, shape in enumerate(shapes):
        dt = DTYPES[dtype_idx[i]]
        t = (torch.randn(shape, generator=g) * 10).to(dt)
        tensors[f"t{i}.weight"] = t
    write_file(tmp / "a.safetensors", tensors, {"k": "v"})
    back = load_file(tmp / "a.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    with SafetensorsFile(tmp / "a.safetensors") as f:
        assert f.metadata == {"k": "v"}
        for k in tensors:
            assert torch.equal(f.read(k), tensors[k])


def test_reader_reads_files_written_by_safetensors(tmp_path: Path) -> None:
    t = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        assert torch.equal(f.read("a"), t["a"]) and torch.equal(f.read("b"), t["b"])
        # the reader gives an owned, writable tensor
        x = f.read("a")
        x += 1
        assert torch.equal(f.read("a"), t["a"])


def test_raw_copy_is_byte_exact(tmp_path: Path) -> None:
    t = {"a": torch.randn(100, 7), "b": torch.randn(3).to(torch.bfloat16)}
    save_file(t, tmp_path / "src.safetensors")
    src = SafetensorsFile(tmp_path / "src.safetensors")
    entries = [(k, src.tensors[k].dtype, src.tensors[k].shape) for k in src.keys()]
    w = SafetensorsWriter(tmp_path / "dst.safetensors", entries)
    for k in src.keys():
        w.copy_from(k, src, src.tensors[k])
    w.close(sync=True)
    back = load_file(tmp_path / "dst.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_writer_refuses_out_of_order_or_wrong_shape(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (2,)), ("b", "F32", (3,))])
    with pytest.raises(RuntimeError, match="expected 'a'|header says"):
        w.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close(sync=True)


def test_writer_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "o.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        SafetensorsWriter(tmp_path / "o.safetensors", [])
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep"


def _header(obj: dict) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "does not fit"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}) + b"\0" * 4, "truncated"),
        (_header({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}) + b"\0" * 8, "unknown dtype"),
        (
            _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + b"\0" * 8,
            "bytes for shape",
        ),
        (
            _header(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                }
            )
            + b"\0" * 12,
            "overlap",
        ),
    ],
)
def test_corrupt_headers_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(FormatError, match=message) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="directory"):
        SafetensorsFile(tmp_path)


def test_dtype_names() -> None:
    assert dtype_name(torch.bfloat16) == "BF16" and dtype_name(torch.float32) == "F32"


@pytest.mark.parametrize("stage", [4096, 3 * 4096, 1 << 20])
def test_direct_writer_gives_the_same_bytes(tmp_path: Path, monkeypatch, stage: int) -> None:
    """O_DIRECT writing (staged, aligned, padding truncated away) gives byte for byte the file the
    buffered writer gives, for tensors written and raw-copied, across staging-buffer boundaries."""
    monkeypatch.setattr(st_io, "DIRECT_STAGE", stage)
    g = torch.Generator().manual_seed(1)
    t = {
        "a": torch.randn(1000, 7, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "c": torch.randn(4099, generator=g).to(torch.float16),
        "d": torch.zeros(0),
        "e": torch.randn(2, 5, generator=g),
    }
    save_file(t, tmp_path / "src.safetensors")
    src = SafetensorsFile(tmp_path / "src.safetensors")
    entries = [(k, src.tensors[k].dtype, src.tensors[k].shape) for k in src.keys()]
    out = {}
    for direct in (False, True):
        path = tmp_path / f"dst-{direct}.safetensors"
        w = SafetensorsWriter(path, entries, {"k": "v"}, direct=direct)
        if direct:
            assert w.direct  # /tmp here is ext4, which takes O_DIRECT
        for i, k in enumerate(src.keys()):
            if i % 2:
                w.copy_from(k, src, src.tensors[k])
            else:
                w.write(k, src.read(k))
        w.close(sync=True)
        out[direct] = path.read_bytes()
    assert out[True] == out[False]
    back = load_file(tmp_path / "dst-True.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_direct_writer_falls_back_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch, refused_at: str
) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL at open, as tmpfs on older kernels, or at the first
    write, as some network filesystems) gets the same bytes through the page cache."""
    import errno
    import os

    real_open, real_pwrite = os.open, os.pwrite

    def fake_open(path, flags, *a, **kw):
        if refused_at == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    def fake_pwrite(fd, data, offset):
        import fcntl

        if refused_at == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    monkeypatch.setattr(st_io, "DIRECT_STAGE", 4096)
    path = tmp_path / "x.safetensors"
    a = torch.arange(3000, dtype=torch.float32)
    w = SafetensorsWriter(path, [("a", "F32", (3000,)), ("b", "F32", (3,))], direct=True)
    assert w.direct == (refused_at == "write")
    w.write("a", a)
    w.write("b", torch.tensor([1.0, 2.0, 3.0]))
    w.close(sync=True)
    back = load_file(path)
    assert torch.equal(back["a"], a) and torch.equal(back["b"], torch.tensor([1.0, 2.0, 3.0]))


def test_mapped_tensors_equal_read_ones_and_writes_stay_private(tmp_path: Path) -> None:
    t = {"a": torch.randn(64, 33), "b": torch.randn(5).to(torch.bfloat16), "c": torch.zeros(0)}
    save_file(t, tmp_path / "x.safetensors")
    before = (tmp_path / "x.safetensors").read_bytes()
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        mapped = {k: f.mapped(k) for k in t}
    for k in t:
        assert mapped[k].dtype == t[k].dtype and torch.equal(mapped[k], t[k])
    mapped["a"] += 1  # copy-on-write: the file is not touched
    assert (tmp_path / "x.safetensors").read_bytes() == before
    assert torch.equal(load_file(tmp_path / "x.safetensors")["a"], t["a"])


def test_a_refused_file_does_not_close_another_files_descriptor_later(tmp_path: Path) -> None:
    """A file refused while opening closes its descriptor at once and never again: the number may by
    then belong to another open file (this once closed a base shard under a running merge)."""
    import gc

    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    save_file({"a": torch.ones(2)}, tmp_path / "good.safetensors")
    for _ in range(3):
        with pytest.raises(FormatError) as refused:  # its traceback keeps the half-made object alive
            SafetensorsFile(tmp_path / "bad.safetensors")
        good = SafetensorsFile(tmp_path / "good.safetensors")  # likely gets the same descriptor number
        del refused
        gc.collect()  # runs the refused object's __del__
        assert torch.equal(good.read("a"), torch.ones(2))
        good.close()


def test_direct_writer_reports_a_full_disk_after_falling_back(tmp_path: Path, monkeypatch) -> None:
    """O_DIRECT refused at the first write, then the disk full on the buffered retry: one clear
    OutputError naming the file, as for every other failed write."""
    import errno
    import os

    from loractl.errors import OutputError

    def fake_pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    monkeypatch.setattr(st_io, "DIRECT_STAGE", 4096)
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("a", "F32", (3000,))], direct=True)
    assert w.direct
    with pytest.raises(OutputError) as e:
        w.write("a", torch.arange(3000, dtype=torch.float32))
        w.close(sync=True)
    assert str(path) in str(e.value)
    w.close()
