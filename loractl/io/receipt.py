"""Merge receipts: what an unmerge needs to give back the base bit for bit.

A receipt is a safetensors file, ``MERGED/loractl.receipt`` inside a merged folder or
``MERGED.loractl.receipt`` beside a merged file (never a ``*.safetensors`` at the top of a folder, so no
model loader takes it for weights). Its tensors are named ``<base tensor>::<part>``, the parts of
:mod:`loractl.ops.residual` (``gap8``, ``gapbig``, ``d8``, ``valbig``: where and by how much the
subtraction misses the original; ``full``: the original itself, when smaller or when a saved tensor
replaced it) and ``dora<k>`` (DoRA's norm factors of the k-th contribution). Its header metadata:

- ``loractl.receipt``: the format version (:data:`RECEIPT_VERSION`), ``loractl.version``;
- ``adapters``: each adapter's path, sha256, weight and format, in merge order;
- ``changed``: the base tensors the merge changed; ``dtypes``: tensors written in another dtype
  (name -> the base's dtype); ``shard_metadata``: each base shard's header metadata;
- ``sum64``: a checksum of each original tensor the receipt restores (:func:`tensor_sum64`), checked
  after restoring it (receipts of format 1 hold a ``crc32`` instead, still read);
- ``index``: the base's index file as it was (written back when the restored model has its weight map);
- for a quantized (FP8) base: ``quantized``, each weight the merge rewrote (its FP8 ``dtype``,
  ``block``, ``scale`` key, ``requantized``); ``aux``, the tensors kept whole (``<key>::full``: the
  original scales, activation scales); ``order``, the base's tensor names per shard when the merged
  model lacks some; ``config``, the original ``config.json`` when the merged model's differs.

Tensors are added while the merge streams (:class:`ReceiptWriter`: spooled to disk, never held in
memory), and the file is written once the merge is done.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import native
from ..errors import InputError
from .base import RECEIPT_NAME
from .files import loads_json
from .safetensors import DTYPE_INFO, SafetensorsFile, SpooledWriter

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..provenance import AdapterRef
    from .base import BaseModel

RECEIPT_VERSION = "2"
#: the formats an unmerge reads: 1 (checksums are crc32) and 2 (checksums are :func:`tensor_sum64`)
READABLE_VERSIONS = ("1", "2")
_SUM_WORDS = 1 << 17  # words per chunk of tensor_sum64: 1 MiB, in cache
_weights_cache: list[object] = []


def receipt_path(merged: Path) -> Path:
    """Where the receipt of a merged model lies: ``MERGED/loractl.receipt`` or ``MERGED.loractl.receipt``."""
    return merged / RECEIPT_NAME if merged.is_dir() else receipt_beside(merged)


def receipt_beside(merged: Path) -> Path:
    """The receipt of a single-file merged model: ``MERGED.loractl.receipt`` beside it."""
    return merged.with_name(merged.name + ".loractl.receipt")


def tensor_sum64(t: torch.Tensor) -> str:
    """A 128-bit Fletcher-style checksum of a tensor's bytes: with wᵢ the bytes as little-endian 64-bit
    words (the last one zero-padded), ``(Σ wᵢ mod 2⁶⁴, Σ (i+1)·wᵢ mod 2⁶⁴)`` as 32 hex digits.

    Any change of one word changes the first sum, and any reordering of words the second, so it
    tells a restored tensor that is not the original (what the receipt's check is for); it is not a
    cryptographic hash. Twice as fast as zlib's crc32 here (a merge checksums every tensor it
    changes): one ``sum`` and one ``dot`` per cache-sized chunk, no copies."""
    import numpy as np
    import torch

    flat = t.detach().contiguous().view(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    whole = raw.size // 8 * 8
    pieces = [(raw[:whole].view(np.uint64), 0)]  # (words, number of the first)
    if whole < raw.size:  # the last word zero-padded, summed on its own (no copy of the rest)
        pieces.append((np.frombuffer(raw[whole:].tobytes() + b"\0" * (8 - raw.size + whole), np.uint64), whole // 8))
    sums = [0, 0]
    for words, first in pieces:
        if native.enabled():  # the same sums in one pass (loractl/_kernels.c), 2x numpy's
            native.sum64(words, first, sums)
        else:
            _sum64_numpy(words, first, sums)
    mask = (1 << 64) - 1
    return f"{sums[0] & mask:016x}{sums[1] & mask:016x}"


def _sum64_numpy(words: Any, first: int, sums: list[int]) -> None:
    """:func:`loractl.native.sum64` in numpy: one ``sum`` and one ``dot`` per cache-sized chunk."""
    import numpy as np

    if not _weights_cache:
        _weights_cache.append(np.arange(1, _SUM_WORDS + 1, dtype=np.uint64))
    weights = _weights_cache[0]
    with np.errstate(over="ignore"):
        for off in range(0, words.size, _SUM_WORDS):
            c = words[off : off + _SUM_WORDS]
            a = int(c.sum(dtype=np.uint64))
            sums[0] += a
            sums[1] += int(np.dot(c, weights[: c.size])) + (first + off) * a  # type: ignore[index]


def tensor_crc32(t: torch.Tensor) -> int:
    """crc32 of a tensor's bytes (a cheap check that a restored tensor is the original)."""
    import torch

    flat = t.detach().contiguous().view(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))


