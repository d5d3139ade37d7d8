"""Streaming safetensors reader and writer.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes; offsets are relative to the end of the header.

``safetensors.torch.save_file`` needs every tensor in memory at once. The writer here takes the
header first and then the tensors one at a time, in order, so a merge holds one tensor at a time.
The reader validates the header against the file size before anything is read, so a truncated
or foreign file is reported by name instead of crashing midway.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import FormatError, OutputError
from .files import loads_json, open_regular

if TYPE_CHECKING:  # pragma: no cover
    import torch

# name -> (bytes per element, torch dtype attribute name): the dtypes loractl reads and writes
DTYPE_INFO: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "C64": (8, "complex64"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
#: bits per element of every dtype a safetensors header may declare (safetensors 0.8's ``Dtype``);
#: tensors of the sub-byte ones (F4, F6) are accepted in headers and copied, but not read as tensors
DTYPE_BITS: dict[str, int] = {name: 8 * size for name, (size, _) in DTYPE_INFO.items()}
DTYPE_BITS.update({"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
#: safetensors' limit on the header length
MAX_HEADER = 100_000_000
_U64 = 2**64
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


def dtype_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` (any :data:`DTYPE_BITS` name) and ``shape``."""
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPE_INFO:
        raise FormatError(f"dtype {name} cannot be read as a torch tensor by loractl")
    return getattr(torch, DTYPE_INFO[name][1])


def dtype_name(dtype: torch.dtype) -> str:
    for name, (_, attr) in DTYPE_INFO.items():
        if str(dtype) == f"torch.{attr}":
            return name
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _dups(obj: dict) -> frozenset[str]:
    """The duplicated keys of an object parsed with ``duplicates=True`` (none recorded otherwise)."""
    return getattr(obj, "dups", frozenset())


def _no_duplicate_fields(raw: bytes, entries: int) -> bool:
    """Can a header whose ``entries`` tensor entries all have ``dtype``, ``shape`` and
    ``data_offsets`` hold no entry with one of them twice, and at most one ``__metadata__``? Yes when
    each name occurs literally exactly once per entry (``__metadata__`` at most once) and no ``\\u``
    escape could spell one otherwise."""
    if b"\\u" in raw or raw.count(b'"__metadata__"') > 1:
        return False
    return all(raw.count(b'"%s"' % f.encode()) == entries for f in _TENSOR_FIELDS)