class ReceiptWriter:
    """A receipt being made while a merge streams: parts are spooled to disk as they come, checksums
    kept, and :meth:`finish` writes the file.

    Args:
        spool: a path for the spool file (it must not exist; it is removed by :meth:`close`).
    """

    def __init__(self, spool: Path) -> None:
        self._spool = SpooledWriter(spool)
        self.checksums: dict[str, str] = {}

    def add(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        """The parts of base tensor ``name`` (on the computing thread)."""
        for k, v in parts.items():
            self._spool.add(f"{name}::{k}", v)

    def checksum(self, name: str, original: torch.Tensor) -> None:
        """Record the checksum of original tensor ``name`` (on the reading thread: numpy lets go of the GIL)."""
        self.checksums[name] = tensor_sum64(original)

    def finish(
        self,
        path: Path,
        refs: Sequence[AdapterRef],
        base: BaseModel,
        changed: Sequence[str],
        dtypes: dict[str, str],
        mode: int,
        extra: dict[str, str] | None = None,
    ) -> int:
        """Write the receipt at ``path`` (a new file, with permission bits ``mode``); returns its size.
        ``extra``: more metadata (a quantized base's records: ``quantized``, ``aux``, ``order``,
        ``config``; the base's ``index``)."""
        from .. import __version__

        meta = {
            "loractl.receipt": RECEIPT_VERSION,
            "loractl.version": __version__,
            "adapters": json.dumps([asdict(r) for r in refs]),
            "changed": json.dumps(sorted(changed)),
            "dtypes": json.dumps(dtypes),
            "shard_metadata": json.dumps({s.path.name: s.metadata for s in base.shards}),
            "sum64": json.dumps(self.checksums),
            **(extra or {}),
        }
        size = self._spool.finish(path, meta, mode=mode)
        self.close()
        return size

    def close(self) -> None:
        self._spool.close()


class Receipt:
    """A receipt opened for an unmerge.

    Raises:
        InputError: not a loractl receipt, or one of an incompatible version.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SafetensorsFile(path)
        meta = self._file.metadata
        self.version = meta.get("loractl.receipt")
        if self.version not in READABLE_VERSIONS:
            self._file.close()
            raise InputError(f"{path}: not a loractl receipt (or from an incompatible version)")
        try:
            self.adapters: list[dict[str, Any]] = self._meta(meta, "adapters", [], _ADAPTERS)
            self.dtypes: dict[str, str] = self._meta(meta, "dtypes", {}, _DTYPES)
            self.shard_metadata: dict[str, dict[str, str]] = self._meta(meta, "shard_metadata", {}, _SHARDS)
            self.checksums: dict[str, int] | dict[str, str] = (
                self._meta(meta, "crc32", {}, _CRC32)
                if self.version == "1"
                else self._meta(meta, "sum64", {}, _SUM64)
            )
            self._read_originals(meta)
        except InputError:
            self._file.close()
            raise
        except (ValueError, TypeError, AttributeError, KeyError):
            self._file.close()
            raise InputError(f"{path}: its metadata is not readable; not a receipt loractl wrote") from None
        self._entries: dict[str, list[str]] = {}
        for k in self._file.keys():
            self._entries.setdefault(k.split("::", 1)[0], []).append(k)

    def _read_originals(self, meta: dict[str, str]) -> None:
        """The records of a quantized base's merge (see :func:`loractl.merging.keep_originals`); each
        absent from older receipts and from those of unquantized bases.

        Raises:
            ValueError, TypeError, KeyError: a record that is not what loractl writes.
        """
        self.quantized: dict[str, dict[str, Any]] = self._meta(meta, "quantized", {}, _ANY)
        self.aux: list[str] = self._meta(meta, "aux", [], _ANY)
        self.order: dict[str, list[str]] | None = self._meta(meta, "order", None, _ANY)
        self.config: str | None = meta.get("config")
        self.index: str | None = meta.get("index")
        if not isinstance(self.quantized, dict) or not isinstance(self.aux, list):
            raise TypeError("quantized/aux")
        for name, rec in self.quantized.items():
            block = rec["block"]
            ok = (
                isinstance(rec["dtype"], str)
                and isinstance(rec["scale"], str)
                and isinstance(rec["requantized"], bool)
                and (
                    block is None
                    or (
                        isinstance(block, list)
                        and len(block) == 2
                        and all(isinstance(x, int) and x > 0 for x in block)
                    )
                )
            )
            if not ok or f"{rec['scale']}::full" not in self._file:
                raise TypeError(f"quantized[{name!r}]")
        for k in self.aux:
            if not isinstance(k, str) or f"{k}::full" not in self._file:
                raise TypeError(f"aux {k!r}")
        if self.order is not None and not (
            isinstance(self.order, dict) and all(isinstance(v, list) for v in self.order.values())
        ):
            raise TypeError("order")

    def stored(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The dtype (safetensors name) and shape of tensor ``name`` kept whole (``name::full``)."""
        info = self._file.tensors[f"{name}::full"]
        return info.dtype, tuple(info.shape)

    def whole(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as the receipt keeps it whole (an FP8 weight's scale, a tensor merge removed).

        Raises:
            InputError: the receipt holds other parts for it than the whole tensor.
        """
        from .safetensors import torch_dtype

        dtype, shape = self.stored(name)
        return self.parts(name, shape, torch_dtype(dtype))["full"]

    def _meta(
        self, meta: Mapping[str, str], key: str, default: Any, kind: tuple[str, Callable[[Any], bool]]
    ) -> Any:
        """The JSON document in header metadata ``key`` (``default`` when absent), of the kind loractl writes.

        Raises:
            InputError: not JSON (or nested too deeply), or not of that kind.
        """
        text = meta.get(key)
        if text is None:
            return default
        doc = loads_json(text, f"{self.path}: metadata {key!r}")
        what, ok = kind
        if not ok(doc):
            raise InputError(f"{self.path}: metadata {key!r} is not {what}; not a receipt loractl wrote")
        return doc

    def check_adapters(self, refs: Sequence[AdapterRef]) -> None:
        """Refuse adapters or weights other than the merge's, in its order.

        Raises:
            InputError: naming the adapters the receipt was written for.
        """
        got = [(r.sha256, r.weight) for r in refs]
        try:
            want = [(r["sha256"], float(r["weight"])) for r in self.adapters]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self.path}: its adapter list is not readable") from None
        if got != want:
            names = ", ".join(
                Path(str(r.get("path", "?"))).name + " ×" + str(r.get("weight")) for r in self.adapters
            )
            raise InputError(
                f"{self.path}: this receipt was written for other adapters or weights ({names})",
                hint="give the same adapters and --weight values, in the same order, as the merge",
            )

    def parts(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The parts recorded for base tensor ``name`` ({} when it needs none), checked against the
        tensor's ``shape`` and original ``dtype``: each of the dtype and shape
        :func:`loractl.ops.residual.decode` and the DoRA division need, and consistent together.

        Raises:
            InputError: naming the receipt and the part (``name::part``) that does not fit.
        """
        parts = {k.split("::", 1)[1]: self._file.read(k) for k in self._entries.get(name, [])}
        bad = parts_problem(parts, tuple(shape), dtype)
        if bad is not None:
            part, problem = bad
            raise InputError(
                f"{self.path}: tensor {name + '::' + part!r} {problem}; not the receipt loractl wrote for this model",
                hint="give the receipt this merge wrote, or --no-receipt to subtract (close, not exact)",
            )
        return parts

    def verify(self, name: str, restored: torch.Tensor, merged: Path) -> None:
        """Check a restored tensor against the checksum recorded at merge time.

        Raises:
            InputError: it does not come back to the original.
        """
        if name not in self.checksums:
            return
        got = tensor_crc32(restored) if self.version == "1" else tensor_sum64(restored)
        if got != self.checksums[name]:
            raise InputError(
                f"{merged}: tensor {name!r} does not come back to the original the receipt recorded",
                hint="the merged model was changed after the merge, or this machine computes the "
                "update differently from the one that merged; nothing was written",
            )

    def close(self) -> None:
        self._file.close()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: what each metadata document must be (loractl writes them so): its description and test
_ANY = ("JSON", lambda d: True)  # checked by the reader that uses it
_ADAPTERS = ("a list of objects", lambda d: isinstance(d, list) and all(isinstance(r, dict) for r in d))
_DTYPES = (
    "an object of dtype names",
    lambda d: isinstance(d, dict) and all(isinstance(v, str) and v in DTYPE_INFO for v in d.values()),
)
_SHARDS = (
    "an object of string tables",
    lambda d: (
        isinstance(d, dict)
        and all(isinstance(m, dict) and all(isinstance(v, str) for v in m.values()) for m in d.values())
    ),
)
_CRC32 = (
    "an object of 32-bit checksums",
    lambda d: isinstance(d, dict) and all(_is_int(v) and 0 <= v < 2**32 for v in d.values()),
)
_SUM64 = (
    "an object of 128-bit checksums (32 hex digits)",
    lambda d: isinstance(d, dict) and all(isinstance(v, str) and _HEX32.fullmatch(v) for v in d.values()),
)
_HEX32 = re.compile(r"[0-9a-f]{32}")
_DORA = re.compile(r"dora[0-9]+")


def _vector_problem(t: torch.Tensor, dtype: torch.dtype) -> str | None:
    if t.dtype != dtype or t.dim() != 1:
        return f"is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, not a vector of {str(dtype).removeprefix('torch.')}"
    return None


def parts_problem(
    parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[str, str] | None:
    """The first part of a tensor's receipt parts that :func:`loractl.ops.residual.decode` (or the
    DoRA division) could not use for a tensor of ``shape`` and original ``dtype``, and why; None if
    they fit: ``full`` of that dtype and shape; ``gap8`` (uint8), ``gapbig`` (int64), ``d8`` (int8)
    and ``valbig`` (``dtype``) vectors, all four or none, as many gaps and values as they count, every
    position inside the tensor; ``dora<k>`` floats that broadcast to ``shape``."""
    import torch

    want = {"gap8": torch.uint8, "gapbig": torch.int64, "d8": torch.int8, "valbig": dtype}
    for k, t in parts.items():
        if k == "full":
            if t.dtype != dtype or tuple(t.shape) != shape:
                return (
                    k,
                    f"is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, the tensor {str(dtype).removeprefix('torch.')} {list(shape)}",
                )
        elif k in want:
            problem = _vector_problem(t, want[k])
            if problem:
                return k, problem
        elif _DORA.fullmatch(k):
            try:
                fits = t.is_floating_point() and torch.broadcast_shapes(t.shape, shape) == torch.Size(shape)
            except RuntimeError:
                fits = False
            if not fits:
                return (
                    k,
                    f"({str(t.dtype).removeprefix('torch.')} {list(t.shape)}) does not fit the tensor's {list(shape)}",
                )
        else:
            return k, "is not a part loractl writes"
    if "full" in parts or not (parts.keys() & want.keys()):
        return None
    missing = [k for k in want if k not in parts]
    if missing:
        return missing[0], "is missing (the other corrections of the tensor are there)"
    gap8, gapbig, d8, valbig = (parts[k] for k in want)
    numel = math.prod(shape)
    if d8.numel() != gap8.numel():
        return "d8", f"holds {d8.numel()} values for {gap8.numel()} positions"
    big = gap8 == 255
    if gapbig.numel() != int(big.sum()):
        return "gapbig", f"holds {gapbig.numel()} gaps, gap8 counts {int(big.sum())}"
    if valbig.numel() != int((d8 == -128).sum()):
        return "valbig", f"holds {valbig.numel()} values, d8 counts {int((d8 == -128).sum())}"
    if gapbig.numel() and (int(gapbig.min()) < 255 or int(gapbig.max()) >= numel):
        return "gapbig", f"holds a gap outside [255, {numel})"
    last = int(gap8[~big].sum(dtype=torch.int64)) + int(gapbig.sum()) + gap8.numel() - 1
    if last >= numel:
        return "gap8", f"points at position {last}, past the tensor's {numel} values"
    return None


def spool_beside(tmp: Path) -> Path:
    """The spool of a receipt: beside the temporary output, never inside it (no file copied from the
    base can land on it, and a killed run's spool is removed with its other temporaries)."""
    return tmp.with_name(tmp.name + ".spool")


def remove_stale(beside: Path) -> bool:
    """Remove ``beside`` if it exists (the receipt of an output that ``--force`` replaced); True if it did."""
    if os.path.lexists(beside):
        os.unlink(beside)
        return True
    return False