def _short(value: object) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class SafetensorsFile:
    """A safetensors file opened for reading one tensor at a time.

    Args:
        path: the file.

    Raises:
        InputError: the file is missing or unreadable.
        FormatError: the header is not valid safetensors, or the file is shorter than it says.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = -1
        self._map: mmap.mmap | None = None  # for mapped(); tensors made from it keep it alive
        self._fd = open_regular(self.path, ".safetensors file")
        try:
            self.size = os.fstat(self._fd).st_size
            self.metadata, self.tensors, self.data_start = self._read_header()
        except BaseException:
            os.close(self._fd)
            self._fd = -1  # or __del__ would close the number again, by then maybe another file's
            raise

    # -- header -----------------------------------------------------------------------------
    def _fail(self, what: str) -> FormatError:
        return FormatError(
            f"{self.path}: not a valid safetensors file ({what})",
            hint="the file may be truncated or not a safetensors file; re-download or re-export it",
        )

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        """The header, checked exactly as ``safetensors.safe_open`` checks it (safetensors'
        ``SafeTensors::read_metadata`` and ``Metadata::validate``): the length fits the file, the JSON
        is serde_json's, every entry has a known dtype, a shape and two offsets that are unsigned 64-bit
        integers, the sizes do not overflow 64 bits, the tensors are contiguous from offset 0 in offset
        order, and they cover the rest of the file exactly (no gap, no overlap, no trailing bytes)."""
        if self.size < 8:
            raise self._fail(f"{self.size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > MAX_HEADER or 8 + n > self.size:
            raise self._fail(f"header length {n} does not fit in the file's {self.size} bytes")
        raw = os.pread(self._fd, n, 8)
        if len(raw) != n:
            raise self._fail("the file changed while being read")
        # parsed first without recording duplicate keys (four times faster); where a duplicate field
        # could hide in what was accepted, parsed again recording them
        result = self._parse_header(raw, n, duplicates=False)
        if not _no_duplicate_fields(raw, len(result[1])):
            result = self._parse_header(raw, n, duplicates=True)
        return result

    def _parse_header(
        self, raw: bytes, n: int, duplicates: bool
    ) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        try:
            header = loads_json(raw, f"{self.path}: header", strict=True, duplicates=duplicates)
        except FormatError as e:
            raise self._fail("header: " + e.message.split(": header: ", 1)[-1]) from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        if "__metadata__" in _dups(header):
            raise self._fail("header has two __metadata__ entries")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ is not a map of strings")
        data_start = 8 + n
        infos = [self._entry(name, entry, data_start) for name, entry in header.items()]
        infos.sort(key=lambda t: (t.begin, t.end))
        end = data_start
        for t in infos:
            if t.begin != end:
                what = "overlaps the tensor before it" if t.begin < end else "leaves a gap before it"
                if end == data_start and t.begin > end:
                    what = "does not start at offset 0 (a gap at the start of the data)"
                raise self._fail(f"tensor {t.name!r} {what} (data_offsets {t.begin - data_start})")
            end = t.end
        if end > self.size:
            last = next(t for t in infos if t.end > self.size)
            raise FormatError(
                f"{self.path}: truncated: tensor {last.name!r} ({list(last.shape)} {last.dtype}) ends at "
                f"byte {last.end} but the file has {self.size} bytes",
                hint="the file is incomplete (interrupted download or copy?); fetch it again",
            )
        if end < self.size:
            raise self._fail(
                f"{self.size - end} bytes after the last tensor, which the header does not cover"
            )
        return dict(metadata), {t.name: t for t in infos}, data_start

    def _entry(self, name: str, entry: object, data_start: int) -> TensorInfo:
        """One header entry, as safetensors' ``TensorInfo`` (with serde's checks) and its size."""
        if type(entry) is not dict:
            if not isinstance(entry, dict):
                raise self._fail(f"tensor {name!r}: entry is not a JSON object")
            for field in _TENSOR_FIELDS:
                if field in _dups(entry):
                    raise self._fail(f"tensor {name!r}: two {field!r} fields")
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except KeyError as e:
            raise self._fail(f"tensor {name!r}: no {e.args[0]!r} field") from None
        if type(dtype) is not str:
            if isinstance(dtype, dict) and len(dtype) == 1 and next(iter(dtype.values())) is None:
                dtype = next(iter(dtype))  # serde's other spelling of an enum's unit variant: {"F32": null}
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise self._fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if type(shape) is not list:
            raise self._fail(f"tensor {name!r}: shape {_short(shape)} is not a list of unsigned integers")
        if type(offsets) is not list or len(offsets) != 2:
            raise self._fail(f"tensor {name!r}: data_offsets {_short(offsets)} is not two unsigned integers")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not (0 <= begin < _U64 and 0 <= end < _U64):
            raise self._fail(f"tensor {name!r}: data_offsets {_short(offsets)} is not two unsigned integers")
        elements = 1
        for d in shape:
            if type(d) is not int or not 0 <= d < _U64:  # (bool is not int here, as in serde)
                raise self._fail(f"tensor {name!r}: shape {_short(shape)} is not a list of unsigned integers")
            elements *= d
            if elements >= _U64:
                raise self._fail(f"tensor {name!r}: shape {_short(shape)} has more than 2^64 elements")
        bits = elements * DTYPE_BITS[dtype]
        if bits >= _U64:
            raise self._fail(f"tensor {name!r}: shape {_short(shape)} {dtype} is more than 2^64 bits")
        if bits % 8:
            raise self._fail(f"tensor {name!r}: shape {shape} {dtype} does not end on a byte boundary")
        if end < begin:
            raise self._fail(f"tensor {name!r}: data_offsets [{begin}, {end}] end before they begin")
        if end - begin != bits // 8:
            raise self._fail(f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}")
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    # -- reading ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def read_bytes_into(self, info: TensorInfo, buf: memoryview) -> None:
        """Read the bytes of ``info`` into ``buf`` (exactly ``info.nbytes`` long)."""
        self.read_range_into(info.begin, buf[: info.nbytes], info.name)

    def read_range_into(self, offset: int, buf: memoryview, name: str) -> None:
        """Fill ``buf`` with the file's bytes from ``offset`` (part of tensor ``name``, for the error)."""
        pos = 0
        while pos < len(buf):
            got = os.preadv(self._fd, [buf[pos:]], offset + pos)
            if got == 0:
                raise FormatError(f"{self.path}: truncated while reading tensor {name!r}")
            pos += got

    def readable_info(self, name: str) -> TensorInfo:
        """The entry of tensor ``name``, refusing what torch cannot hold (a sub-byte dtype, a dimension
        beyond 2^63 - 1, which a header may declare for an empty tensor)."""
        info = self.tensors[name]
        if info.dtype not in DTYPE_INFO:
            raise FormatError(
                f"{self.path}: tensor {name!r} has dtype {info.dtype}, which loractl cannot read"
            )
        if any(d >= 2**63 for d in info.shape):
            raise FormatError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)}, beyond what torch holds"
            )
        return info

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` into a new (writable, owned) torch tensor, or into ``out`` (a contiguous
        tensor of its dtype and shape, e.g. from :class:`loractl.io.buffers.BufferPool`)."""
        import torch

        info = self.readable_info(name)
        if out is None:
            out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        elif (
            out.dtype != torch_dtype(info.dtype) or tuple(out.shape) != info.shape or not out.is_contiguous()
        ):
            raise ValueError(f"{self.path}: buffer for {name!r} is {out.dtype} {tuple(out.shape)}")
        if info.nbytes:
            self.read_bytes_into(info, memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B"))
        return out

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a copy-on-write view of the file's pages (no read, no copy; writes to
        it stay private to this process). For read-mostly analyses of whole adapters: the kernel maps
        the cached pages in batches instead of copying them into fresh memory. Falls back to
        :meth:`read` for tensors not aligned to their element size."""
        import torch

        info = self.readable_info(name)
        dtype = torch_dtype(info.dtype)
        size = DTYPE_INFO[info.dtype][0]
        if info.nbytes == 0 or info.begin % size:
            return self.read(name)
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._map, dtype=dtype, count=info.nbytes // size, offset=info.begin)
        return flat.view(info.shape)

    def copy_raw_to(self, info: TensorInfo, out_fd: int) -> None:
        """Copy the bytes of ``info`` to the current position of ``out_fd`` without passing them through Python."""
        copy_range(self._fd, info.begin, out_fd, info.nbytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def copy_range(in_fd: int, offset: int, out_fd: int, nbytes: int) -> None:
    """Kernel-side copy of ``nbytes`` from ``in_fd`` at ``offset`` to ``out_fd``'s position."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        chunk = min(nbytes - done, 1 << 30)
        try:
            if use_cfr:
                n = os.copy_file_range(in_fd, out_fd, chunk, offset + done)
            else:
                n = os.sendfile(out_fd, in_fd, offset + done, chunk)
        except OSError as e:
            if use_cfr and e.errno in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                use_cfr = False
                continue
            raise
        if n == 0:
            raise EOFError("source ended early")
        done += n


def header_bytes(
    entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> bytes:
    """The 8-byte length and the JSON header for tensors written in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for name, dtype, shape in entries:
        n = dtype_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


#: O_DIRECT needs buffers, file offsets and lengths aligned to the device's block size; 4 KiB covers them
DIRECT_ALIGN = 4096
#: bytes staged before each O_DIRECT write
DIRECT_STAGE = 8 << 20
#: O_DIRECT writes in flight at once (the disk is faster with more than one queued)
DIRECT_INFLIGHT = 2
_stages: list[mmap.mmap] = []  # page-aligned staging buffers, reused (fresh memory costs page faults)
_stages_lock = threading.Lock()


def _take_stage() -> mmap.mmap:
    with _stages_lock:
        while _stages:
            stage = _stages.pop()
            if len(stage) >= DIRECT_STAGE:
                return stage
        return mmap.mmap(-1, DIRECT_STAGE)


def _give_stage(stage: mmap.mmap) -> None:
    with _stages_lock:
        if len(_stages) <= DIRECT_INFLIGHT:
            _stages.append(stage)


_pool: ThreadPoolExecutor | None = None


def _direct_pool() -> ThreadPoolExecutor:
    global _pool
    with _stages_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DIRECT_INFLIGHT, thread_name_prefix="loractl-direct")
        return _pool


class SafetensorsWriter:
    """Write a safetensors file whose header is known up front, one tensor at a time, in order.

    With ``direct``, the bytes are staged in an aligned buffer and written with ``O_DIRECT``, past the
    page cache: a merge's output then takes no new memory, whose first touch is slow on virtual
    machines that hand freed memory back to the host, and does not push the base's own pages out of
    the cache. Where ``O_DIRECT`` is not supported (tmpfs, some network filesystems) it writes through
    the page cache as usual.

    Args:
        path: the file to create (it must not exist: pass a temporary path, see ``io.atomic``).
        entries: ``(name, dtype name, shape)`` in the order the tensors will be written.
        metadata: the ``__metadata__`` map of strings.
        direct: write with ``O_DIRECT`` where the filesystem allows it.
        mode: the file's permission bits, set before any byte is written (e.g. the base's 0o600);
            default 0o644 less the umask.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        direct: bool = False,
        mode: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._entries = entries
        self._next = 0
        self._stage: mmap.mmap | None = None
        self._inflight: deque[tuple[Future[None], mmap.mmap]] = deque()
        self._fill = 0  # bytes staged
        self._off = 0  # bytes written to the file (a multiple of DIRECT_ALIGN while staging)
        self._size = 0  # bytes the file will have
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
                self._stage = _take_stage()
            except OSError:
                self.path.unlink(missing_ok=True)  # created under O_EXCL just now: ours to remove
                self._fd = -1
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        try:
            if mode is not None:
                os.fchmod(self._fd, mode)
            self._write_all(header_bytes(entries, metadata))
        except BaseException:
            self.close()
            raise

    @property
    def direct(self) -> bool:
        """Is this file being written with O_DIRECT?"""
        return self._stage is not None

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._stage is None:
            write_fully(self._fd, view, self.path)
            return

        def fill(dst: memoryview, done: int) -> None:
            dst[:] = view[done : done + len(dst)]

        self._staged(len(view), fill)

    def _staged(self, nbytes: int, fill: Callable[[memoryview, int], None]) -> None:
        """Stage ``nbytes`` more bytes, flushing each full stage: ``fill(dst, done)`` puts bytes
        ``done … done + len(dst)`` of them into ``dst``, a slice of the staging buffer."""
        self._size += nbytes
        done = 0
        while done < nbytes:
            assert self._stage is not None
            n = min(nbytes - done, DIRECT_STAGE - self._fill)
            with memoryview(self._stage) as whole:
                fill(whole[self._fill : self._fill + n], done)
            self._fill += n
            done += n
            if self._fill == DIRECT_STAGE:
                self._flush()

    def _flush(self) -> None:
        """Hand what is staged to a writing thread (padded to the alignment; :meth:`finish` truncates the
        padding away) and stage into another buffer meanwhile: up to :data:`DIRECT_INFLIGHT` writes go
        to the disk at once, which it needs to reach its speed with O_DIRECT."""
        assert self._stage is not None
        n = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
        self._inflight.append((_direct_pool().submit(self._pwrite, self._stage, n, self._off), self._stage))
        self._off += self._fill
        self._fill = 0
        if len(self._inflight) >= DIRECT_INFLIGHT:
            done, self._stage = self._inflight.popleft()
            done.result()
        else:
            self._stage = _take_stage()

    def _pwrite(self, stage: mmap.mmap, n: int, offset: int) -> None:
        view = memoryview(stage)[:n]
        pos = 0
        buffered = False
        try:
            while pos < n:
                try:
                    pos += os.pwrite(self._fd, view[pos:], offset + pos)
                except OSError as e:
                    if e.errno != errno.EINVAL or pos or buffered:
                        raise disk_error(self.path, e) from None
                    # this filesystem refuses O_DIRECT after all: write through the page cache
                    import fcntl

                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    buffered = True
        finally:
            view.release()

    def _drain(self, check: bool) -> None:
        """Wait for the writes in flight and take their buffers back (raising their error if ``check``)."""
        error: BaseException | None = None
        while self._inflight:
            fut, stage = self._inflight.popleft()
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below once every write is done
                error = error or e
            _give_stage(stage)
        if error is not None and check:
            raise error

    def _expect(self, name: str, nbytes: int) -> None:
        if self._next >= len(self._entries):
            raise RuntimeError(f"{self.path}: no more tensors expected, got {name!r}")
        ename, dtype, shape = self._entries[self._next]
        want = dtype_nbytes(dtype, shape)
        if ename != name or want != nbytes:
            raise RuntimeError(
                f"{self.path}: expected {ename!r} ({want} bytes), got {name!r} ({nbytes} bytes)"
            )
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (it must be the next entry, with the declared dtype and shape)."""
        import torch

        if self._next < len(self._entries):
            _, dtype, shape = self._entries[self._next]
            if tensor.dtype != torch_dtype(dtype) or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(
                    f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}"
                )
        t = tensor.detach().contiguous().view(-1)
        nbytes = t.numel() * t.element_size()
        self._expect(name, nbytes)
        if nbytes:
            self._write_all(memoryview(t.view(torch.uint8).numpy()))

    def copy_from(self, name: str, src: SafetensorsFile, info: TensorInfo) -> None:
        """Write the next tensor by copying its bytes unchanged from ``src``."""
        self._expect(name, info.nbytes)
        if self._stage is not None:  # read straight into the staging buffer
            self._staged(
                info.nbytes, lambda dst, done: src.read_range_into(info.begin + done, dst, info.name)
            )
            return
        try:
            src.copy_raw_to(info, self._fd)
        except OSError as e:
            raise disk_error(self.path, e) from None

    def finish(self) -> None:
        """Check that every declared tensor was written and write out what is still staged."""
        if self._next != len(self._entries):
            raise RuntimeError(f"{self.path}: {len(self._entries) - self._next} tensors never written")
        if self._stage is not None:
            if self._fill:
                self._flush()
            self._drain(check=True)
            try:
                os.ftruncate(self._fd, self._size)  # the last block's padding
            except OSError as e:
                raise disk_error(self.path, e) from None
            _give_stage(self._stage)
            self._stage = None

    def sync(self) -> None:
        """Make what was written durable (fsync)."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise disk_error(self.path, e) from None

    def close(self, sync: bool = False) -> None:
        if self._fd < 0:
            return
        try:
            if sync:
                self.finish()
                self.sync()
        finally:
            self._drain(check=False)  # (an error here was raised by finish(), or the write is abandoned)
            os.close(self._fd)
            self._fd = -1
            if self._stage is not None:
                _give_stage(self._stage)
                self._stage = None


def write_fully(fd: int, view: memoryview, path: Path) -> None:
    """Write all of ``view`` at ``fd``'s position (``os.write`` may write less than asked); a failure
    becomes :func:`disk_error` naming ``path``."""
    while view:
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise disk_error(path, e) from None
        view = view[n:]


def disk_error(path: Path, e: OSError) -> OutputError:
    """An OSError while writing, turned into one clear line."""
    if e.errno in (28, 27, 122):  # ENOSPC, EFBIG, EDQUOT
        return OutputError(
            f"{path}: no space left on the device ({e.strerror})",
            hint="free some disk space or write elsewhere; nothing was left behind",
        )
    return OutputError(f"{path}: cannot write ({e.strerror})")


def write_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a whole (small) dict of tensors, e.g. an adapter or a receipt."""
    entries = [(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    w = SafetensorsWriter(path, entries, metadata)
    try:
        for k, v in tensors.items():
            w.write(k, v)
        w.close(sync=True)
    finally:
        w.close()


class SpooledWriter:
    """A safetensors file whose tensors are not known in advance: each is appended to a spool file as
    it comes (so none stays in memory), and :meth:`finish` writes the header then the spooled bytes.

    Args:
        spool: a path for the spool file (it must not exist; it is removed by :meth:`close`).
    """

    def __init__(self, spool: str | os.PathLike[str]) -> None:
        self.spool = Path(spool)
        self._fd = os.open(self.spool, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._entries: list[tuple[str, str, tuple[int, ...]]] = []
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        t = tensor.detach().contiguous().view(-1)
        data = memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        write_fully(self._fd, data.cast("B"), self.spool)
        self._entries.append((name, dtype_name(tensor.dtype), tuple(tensor.shape)))
        self._size += len(data)

    def finish(
        self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None, mode: int | None = None
    ) -> int:
        """Write the safetensors file at ``path`` (with permission bits ``mode`` if given); returns its size."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            head = header_bytes(self._entries, metadata)
            write_fully(fd, memoryview(head), path)
            copy_range(self._fd, 0, fd, self._size)
            os.fsync(fd)
        except OSError as e:
            raise disk_error(path, e) from None
        finally:
            os.close(fd)
        return len(head) + self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.spool.unlink(missing_ok=True)


class TensorSource(Protocol):
    """What a reader of one model's tensors needs of it (:class:`loractl.io.base.BaseModel` is one):
    the quantized-weight readers (``io.quant``, ``io.fp8``, ``io.quantized``) take this, so that
    ``io.base`` may use them without their importing it back."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, tuple[int, TensorInfo]]

    @property
    def is_dir(self) -> bool: ...

    def info(self, name: str) -> TensorInfo: ...

    def file_of(self, name: str) -> SafetensorsFile: ...

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor: ...
