"""The operations users call, composed from ``formats`` (names), ``ops`` (math) and ``io`` (files).

Every function returns a small result dataclass and never prints; the CLI renders the results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapter import Adapter, LoraModule
from .errors import InputError, ShapeMismatchError, UnsupportedAdapterError, UsageError
from .formats import ReadOptions, WriteOptions, format_module
from .formats import load_adapter as _load_adapter
from .formats.names import NameResolver, ties_word_embeddings
from .io.atomic import atomic_output, check_output, copy_file
from .io.base import RECEIPT_NAME, BaseModel, open_base
from .io.buffers import BufferPool
from .io.quant import QuantizedWeight
from .io.safetensors import (
    FLOAT_DTYPES,
    SafetensorsFile,
    SafetensorsWriter,
    SpooledWriter,
    dtype_name,
    torch_dtype,
)
from .ops import merge as merge_ops
from .ops import residual

Progress = Callable[[int, int], None]
DTYPES = {"auto": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
RECEIPT_VERSION = "1"


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------
def load_adapter(
    path: str | Path,
    format: str | None = None,
    allow_pickle: bool = False,
    options: ReadOptions | None = None,
) -> Adapter:
    """Read an adapter in any supported layout and check that its tensors are finite.

    Args:
        path: a PEFT folder or a weights file.
        format: force a format instead of detecting it.
        allow_pickle: accept pickle files (read with ``torch.load(weights_only=True)``).
        options: reader options (base names for kohya, rank/alpha for loralib...); ``allow_pickle``
            is added to them.

    Raises:
        InputError: missing, unreadable, corrupt or non-finite adapter.
    """
    options = options or ReadOptions()
    options.allow_pickle = options.allow_pickle or allow_pickle
    adapter = _load_adapter(path, format=format, options=options)
    source = adapter.files[0] if adapter.files else adapter.path
    for m in adapter.modules.values():
        for label, t in (
            ("lora_A", m.down),
            ("lora_B", m.up),
            ("lora_B.bias", m.bias),
            ("magnitude", m.magnitude),
        ):
            if t is not None and t.is_floating_point() and not t.is_meta:
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise InputError(
                        f"{source}: module {m.name!r} tensor {label} holds {bad} NaN/Inf values",
                        hint="the adapter is broken (diverged training?); it cannot be merged",
                    )
    for key, t in adapter.modules_to_save.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{source}: tensor {key!r} holds NaN/Inf values", hint="the adapter is broken")
    return adapter


def tensor_crc32(t: torch.Tensor) -> int:
    """crc32 of a tensor's bytes (a cheap check that a restored tensor is the original)."""
    import zlib

    flat = t.detach().contiguous().view(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))


def file_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of ``paths`` in order (an adapter's weights then its config)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# planning a merge: which adapter module touches which base tensor
# --------------------------------------------------------------------------------------------
@dataclass
class Contribution:
    """One change to one base tensor."""

    adapter: int
    kind: str  # "lora", "bias" or "replace"
    weight: float
    module: LoraModule | None = None
    tensor: torch.Tensor | None = None  # the replacement for "replace"


@dataclass
class MergePlan:
    changes: dict[str, list[Contribution]]
    unmatched: list[str]


def _tie(base: BaseModel) -> bool:
    return ties_word_embeddings(base.config)


def plan_merge(
    base: BaseModel,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    quantized: dict[str, QuantizedWeight] | None = None,
) -> MergePlan:
    """Resolve every adapter module to a base tensor and check shapes (4-bit weights: their real shape).

    Raises:
        ShapeMismatchError: an update does not fit the weight it resolves to.
        UnsupportedAdapterError: an adapter that changed the base during training (PiSSA, OLoRA...).
    """
    resolver = NameResolver(base.tensors, tie_word_embeddings=_tie(base))
    quantized = quantized or {}

    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(quantized[key].shape) if key in quantized else tuple(base.info(key).shape)

    changes: dict[str, list[Contribution]] = {}
    unmatched: list[str] = []
    for i, (ad, w) in enumerate(zip(adapters, weights)):
        if ad.init:
            raise UnsupportedAdapterError(
                f"{ad.path}: trained with init_lora_weights={ad.init!r}, which changes the base weights; "
                "merging it into the original base would be wrong",
                hint="convert it to a plain LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))",
            )
        # full replacements first: PEFT loads them into the model before any LoRA is merged
        for key, t in ad.modules_to_save.items():
            bkey = resolver.resolve_tensor(key.replace(".base_layer.", "."))
            if bkey is None:
                unmatched.append(f"{key} ({ad.path})")
                continue
            if shape_of(bkey) != tuple(t.shape):
                raise ShapeMismatchError(
                    f"{ad.path}: tensor {key!r} is {list(t.shape)} but base tensor {bkey!r} is "
                    f"{list(shape_of(bkey))}",
                    hint="is this adapter for another base model?",
                )
            changes.setdefault(bkey, []).append(Contribution(i, "replace", w, tensor=t))
        for name, m in ad.modules.items():
            key = resolver.resolve(name)
            if key is None:
                unmatched.append(f"{name} ({ad.path})")
                continue
            shape = shape_of(key)
            if tuple(shape) != tuple(m.weight_shape):
                raise ShapeMismatchError(
                    f"{ad.path}: module {name!r}: adapter update is {list(m.weight_shape)} but base weight "
                    f"{key!r} is {list(shape)}",
                    hint="is this adapter for another base model?",
                )
            if key not in quantized and base.info(key).dtype not in FLOAT_DTYPES:
                raise InputError(
                    f"{base.path}: tensor {key!r} is {base.info(key).dtype}, not a float weight",
                    hint="only bitsandbytes 4-bit (NF4/FP4) quantized bases are supported",
                )
            changes.setdefault(key, []).append(Contribution(i, "lora", w, module=m))
            if m.bias is not None:
                bkey = resolver.resolve(name, "bias")
                if bkey is None:
                    raise ShapeMismatchError(
                        f"{ad.path}: module {name!r} has lora_B.bias but the base layer has no bias",
                        hint="PEFT cannot merge lora_bias into a layer without bias either",
                    )
                changes.setdefault(bkey, []).append(Contribution(i, "bias", w, module=m))
    return MergePlan(changes, unmatched)


def _fused_ok(plan: MergePlan) -> bool:
    """Can this merge run single-threaded with row-block products (:func:`ops.merge.fused_merge`) and
    still give PEFT's bits? It can when, for every distinct module shape, that way of computing the
    update gives the same bits as PEFT's whole product at the default thread count: checked here on
    one real module of each shape (the BLAS picks its kernels by shape, not by value). On success the
    process is left at one torch thread (the caller restores it); merges with DoRA, whose norms are
    reductions, keep the default threads."""
    threads = torch.get_num_threads()
    samples: dict[tuple, Contribution] = {}
    for contribs in plan.changes.values():
        for c in contribs:
            if c.kind != "lora" or c.module is None:
                continue
            if c.module.is_dora:
                return False
            m = c.module
            key = (m.kind, tuple(m.up.shape), tuple(m.down.shape), m.fan_in_fan_out, m.up.dtype, m.down.dtype)
            samples.setdefault(key, c)
    for c in samples.values():  # one shape at a time: a 7B MLP update is 180 MB in float32
        m = c.module
        assert m is not None
        torch.set_num_threads(threads)
        ref = merge_ops.delta_weight(m, c.weight)
        torch.set_num_threads(1)
        if merge_ops.fused_eligible(m):
            same = merge_ops.fused_product_equals(m, c.weight, ref)
        else:  # computed whole, as merged_tensor does, but on one thread
            got = merge_ops.delta_weight(m, c.weight)
            same = got.shape == ref.shape and torch.equal(
                residual.bits(got.contiguous()), residual.bits(ref.contiguous())
            )
            del got
        del ref
        if not same:
            torch.set_num_threads(threads)
            return False
    torch.set_num_threads(1)
    return True


def _one_fused_lora(contribs: Sequence[Contribution]) -> bool:
    """A tensor changed by exactly one LoRA module that the row-block path computes."""
    return (
        len(contribs) == 1
        and contribs[0].kind == "lora"
        and contribs[0].module is not None
        and merge_ops.fused_eligible(contribs[0].module)
    )


def merged_tensor(
    w0: torch.Tensor,
    contributions: Sequence[Contribution],
    out_dtype: torch.dtype,
    *,
    inplace: bool = False,
    deltas: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply the contributions to ``w0`` (a copy, or ``w0`` itself with ``inplace``), in order, exactly
    as PEFT merges them in turn. ``deltas`` collects each LoRA update by position, for reuse."""
    compute = out_dtype if _wider(out_dtype, w0.dtype) else w0.dtype
    dora = any(c.module is not None and c.module.is_dora for c in contributions)
    w = w0 if inplace and compute == w0.dtype and not dora else w0.to(compute, copy=True)
    base_c = w0.to(compute) if compute != w0.dtype else w0
    for pos, c in enumerate(contributions):
        if c.kind == "replace":
            assert c.tensor is not None
            w = c.tensor.to(compute, copy=True)
        elif c.kind == "bias":
            assert c.module is not None
            w += merge_ops.bias_delta(c.module, c.weight)
        else:
            assert c.module is not None
            delta = merge_ops.delta_weight(c.module, c.weight)
            if deltas is not None:
                deltas[pos] = delta
            factor = merge_ops.dora_factor(c.module, base_c, delta) if c.module.is_dora else None
            w = merge_ops.apply_delta(w, c.module, delta, factor)
    return w.to(out_dtype) if w.dtype != out_dtype else w


def unmerged_tensor(
    m: torch.Tensor,
    contributions: Sequence[Contribution],
    orig_dtype: torch.dtype,
    factors: dict[int, torch.Tensor] | None = None,
    deltas: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Remove the contributions from a merged tensor, last first (exact up to rounding).

    Args:
        m: the merged tensor.
        contributions: as merged.
        orig_dtype: the base tensor's dtype.
        factors: DoRA factors by contribution position (from a receipt).
        deltas: the updates by position, when the caller has them (else recomputed, to the same bits).
    """
    compute = m.dtype if _wider(m.dtype, orig_dtype) else orig_dtype
    w = m.to(compute, copy=True)
    for pos in range(len(contributions) - 1, -1, -1):
        c = contributions[pos]
        assert c.module is not None or c.kind == "replace"
        if c.kind == "replace":
            continue  # only a receipt can restore a replaced tensor
        if c.kind == "bias":
            w -= merge_ops.bias_delta(c.module, c.weight)  # type: ignore[arg-type]
            continue
        if deltas is not None and pos in deltas:
            delta = deltas[pos]
        else:
            delta = merge_ops.delta_weight(c.module, c.weight)  # type: ignore[arg-type]
        factor = None
        if c.module.is_dora:  # type: ignore[union-attr]
            if factors is None or pos not in factors:
                raise UnsupportedAdapterError(
                    f"module {c.module.name!r} is DoRA: its merge divides by norms of the original weight, "  # type: ignore[union-attr]
                    "which cannot be recovered by subtraction",
                    hint="unmerge with the receipt that merge wrote",
                )
            factor = factors[pos]
        w = merge_ops.unapply_delta(w, c.module, delta, factor)  # type: ignore[arg-type]
    return w.to(orig_dtype) if w.dtype != orig_dtype else w


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).bits > torch.finfo(b).bits


def check_finite(
    result: torch.Tensor,
    original: Callable[[], torch.Tensor],
    key: str,
    contributions: Sequence[Contribution],
    adapters: Sequence[Adapter],
    op: str = "merging",
) -> None:
    """NaN/Inf are never written where the original was finite: a result with any is compared with
    the original element by element (``original()`` reads it again: the computation may have
    overwritten it in place); only NaN/Inf the original already held at the same places pass.

    Raises:
        InputError: naming the tensor, the modules and adapters that changed it, and how many values.
    """
    if merge_ops.all_finite(result) or bool(torch.isfinite(result).all()):
        return
    w0 = original()
    bad = (
        int((~torch.isfinite(result) & torch.isfinite(w0)).sum())
        if w0.shape == result.shape
        else result.numel()
    )
    if not bad:
        return
    mods = sorted(
        {f"{c.module.name!r} of {adapters[c.adapter].path}" for c in contributions if c.module is not None}
    )
    by = f" by module {', '.join(mods)}" if mods else ""
    raise InputError(
        f"tensor {key!r}: {op} it{by} gives {bad} NaN/Inf values where the original is finite "
        f"({str(result.dtype).replace('torch.', '')})",
        hint="the update overflows this dtype (a huge scale, --weight or factor?); nothing was written",
    )


# --------------------------------------------------------------------------------------------
# writing a model in the base's layout, tensor by tensor
# --------------------------------------------------------------------------------------------
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.I)


def parse_size(text: str) -> int:
    """``5GB`` (decimal, as transformers), ``2GiB``, ``500MB`` or a byte count."""
    m = SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot read size {text!r}", hint="use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    num, unit = float(m[1]), m[2].upper()
    power = "BKMGT".index(unit[0]) if unit and unit[0] in "KMGT" else 0
    base = 1024 if "I" in unit else 1000
    size = int(num * base**power)
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


@dataclass
class OutTensor:
    name: str
    src: int  # shard number in the source
    dtype: str  # dtype name written
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        from .io.safetensors import dtype_nbytes

        return dtype_nbytes(self.dtype, self.shape)


def _shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def layout(
    base: BaseModel,
    out_dtype: str | None,
    shard_size: int | None,
    quantized: dict[str, QuantizedWeight] | None = None,
) -> list[tuple[str, list[OutTensor]]]:
    """Output file names and their tensors: the base's own layout, or re-sharded to ``shard_size``.

    4-bit weights are written dequantized (``out_dtype``, default bf16) with their real shape, and
    their quantization statistics are left out.
    """
    from .io.quant import aux_keys

    quantized = quantized or {}
    aux = aux_keys(quantized)
    files: list[tuple[str, list[OutTensor]]] = []
    for i, s in enumerate(base.shards):
        items = []
        for info in s.tensors.values():  # in file order
            if info.name in aux:
                continue
            if info.name in quantized:
                items.append(OutTensor(info.name, i, out_dtype or "BF16", tuple(quantized[info.name].shape)))
                continue
            dt = out_dtype if (out_dtype and info.dtype in FLOAT_DTYPES) else info.dtype
            items.append(OutTensor(info.name, i, dt, info.shape))
        files.append((s.path.name, items))
    if shard_size is None:
        return files
    if not base.is_dir:
        raise UsageError("--shard-size needs a base folder (a single-file base is written as one file)")
    stem = (
        "diffusion_pytorch_model"
        if base.shards[0].path.name.startswith("diffusion_pytorch_model")
        else "model"
    )
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for _, items in files:
        for t in items:
            if groups[-1] and size + t.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    return [(_shard_name(stem, i, len(groups)), g) for i, g in enumerate(groups)]


def _write_index(
    folder: Path, base: BaseModel, files: list[tuple[str, list[OutTensor]]], extra: dict[str, Any], mode: int
) -> None:
    if len(files) == 1 and base.index_name is None:
        return
    name = base.index_name or ("model.safetensors.index.json")
    meta = dict(base.index_metadata)
    meta["total_size"] = sum(t.nbytes for _, items in files for t in items)
    meta.update(extra)
    weight_map = {t.name: fname for fname, items in files for t in items}
    (folder / name).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n")
    os.chmod(folder / name, _mode_of(base.path / name) if base.index_name else mode)


def _mode_of(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def _shard_mode(base: BaseModel) -> int:
    """The permission bits the output's weight files (and receipt) get: the base's shards' (the
    strictest of them, should they differ), so a 0600 base does not become a 0644 merged model."""
    mode = 0o777
    for s in base.shards:
        mode &= _mode_of(s.path)
    return mode


def _copy_other_files(base: BaseModel, folder: Path, dequantized: bool = False) -> None:
    """Copy the files of the base folder that a model folder needs (io.base.COPIED_NAMES), each with
    its own permission bits; a link inside the folder is copied as the file it points to, one pointing
    outside is never followed (io.base.folder_files). A dequantized copy's config.json loses its
    quantization_config (transformers would otherwise load the bf16 weights as 4-bit layers)."""
    from .io.quant import dequantized_config

    os.chmod(folder, _mode_of(base.path) | 0o700)
    for rel, src in base.files.copied.items():
        dst = folder / rel
        if not dst.parent.exists():
            dst.parent.mkdir(parents=True)
            os.chmod(dst.parent, _mode_of(src.parent) | 0o700)
        if dequantized and rel.as_posix() == "config.json":
            dst.write_text(json.dumps(dequantized_config(base.config), indent=2) + "\n")
            os.chmod(dst, _mode_of(src))
        else:
            copy_file(src, dst)


def _copy_notes(base: BaseModel, output: Path) -> list[str]:
    """What the output's folder does not get from the base folder, and why."""
    notes = []
    if base.files.links_out:
        notes.append(
            f"not copied to {output}: {', '.join(base.files.links_out)}: a link to outside {base.path} "
            "(never followed)"
        )
    left = base.files.left_out
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        notes.append(f"not copied to {output} (not part of a model folder; see docs/merge.md): {shown}")
    return notes


def _largest_job(base: BaseModel, files: list[tuple[str, list[OutTensor]]], jobs: Mapping[str, Any]) -> int:
    """Bytes of the largest tensor a job reads or writes (the size of the streaming buffers)."""
    sizes = [
        max(t.nbytes, base.info(t.name).nbytes)
        for _, items in files
        for t in items
        if t.name in jobs and t.name in base.tensors
    ]
    return max(sizes, default=0)


def _stream(
    base: BaseModel,
    folder_or_file: Path,
    files: list[tuple[str, list[OutTensor]]],
    jobs: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    metadata_for: Callable[[int, dict[str, str]], dict[str, str]],  # (file number, source metadata)
    progress: Progress | None,
    single_file: bool,
    loaders: dict[str, Callable[[], torch.Tensor]] | None = None,
    pool: BufferPool | None = None,
    on_read: Callable[[str, torch.Tensor], None] | None = None,
    mode: int | None = None,
) -> int:
    """Write ``files``: each tensor raw-copied from the base, or read (``loaders`` for tensors that
    are not stored as such, e.g. 4-bit weights), computed and written (``mode``: the files' permission bits).

    Reading the next tensor, computing this one and writing the previous overlap (two threads
    beside the main one); at most three tensors are in memory at once, in buffers from ``pool``
    that are reused from tensor to tensor (jobs may take their outputs from the same pool). Each
    finished file is fsynced on a third thread while the next one is being written. ``on_read`` is
    called on the reading thread with each tensor read for a job (e.g. to checksum it there).
    """
    pool = pool or BufferPool(_largest_job(base, files, jobs))
    total = sum(t.nbytes for _, items in files for t in items)
    done = 0
    if progress is not None:  # the total, before the first tensor: a bar of known length from the start
        progress(0, total)
    writers: list[SafetensorsWriter] = []
    syncs: list[Future[None]] = []

    def read(t: OutTensor) -> torch.Tensor | None:
        if loaders and t.name in loaders:
            data = loaders[t.name]()
        elif t.name not in jobs:
            return None
        else:
            info = base.info(t.name)
            data = base.read(t.name, out=pool.empty(info.shape, torch_dtype(info.dtype)))
        if on_read is not None:
            on_read(t.name, data)
        return data

    try:
        with (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="loractl-io") as io,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-sync") as syncer,
        ):
            for fi, (fname, items) in enumerate(files):
                path = folder_or_file if single_file else folder_or_file / fname
                src_meta = dict(base.shards[items[0].src].metadata) if items else {}
                entries = [(t.name, t.dtype, t.shape) for t in items]
                writer = SafetensorsWriter(path, entries, metadata_for(fi, src_meta), direct=True, mode=mode)
                writers.append(writer)
                pending_write: Future[None] | None = None
                nxt: Future[torch.Tensor | None] | None = io.submit(read, items[0]) if items else None
                for k, t in enumerate(items):
                    assert nxt is not None
                    data = nxt.result()
                    nxt = io.submit(read, items[k + 1]) if k + 1 < len(items) else None
                    if data is None:
                        result = None
                    else:
                        result = jobs[t.name](data)
                        if result.dtype != torch_dtype(t.dtype):
                            result = result.to(torch_dtype(t.dtype))
                        if result.untyped_storage().data_ptr() != data.untyped_storage().data_ptr():
                            pool.release(data)
                    if pending_write is not None:
                        pending_write.result()

                    def write(
                        t: OutTensor = t,
                        result: torch.Tensor | None = result,
                        writer: SafetensorsWriter = writer,
                    ) -> None:
                        if result is None:
                            src = base.file_of(t.name)
                            writer.copy_from(t.name, src, src.tensors[t.name])
                        else:
                            writer.write(t.name, result)
                            pool.release(result)

                    pending_write = io.submit(write)
                    del data, result
                    done += t.nbytes
                    if progress is not None:
                        progress(done, total)
                if pending_write is not None:
                    pending_write.result()
                writer.finish()
                syncs.append(syncer.submit(writer.sync))
            for f in syncs:
                f.result()
    finally:  # after the threads are done with them
        for w in writers:
            w.close()
    return sum(w.path.stat().st_size for w in writers)


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------
@dataclass
class AdapterRef:
    path: str
    sha256: str
    weight: float
    format: str


@dataclass
class MergeResult:
    """What ``merge`` did."""

    output: Path
    adapters: list[AdapterRef]
    tensors_changed: int
    tensors_copied: int
    modules: int
    unmatched: list[str]
    receipt: Path | None
    receipt_bytes: int
    bytes_written: int
    seconds: float
    dtype: str
    notes: list[str] = field(default_factory=list)


def receipt_path(merged: Path) -> Path:
    """Where the receipt of a merged model lies: ``MERGED/loractl.receipt`` or ``MERGED.loractl.receipt``.

    Never a ``*.safetensors`` at the top of the folder, so no model loader picks it up as weights.
    """
    return merged / RECEIPT_NAME if merged.is_dir() else _receipt_beside(merged)


def _receipt_beside(merged: Path) -> Path:
    """The receipt of a single-file merged model: ``MERGED.loractl.receipt`` beside it."""
    return merged.with_name(merged.name + ".loractl.receipt")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    if len(weights) != n:
        raise UsageError(
            f"{len(weights)} --weight values for {n} adapters", hint="give one --weight per adapter"
        )
    for w in weights:
        if not math.isfinite(w):
            raise UsageError(f"--weight {w} is not a finite number")
    return [float(w) for w in weights]


def _as_list(adapters: Any) -> list[Any]:
    """One adapter (a path or an :class:`Adapter`) or a sequence of them, as a list: a lone string
    is one path, not a sequence of characters."""
    if isinstance(adapters, (str, Path, Adapter)):
        return [adapters]
    return list(adapters)


def _load_all(
    adapters: str | Path | Adapter | Sequence[str | Path | Adapter],
    format: str | None,
    allow_pickle: bool,
    base: BaseModel | None = None,
    subfolder: str | None = None,
    progress: bool = False,
    alpha: float | None = None,
) -> list[Adapter]:
    opts = ReadOptions(allow_pickle=allow_pickle, subfolder=subfolder, progress=progress, alpha=alpha)
    if base is not None:
        opts.base_keys = list(base.tensors)
        opts.base_config = base.config
    return [a if isinstance(a, Adapter) else load_adapter(a, format=format, options=opts) for a in adapters]


def protected_paths(
    *, base: BaseModel | None = None, adapters: Sequence[Adapter] = (), also: Sequence[str | Path | None] = ()
) -> list[Path]:
    """Every path an operation reads, which no output may be, contain or lie inside, with or without
    ``force`` (:func:`loractl.io.atomic.check_output`): the base (its folder or file and its weight
    files), each adapter as given and the files it was read from (a PEFT adapter given as a file
    was read with the ``adapter_config.json`` beside it), and ``also`` (a receipt read, a base given
    only for names). A recipe's own file is added by :func:`loractl.io.atomic.protecting`."""
    out: list[Path] = []
    if base is not None:
        out += [base.path, *(s.path for s in base.shards)]
    for a in adapters:
        out += [Path(a.path), *a.files]
    out += [Path(p) for p in also if p is not None]
    return out


def _refs(adapters: Sequence[Adapter], weights: Sequence[float]) -> list[AdapterRef]:
    return [AdapterRef(str(a.path), file_sha256(a.files), w, a.format) for a, w in zip(adapters, weights)]


def _loractl_metadata(op: str, refs: Sequence[AdapterRef], src: dict[str, str]) -> dict[str, str]:
    meta = {k: v for k, v in src.items() if not k.startswith("loractl.")}
    meta["loractl.version"] = __version__
    meta["loractl.operation"] = op
    meta["loractl.adapters"] = json.dumps(
        [{"path": r.path, "sha256": r.sha256, "weight": r.weight} for r in refs], separators=(",", ":")
    )
    return meta


def _single_component(adapter: Adapter) -> Adapter:
    """A diffusers adapter for one pipeline component, its module names relative to that component
    (what PEFT loads into the bare model)."""
    from .formats.diffusers import component_adapters

    parts = component_adapters(adapter)
    if len(parts) != 1:
        raise UsageError(
            f"{adapter.path}: holds LoRAs for {len(parts)} components ({', '.join(sorted(parts))}); "
            "a PEFT adapter is for one model",
            hint="write --to diffusers to keep them together",
        )
    return next(iter(parts.values()))


def save_adapter(
    adapter: Adapter,
    output: str | Path,
    *,
    to: str = "peft",
    force: bool = False,
    inputs: Sequence[Path] = (),
    operation: str = "save",
    sources: Sequence[AdapterRef] = (),
    options: WriteOptions | None = None,
) -> Path:
    """Write ``adapter`` in format ``to`` at ``output``, atomically, with loractl's provenance metadata.

    Args:
        adapter: what to write.
        output: a folder (PEFT) or a file path.
        to: the format name.
        force: replace an existing output.
        inputs: paths the output must not be.
        operation: recorded in the metadata (``truncate``, ``combine``, ``convert``...).
        sources: the adapters it was made from, recorded with their sha256 and weight.
        options: writer options (base names and config for kohya/GGUF).
    """
    mod = format_module(to)
    output = Path(output)
    options = options or WriteOptions()
    options.metadata = {**_loractl_metadata(operation, sources, {}), **options.metadata}
    options.target = output
    if to == "peft" and adapter.format == "diffusers":
        adapter = _single_component(adapter)
    with atomic_output(output, is_dir=False, inputs=inputs, force=force) as tmp:
        mod.write(adapter, tmp, options)
    return output


def _keeps_torch_threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Restore torch's thread count after ``fn``, whatever it set it to."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_keeps_torch_threads
def merge(
    base: str | Path,
    adapters: str | Path | Adapter | Sequence[str | Path | Adapter],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    dtype: str = "auto",
    shard_size: str | int | None = None,
    receipt: bool = True,
    allow_partial: bool = False,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    alpha: float | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Write ``base + Σ wᵢ·ΔWᵢ`` to ``output`` in the base's own layout, one tensor at a time.

    Each adapter is merged in turn exactly as PEFT's ``merge_and_unload`` does (bit for bit).

    Args:
        base: a base model folder or file.
        adapters: adapters (paths or loaded), merged in this order.
        output: the folder (or file, for a single-file base) to create.
        weights: one merge weight per adapter (multiplies its scale); default 1.
        dtype: ``auto`` (the base's dtypes) or ``bf16``/``fp16``/``fp32`` for float tensors.
        shard_size: re-shard the output (e.g. ``"5GB"``); default: the base's own shards.
        receipt: write the receipt that lets ``unmerge`` restore the base bit for bit.
        allow_partial: do not fail when an adapter module matches no base weight.
        force: replace an existing output.
        format: force the adapters' format.
        allow_pickle: accept pickle adapters.
        subfolder: the folder inside a Hub adapter repo.
        alpha: lora_alpha for adapters that do not state it (a PEFT adapter without
            adapter_config.json); an error for one that does. Every other command that reads
            adapters and needs their scales takes it too.
        progress: called with (bytes done, bytes total); also turns on Hub download bars.

    Raises:
        InputError: bad base or adapter, adapter that does not fit, unmatched modules.
        OutputError: output exists, is an input, or the disk is full.
    """
    adapters = _as_list(adapters)
    t0 = time.perf_counter()
    if not adapters:
        raise UsageError("no adapter given")
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ws = _weights(weights, len(adapters))
    size = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    output = Path(output)
    with open_base(base, progress=progress is not None) as b:
        from .io import quant

        quantized = quant.find_quantized(b)
        loaded = _load_all(
            adapters,
            format,
            allow_pickle,
            base=b,
            subfolder=subfolder,
            progress=progress is not None,
            alpha=alpha,
        )
        plan = plan_merge(b, loaded, ws, quantized)
        if plan.unmatched and not allow_partial:
            shown = ", ".join(plan.unmatched[:3]) + (
                f" and {len(plan.unmatched) - 3} more" if len(plan.unmatched) > 3 else ""
            )
            raise InputError(
                f"{b.path}: {len(plan.unmatched)} adapter modules match no base weight: {shown}",
                hint="is the adapter for this base? pass --allow-partial to merge the rest anyway",
            )
        if not plan.changes:  # --allow-partial, and not one module matched: the output would be the base
            raise InputError(
                f"{b.path}: no adapter module matches a base weight ({', '.join(str(a.path) for a in loaded)}); "
                "is it for this base?",
                hint="check the adapter's module names with `loractl inspect ADAPTER --base BASE`",
            )
        files = layout(b, DTYPES[dtype], size, quantized)
        refs = _refs(loaded, ws)
        inputs = protected_paths(base=b, adapters=loaded)
        # a single-file output has its receipt beside it: checked as an output too, before any work,
        # whether or not one is written now (unmerge would take a receipt left there for this output's)
        beside = None if b.is_dir else _receipt_beside(output)
        check_output(output, inputs, force)
        if beside is not None:
            check_output(beside, inputs, force)
        mode = _shard_mode(b)
        spool: SpooledWriter | None = None  # the receipt's corrections, streamed to disk
        checksums: dict[str, int] = {}  # crc32 of each original tensor the receipt restores
        changed_dtypes: dict[str, str] = {}
        notes: list[str] = []
        need_receipt = receipt
        if quantized:
            need_receipt = False
            notes.append(
                f"the base is 4-bit ({len(quantized)} bitsandbytes weights): they are written dequantized; "
                "no receipt, since an unmerge can only give back the dequantized base, not the 4-bit file"
            )
        fast = _fused_ok(plan)  # may leave torch at one thread: @_keeps_torch_threads restores it

        def make_job(key: str, out_dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
            contribs = plan.changes.get(key, [])

            fused = fast and _one_fused_lora(contribs)

            def original() -> torch.Tensor:  # the base tensor again, for the NaN/Inf check
                return loaders[key]() if key in loaders else b.read(key)

            def job(w0: torch.Tensor) -> torch.Tensor:
                if fused and w0.dtype == out_dtype:
                    c = contribs[0]
                    assert c.module is not None
                    try:
                        if not need_receipt:
                            merge_ops.fused_merge(w0, c.module, c.weight, out=w0)
                            return w0
                        # merged in place; the corrections the receipt needs come back encoded
                        assert spool is not None
                        parts = merge_ops.fused_merge(w0, c.module, c.weight, out=w0, residual=True)
                    except merge_ops.NonFiniteBlock:  # w0 is partly merged: redo it whole, and check it
                        w0 = original()
                    else:
                        if parts is None:  # most values differ: the whole original is smaller, read it again
                            parts = {"full": b.read(key)}
                        for k, v in parts.items():
                            spool.add(f"{key}::{k}", v)
                        return w0
                if not contribs:
                    merged = w0.to(out_dtype)
                elif not need_receipt:  # nothing needs the original: merge into the buffer just read
                    merged = merged_tensor(w0, contribs, out_dtype, inplace=True)
                else:
                    deltas: dict[int, torch.Tensor] = {}
                    merged = merged_tensor(w0, contribs, out_dtype, deltas=deltas)
                check_finite(merged, original, key, contribs, loaded)
                if need_receipt:
                    parts: dict[str, torch.Tensor] = {}
                    if any(c.kind == "replace" for c in contribs):
                        parts["full"] = w0
                    else:
                        known = deltas if contribs else {}
                        factors = _dora_factors(w0, contribs, known)
                        rec = unmerged_tensor(merged, contribs, w0.dtype, factors, known)
                        parts = residual.encode(w0, rec)
                        for pos, f in factors.items():
                            parts[f"dora{pos}"] = f.contiguous()
                    assert spool is not None
                    for k, v in parts.items():
                        spool.add(f"{key}::{k}", v)
                return merged

            return job

        jobs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        loaders: dict[str, Callable[[], torch.Tensor]] = {}
        for _, items in files:
            for t in items:
                q = quantized.get(t.name)
                if q is not None:  # read dequantized, exactly as bitsandbytes' dequantize_4bit gives it
                    loaders[t.name] = lambda q=q: quant.dequantize(b, q).to(torch_dtype(q.st_dtype))
                    jobs[t.name] = make_job(t.name, torch_dtype(t.dtype))
                    continue
                src_dtype = b.info(t.name).dtype
                if t.name in plan.changes or t.dtype != src_dtype:
                    jobs[t.name] = make_job(t.name, torch_dtype(t.dtype))
                    if t.dtype != src_dtype:
                        changed_dtypes[t.name] = src_dtype

        pool = BufferPool(_largest_job(b, files, jobs))

        def metadata_for(i: int, src: dict[str, str]) -> dict[str, str]:
            return _loractl_metadata("merge", refs, src)

        def checksum(key: str, w0: torch.Tensor) -> None:  # on the reading thread: zlib lets go of the GIL
            checksums[key] = tensor_crc32(w0)

        receipt_file: Path | None = None
        receipt_bytes = 0
        placed_receipt: Path | None = None
        try:
            with atomic_output(output, is_dir=b.is_dir, inputs=inputs, force=force) as tmp:
                if need_receipt:
                    # beside the temporary output, never inside it: no file copied from the base can
                    # land on it, and a killed run's spool is removed with its other temporaries
                    spool = SpooledWriter(tmp.with_name(tmp.name + ".spool"))
                written = _stream(
                    b,
                    tmp,
                    files,
                    jobs,
                    metadata_for,
                    progress,
                    single_file=not b.is_dir,
                    loaders=loaders,
                    pool=pool,
                    on_read=checksum if need_receipt else None,
                    mode=mode,
                )
                if b.is_dir:
                    _write_index(tmp, b, files, {"loractl.operation": "merge"}, mode)
                    _copy_other_files(b, tmp, dequantized=bool(quantized))
                    notes += _copy_notes(b, output)
                    if need_receipt:
                        assert spool is not None
                        receipt_bytes = _write_receipt(
                            tmp / RECEIPT_NAME, spool, refs, plan, b, changed_dtypes, checksums, mode
                        )
                        receipt_file = output / RECEIPT_NAME
                elif need_receipt:
                    # a single-file output's receipt lies beside it: placed just before the output itself,
                    # and removed again if the output does not make it into place
                    assert beside is not None and spool is not None
                    with atomic_output(beside, is_dir=False, inputs=inputs, force=force) as rtmp:
                        receipt_bytes = _write_receipt(
                            rtmp, spool, refs, plan, b, changed_dtypes, checksums, mode
                        )
                    receipt_file = placed_receipt = beside
        except BaseException:
            if placed_receipt is not None:
                placed_receipt.unlink(missing_ok=True)
            raise
        finally:
            if spool is not None:
                spool.close()
        if beside is not None and receipt_file is None and os.path.lexists(beside):
            # --force replaced the output; the receipt beside it belonged to the output replaced
            os.unlink(beside)
            notes.append(f"removed {beside}: it was the receipt of the output replaced")
        n_modules = sum(len(a.modules) for a in loaded)
        return MergeResult(
            output=output,
            adapters=refs,
            tensors_changed=len(plan.changes),
            tensors_copied=sum(len(items) for _, items in files) - len(jobs),
            modules=n_modules - len(plan.unmatched),
            unmatched=plan.unmatched,
            receipt=receipt_file,
            receipt_bytes=receipt_bytes,
            bytes_written=written,
            seconds=time.perf_counter() - t0,
            dtype=dtype,
            notes=notes,
        )


def _dora_factors(
    w0: torch.Tensor, contribs: Sequence[Contribution], deltas: dict[int, torch.Tensor] | None = None
) -> dict[int, torch.Tensor]:
    """DoRA's per-row factors by contribution position (the updates reused from ``deltas`` when given)."""
    out: dict[int, torch.Tensor] = {}
    for pos, c in enumerate(contribs):
        if c.kind == "lora" and c.module is not None and c.module.is_dora:
            delta = deltas[pos] if deltas and pos in deltas else merge_ops.delta_weight(c.module, c.weight)
            out[pos] = merge_ops.dora_factor(c.module, w0, delta)
    return out


def _write_receipt(
    path: Path,
    spool: SpooledWriter,
    refs: Sequence[AdapterRef],
    plan: MergePlan,
    base: BaseModel,
    changed_dtypes: dict[str, str],
    checksums: dict[str, int],
    mode: int,
) -> int:
    meta = {
        "loractl.receipt": RECEIPT_VERSION,
        "loractl.version": __version__,
        "adapters": json.dumps([r.__dict__ for r in refs]),
        "changed": json.dumps(sorted(plan.changes)),
        "dtypes": json.dumps(changed_dtypes),
        "shard_metadata": json.dumps({s.path.name: s.metadata for s in base.shards}),
        "crc32": json.dumps(checksums),
    }
    size = spool.finish(path, meta, mode=mode)
    spool.close()
    return size


# --------------------------------------------------------------------------------------------
# unmerge
# --------------------------------------------------------------------------------------------
@dataclass
class UnmergeResult:
    output: Path
    adapters: list[AdapterRef]
    exact: bool
    receipt: Path | None
    tensors_changed: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _merge_record(b: BaseModel, refs: Sequence[AdapterRef]) -> list[str]:
    """Check the merge record loractl writes in every shard it merges (``loractl.operation`` and the
    sha256 and weight of each adapter) against the adapters to unmerge; the honest signal that an
    unmerge without receipt is undoing the right merge, read from headers only.

    Returns:
        Warnings when the model holds no record of a loractl merge (merged by another tool, or never
        merged: subtraction then cannot be checked).

    Raises:
        InputError: the record names other adapters or weights.
    """
    ops = {s.metadata.get("loractl.operation") for s in b.shards}
    got = [(r.sha256, r.weight) for r in refs]
    for s in b.shards:
        if s.metadata.get("loractl.operation") != "merge":
            continue
        try:
            recorded = json.loads(s.metadata.get("loractl.adapters", "[]"))
            want = [(str(r["sha256"]), float(r["weight"])) for r in recorded]
        except (ValueError, TypeError, KeyError):
            raise InputError(f"{s.path}: its loractl.adapters metadata is not readable") from None
        if got != want:
            names = ", ".join(f"{Path(str(r.get('path', '?'))).name} ×{r.get('weight')}" for r in recorded)
            raise InputError(
                f"{s.path}: was merged by loractl with other adapters or weights ({names})",
                hint="give the same adapters and --weight values, in the same order, as the merge",
            )
    if "merge" in ops:
        return []
    if "unmerge" in ops:
        why = "was written by loractl unmerge: the adapters it names are already removed"
    else:
        why = "holds no loractl merge record (merged by another tool, or never merged)"
    return [
        f"{b.path} {why}; that these adapters are merged into it cannot be checked: the output is "
        f"{b.path} minus their updates"
    ]


def _read_receipt(path: Path) -> tuple[dict[str, str], SafetensorsFile]:
    f = SafetensorsFile(path)
    if f.metadata.get("loractl.receipt") != RECEIPT_VERSION:
        f.close()
        raise InputError(f"{path}: not a loractl receipt (or from an incompatible version)")
    return f.metadata, f


@_keeps_torch_threads
def unmerge(
    merged: str | Path,
    adapters: str | Path | Adapter | Sequence[str | Path | Adapter],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    receipt: str | Path | None = None,
    use_receipt: bool = True,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    alpha: float | None = None,
    progress: Progress | None = None,
) -> UnmergeResult:
    """Remove adapters from a merged model.

    With the receipt ``merge`` wrote (found beside the merged model, or given), the result equals
    the original base bit for bit; without it, the updates are subtracted (close, not exact) and
    DoRA adapters and ``modules_to_save`` are refused.

    Raises:
        InputError: the receipt belongs to other adapters, or an adapter cannot be unmerged.
    """
    adapters = _as_list(adapters)
    t0 = time.perf_counter()
    if not adapters:
        raise UsageError("no adapter given")
    ws = _weights(weights, len(adapters))
    merged = Path(merged)
    output = Path(output)
    rpath = Path(receipt) if receipt is not None else receipt_path(merged)
    if receipt is not None and not rpath.exists():
        raise InputError(f"{rpath}: no such receipt")
    rfile: SafetensorsFile | None = None
    rmeta: dict[str, str] = {}
    if use_receipt and rpath.exists():
        rmeta, rfile = _read_receipt(rpath)
    try:
        with open_base(merged) as b:
            loaded = _load_all(adapters, format, allow_pickle, base=b, alpha=alpha)
            plan = plan_merge(b, loaded, ws)
            refs = _refs(loaded, ws)
            dtypes: dict[str, str] = {}
            warnings: list[str] = []
            if rfile is None:
                warnings = _merge_record(b, refs)
            if rfile is not None:
                recorded = json.loads(rmeta.get("adapters", "[]"))
                got = [(r.sha256, r.weight) for r in refs]
                want = [(r["sha256"], float(r["weight"])) for r in recorded]
                if got != want:
                    raise InputError(
                        f"{rpath}: this receipt was written for other adapters or weights "
                        f"({', '.join(Path(r['path']).name + ' ×' + str(r['weight']) for r in recorded)})",
                        hint="give the same adapters and --weight values, in the same order, as the merge",
                    )
                dtypes = json.loads(rmeta.get("dtypes", "{}"))
            else:
                for key, contribs in plan.changes.items():
                    for c in contribs:
                        if c.kind == "replace":
                            raise UnsupportedAdapterError(
                                f"{loaded[c.adapter].path}: replaces {key!r} (modules_to_save); the original is "
                                "gone from the merged model",
                                hint="unmerge with the receipt that merge wrote",
                            )
                        if c.module is not None and c.module.is_dora:
                            raise UnsupportedAdapterError(
                                f"{loaded[c.adapter].path}: module {c.module.name!r} is DoRA: its merge scaled the "
                                "weight by norms of the original, which subtraction cannot undo",
                                hint="unmerge with the receipt that merge wrote (loractl merge writes one by default)",
                            )
            files = layout(b, None, None)
            for _, items in files:
                for t in items:
                    if t.name in dtypes:
                        t.dtype = dtypes[t.name]
            shard_meta = json.loads(rmeta.get("shard_metadata", "{}"))
            crcs = {k: int(v) for k, v in json.loads(rmeta.get("crc32", "{}")).items()}

            entries: dict[str, list[str]] = {}  # base tensor -> its receipt entries
            if rfile is not None:
                for k in rfile.keys():
                    entries.setdefault(k.split("::", 1)[0], []).append(k)
            fast = _fused_ok(plan)  # the merge's own check: row-block products give PEFT's bits

            def make_job(key: str, orig: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
                contribs = plan.changes.get(key, [])
                fused = fast and _one_fused_lora(contribs)

                def job(m: torch.Tensor) -> torch.Tensor:
                    parts: dict[str, torch.Tensor] = {}
                    if rfile is not None:
                        parts = {k.split("::", 1)[1]: rfile.read(k) for k in entries.get(key, [])}
                    if "full" in parts:
                        return parts["full"]
                    factors = {int(k[4:]): v for k, v in parts.items() if k.startswith("dora")}
                    rec: torch.Tensor | None = None
                    if fused and m.dtype == orig:
                        c = contribs[0]
                        assert c.module is not None
                        try:
                            rec = merge_ops.fused_unmerge(m, c.module, c.weight, out=m)
                        except merge_ops.NonFiniteBlock:  # m is partly unmerged: redo it whole, and check it
                            m = b.read(key)
                    if rec is None:
                        rec = unmerged_tensor(m, contribs, orig, factors)
                    restored = residual.decode(rec, parts)
                    check_finite(restored, lambda: b.read(key), key, contribs, loaded, "unmerging")
                    if key in crcs and tensor_crc32(restored) != crcs[key]:
                        raise InputError(
                            f"{merged}: tensor {key!r} does not come back to the original the receipt recorded",
                            hint="the merged model was changed after the merge, or this machine computes the "
                            "update differently from the one that merged; nothing was written",
                        )
                    return restored

                return job

            jobs = {}
            for _, items in files:
                for t in items:
                    if t.name in plan.changes or t.name in dtypes:
                        jobs[t.name] = make_job(t.name, torch_dtype(t.dtype))

            names = [s.path.name for s in b.shards]

            def metadata_for(i: int, src: dict[str, str]) -> dict[str, str]:
                if rfile is not None and names[i] in shard_meta:
                    return dict(shard_meta[names[i]])
                return _loractl_metadata("unmerge", refs, src)

            inputs = protected_paths(base=b, adapters=loaded, also=[rpath if rfile is not None else None])
            mode = _shard_mode(b)
            notes: list[str] = []
            with atomic_output(output, is_dir=b.is_dir, inputs=inputs, force=force) as tmp:
                written = _stream(
                    b, tmp, files, jobs, metadata_for, progress, single_file=not b.is_dir, mode=mode
                )
                if b.is_dir:
                    meta = {k: v for k, v in b.index_metadata.items() if not k.startswith("loractl.")}
                    b.index_metadata = meta
                    _write_index(tmp, b, files, {}, mode)
                    _copy_other_files(b, tmp)
                    notes = _copy_notes(b, output)
            return UnmergeResult(
                output=output,
                adapters=refs,
                exact=rfile is not None,
                receipt=rpath if rfile is not None else None,
                tensors_changed=len(plan.changes),
                bytes_written=written,
                seconds=time.perf_counter() - t0,
                notes=notes,
                warnings=warnings,
            )
    finally:
        if rfile is not None:
            rfile.close()


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------
@dataclass
class ModuleInfo:
    name: str
    kind: str
    rank: int
    alpha: float
    scale: float
    shape: list[int]
    dtype: str
    dora: bool


@dataclass
class AdapterInfo:
    path: str
    format: str
    kind: str
    rslora: bool
    modules: int
    rank: dict[str, int]
    parameters: int
    bytes: int
    dtypes: list[str]
    module_list: list[ModuleInfo]
    modules_to_save: list[str]
    init: str | None
    base: dict[str, Any] | None = None


@dataclass
class InspectResult:
    adapters: list[AdapterInfo] = field(default_factory=list)


def _dtype_short(t: torch.Tensor) -> str:
    return dtype_name(t.dtype)


def inspect(
    adapters: Sequence[str | Path],
    *,
    base: str | Path | None = None,
    count: int = 100,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    alpha: float | None = None,
) -> InspectResult:
    """Describe adapters: format, kind, per-module rank/alpha/scale, sizes; with a base, coverage and storage.

    Args:
        adapters: adapter paths.
        base: a base model to check coverage against and to size storage with.
        count: N in "one base + N adapters vs N merged copies".
    """
    if count < 1:
        raise UsageError("--count must be at least 1")
    result = InspectResult()
    b = open_base(base) if base is not None else None
    try:
        for path in adapters:
            opts = ReadOptions(allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha)
            if b is not None:
                opts.base_keys, opts.base_config = list(b.tensors), b.config
            a = _load_adapter(path, format=format, options=opts)
            mods = [
                ModuleInfo(
                    name=m.name,
                    kind=m.kind,
                    rank=m.rank,
                    alpha=m.alpha,
                    scale=m.scale,
                    shape=list(m.weight_shape),
                    dtype=_dtype_short(m.up),
                    dora=m.is_dora,
                )
                for m in a.modules.values()
            ]
            ranks = [m.rank for m in mods] or [0]
            dtypes = sorted(
                {_dtype_short(m.up) for m in a.modules.values()}
                | {_dtype_short(m.down) for m in a.modules.values()}
            )
            info = AdapterInfo(
                path=str(path),
                format=a.format,
                kind=a.kind,
                rslora=a.rslora,
                modules=len(mods),
                rank={"min": min(ranks), "max": max(ranks)},
                parameters=a.parameters,
                bytes=a.nbytes,
                dtypes=dtypes,
                module_list=mods,
                modules_to_save=sorted(a.modules_to_save),
                init=a.init,
            )
            if b is not None:
                info.base = _coverage(b, a, count)
            result.adapters.append(info)
    finally:
        if b is not None:
            b.close()
    return result


def _coverage(b: BaseModel, a: Adapter, count: int) -> dict[str, Any]:
    from .io import quant

    quantized = quant.find_quantized(b)
    resolver = NameResolver(b.tensors, tie_word_embeddings=_tie(b))
    matched, unmatched, mismatch = 0, [], []
    for name, m in a.modules.items():
        key = resolver.resolve(name)
        if key is None:
            unmatched.append(name)
            continue
        shape = tuple(quantized[key].shape) if key in quantized else tuple(b.info(key).shape)
        if shape != tuple(m.weight_shape):
            mismatch.append({"module": name, "adapter": list(m.weight_shape), "base": list(shape)})
        else:
            matched += 1
    base_bytes = b.nbytes
    # a merged copy of a 4-bit base is written dequantized (bf16)
    merged_bytes = quant.dequantized_nbytes(b, 2, quantized) if quantized else base_bytes
    out: dict[str, Any] = {
        "path": str(b.path),
        "parameters": sum(q.numel for q in quantized.values())
        + sum(
            info.numel
            for n, (_, info) in b.tensors.items()
            if n not in quant.aux_keys(quantized) and n not in quantized
        ),
        "bytes": base_bytes,
        "coverage": {"matched": matched, "unmatched": unmatched, "shape_mismatch": mismatch},
        "ratio": a.nbytes / base_bytes if base_bytes else None,
        "storage": {
            "count": count,
            "base_plus_adapters": base_bytes + count * a.nbytes,
            "merged_copies": count * merged_bytes,
            "saving": 1 - (base_bytes + count * a.nbytes) / (count * merged_bytes) if merged_bytes else None,
        },
        "quantized": None,
    }
    if quantized:
        out["quantized"] = {
            "method": "bitsandbytes-4bit",
            "quant_types": sorted({q.quant_type for q in quantized.values()}),
            "double_quant": any(q.double_quant for q in quantized.values()),
            "weights": len(quantized),
            "merged_bytes": merged_bytes,
        }
    return out


# --------------------------------------------------------------------------------------------
# adapter algebra: truncate, combine, similarity, spectra (all from the factors)
# --------------------------------------------------------------------------------------------
DYLORA_CONVENTIONS = ("original", "kohya", "lycoris")
COMBINE_METHODS = ("cat", "svd", "linear", "ties", "dare-linear", "dare-ties", "magnitude-prune")


def matrices(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, r] and A [r, n] of a module as 2-D matrices whose product (times the scale) is the
    update in PEFT's [out, in] orientation (conv kernels flattened; embeddings as PEFT stores them)."""
    r = m.rank
    return m.up.reshape(m.up.shape[0], r), m.down.reshape(r, -1)


def with_factors(
    m: LoraModule, b: torch.Tensor, a: torch.Tensor, alpha: float, rslora: bool = False
) -> LoraModule:
    """A copy of ``m`` with new 2-D factors (reshaped back to conv kernels) in ``m``'s dtypes."""
    k = int(a.shape[0])
    down = a.reshape(k, *m.down.shape[1:]).to(m.down.dtype).contiguous()
    up = b.reshape(m.up.shape[0], k, *m.up.shape[2:]).to(m.up.dtype).contiguous()
    return LoraModule(
        name=m.name,
        kind=m.kind,
        down=down,
        up=up,
        alpha=alpha,
        rslora=rslora,
        fan_in_fan_out=m.fan_in_fan_out,
        bias=m.bias,
        magnitude=m.magnitude,
    )


def _derived(adapter: Adapter, modules: dict[str, LoraModule]) -> Adapter:
    return Adapter(
        path=adapter.path,
        format=adapter.format,
        modules=modules,
        modules_to_save=dict(adapter.modules_to_save),
        config=dict(adapter.config),
        metadata={k: v for k, v in adapter.metadata.items() if not k.startswith(("sshs_", "loractl."))},
        files=list(adapter.files),
        init=adapter.init,
    )


def _writable(fmt: str) -> str:
    try:
        mod = format_module(fmt)
    except UsageError:
        return "peft"
    return fmt if hasattr(mod, "write") else "peft"


@dataclass
class TruncatedModule:
    name: str
    rank_before: int
    rank_after: int
    energy_kept: float
    fro_kept: float


@dataclass
class TruncateResult:
    output: Path
    format: str
    method: str
    modules: list[TruncatedModule]
    seconds: float


def _check_fraction(flag: str, value: float | None) -> None:
    if value is not None and not (0 < value <= 1):
        raise UsageError(f"{flag} {value} is outside (0, 1]", hint="give a fraction such as 0.9")


def truncate(
    adapter: str | Path | Adapter,
    output: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    sv_fro: float | None = None,
    nested: bool = False,
    dylora_convention: str | None = None,
    to: str | None = None,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    alpha: float | None = None,
) -> TruncateResult:
    """Lower an adapter's rank.

    Default: for each module the best rank-k approximation of its update (Eckart–Young), computed
    from the factors (QR of B and Aᵀ, SVD of the r×r core); k is ``rank``, or the smallest rank
    meeting the dynamic rule (``energy``: Σσ²ₖ/Σσ² ≥ F; ``sv_ratio`` P: σᵢ ≥ σ₁/P; ``sv_cumulative``:
    Σσₖ/Σσ ≥ F; ``sv_fro``: √(Σσ²ₖ/Σσ²) ≥ F) with ``rank`` as a cap. Modules already at or below
    the rank are kept as they are; truncated ones are written with alpha = new rank (scale 1, the
    singular values split as √σ between B and A).

    ``nested`` (DyLoRA): keep the first ``rank`` components exactly, A[:R] and B[:, :R]; the new
    alpha follows ``dylora_convention``: ``original`` (Valipour et al.: s = alpha/R, alpha kept),
    ``kohya`` (sd-scripts' extract_lora_from_dylora.py keeps alpha; R a multiple of the unit),
    ``lycoris`` (LyCORIS scales by alpha/blocks used: alpha' = alpha·block, R a multiple of the block).

    Raises:
        UsageError: no rule, rank < 1, a fraction outside (0, 1], a rank above the adapter's,
            nested truncation of an adapter that is not DyLoRA (unless ``force``), a rank that is not
            a multiple of the DyLoRA unit.
    """
    from .ops.factored import balanced_factors, choose_rank, energy_kept, factored_svd

    t0 = time.perf_counter()
    rules = {"energy": energy, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative, "sv_fro": sv_fro}
    given = {k: v for k, v in rules.items() if v is not None}
    if rank is None and not given:
        raise UsageError("say how far to truncate: --rank, --energy, --sv-ratio, --sv-cumulative or --sv-fro")
    if len(given) > 1:
        raise UsageError(f"give one dynamic rule, not {len(given)} ({', '.join(given)})")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    for flag in ("energy", "sv_cumulative", "sv_fro"):
        _check_fraction("--" + flag.replace("_", "-"), rules[flag])
    if sv_ratio is not None and sv_ratio < 1:
        raise UsageError(f"--sv-ratio {sv_ratio} must be at least 1 (keep σᵢ ≥ σ₁/P)")
    owned = not isinstance(adapter, Adapter)  # loaded here, so its tensors may be let go of
    a = (
        adapter
        if isinstance(adapter, Adapter)
        else load_adapter(adapter, format=format, options=ReadOptions(allow_pickle=allow_pickle, alpha=alpha))
    )
    max_rank = max((m.rank for m in a.modules.values()), default=0)
    if rank is not None and rank > max_rank and not given:
        raise UsageError(
            f"{a.path}: --rank {rank} is larger than the adapter's largest rank {max_rank}",
            hint="truncation lowers the rank; use convert --pad-rank to raise it",
        )
    out_modules: dict[str, LoraModule] = {}
    report: list[TruncatedModule] = []
    if nested:
        if given or rank is None:
            raise UsageError("--nested keeps the first R components: give --rank R (no dynamic rule)")
        from .formats.kohya import dylora_unit

        unit = dylora_unit(a)
        convention = dylora_convention or ("kohya" if unit is not None else "original")
        if convention not in DYLORA_CONVENTIONS:
            raise UsageError(
                f"unknown --dylora-convention {convention!r}; one of {', '.join(DYLORA_CONVENTIONS)}"
            )
        if unit is None and not force:
            raise UsageError(
                f"{a.path}: not a DyLoRA adapter (no networks.dylora metadata): its first components are "
                "not trained to stand alone, so a nested truncation would not be a valid adapter",
                hint="use the default SVD truncation, or --force if you know it was trained nested",
            )
        block = unit or 1
        if convention == "lycoris":
            block = unit or 4
        if convention in ("kohya", "lycoris") and rank % block:
            raise UsageError(f"{a.path}: --rank {rank} is not a multiple of the DyLoRA unit {block}")
        for name, m in a.modules.items():
            k = min(rank, m.rank)
            b2, a2 = matrices(m)
            alpha = m.alpha * block if convention == "lycoris" and k < m.rank else m.alpha
            nm = with_factors(m, b2[:, :k], a2[:k], alpha, rslora=m.rslora)
            e = _energy_of_prefix(m, k)
            out_modules[name] = nm if k < m.rank else m
            report.append(TruncatedModule(name, m.rank, k, e, math.sqrt(e)))
        method = f"nested-{convention}"
    else:
        for name, m in a.modules.items():
            b2, a2 = matrices(m)
            u, s_vals, vh = factored_svd(b2, a2, m.scale)  # once per module: rank rule and factors
            k = choose_rank(s_vals, rank=rank, **given)
            if k >= m.rank:
                out_modules[name] = m
                k = m.rank
            else:
                nb, na = balanced_factors(u, s_vals, vh, k)
                out_modules[name] = with_factors(m, nb, na, alpha=float(k))
                if owned:  # the input's factors are not needed again: the output grows as it shrinks
                    m.down = torch.empty_like(m.down, device="meta")
                    m.up = torch.empty_like(m.up, device="meta")
            e = energy_kept(s_vals, k)
            report.append(TruncatedModule(name, m.rank, k, e, math.sqrt(e)))
        method = "svd"
    result_adapter = _derived(a, out_modules)
    fmt = to or _writable(a.format)
    refs = [AdapterRef(str(a.path), file_sha256(a.files), 1.0, a.format)]
    save_adapter(
        result_adapter,
        output,
        to=fmt,
        force=force,
        inputs=protected_paths(adapters=[a]),
        operation="truncate",
        sources=refs,
    )
    return TruncateResult(Path(output), fmt, method, report, time.perf_counter() - t0)


def _energy_of_prefix(m: LoraModule, k: int) -> float:
    """‖s·B[:, :k]·A[:k]‖²_F / ‖s·B·A‖²_F, from the factors."""
    if k >= m.rank:
        return 1.0
    b2, a2 = matrices(m)
    b2, a2 = b2.double(), a2.double()

    def fro2(b: torch.Tensor, a: torch.Tensor) -> float:
        return float(torch.trace((b.T @ b) @ (a @ a.T)))

    total = fro2(b2, a2)
    return fro2(b2[:, :k], a2[:k]) / total if total > 0 else 1.0


@dataclass
class CombineResult:
    output: Path
    format: str
    method: str
    modules: int
    rank: dict[str, int]
    adapters: list[AdapterRef]
    seconds: float


def combine(
    adapters: str | Path | Adapter | Sequence[str | Path | Adapter],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    to: str | None = None,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    alpha: float | None = None,
) -> CombineResult:
    """One adapter from several, module by module over the union of their modules.

    ``cat`` is exact: B = [w₁s₁B₁ | w₂s₂B₂ | …], A = [A₁; A₂; …], rank Σrᵢ, scale 1. ``svd`` is the
    exact weighted sum Σwᵢsᵢ BᵢAᵢ truncated optimally to ``rank`` (from factors). ``linear``, ``ties``,
    ``dare-linear``, ``dare-ties``, ``magnitude-prune`` reproduce PEFT's ``add_weighted_adapter``
    (``linear``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) module
    by module, ``seed`` seeding DARE's draws. A module missing from an adapter counts as zero.

    Raises:
        UsageError: unknown method, weights not matching adapters, a method's missing option.
        ShapeMismatchError: adapters whose modules disagree in shape (adapters for different bases).
        UnsupportedAdapterError: DoRA adapters (their magnitude vectors do not combine linearly).
    """
    adapters = _as_list(adapters)
    from .ops import combine as comb

    t0 = time.perf_counter()
    if method not in COMBINE_METHODS:
        raise UsageError(f"unknown --method {method!r}; one of {', '.join(COMBINE_METHODS)}")
    if len(adapters) < 2:
        raise UsageError("combine needs at least two adapters")
    ws = _weights(weights, len(adapters))
    if method in ("ties", "dare-linear", "dare-ties", "magnitude-prune"):
        if density is None:
            raise UsageError(f"--method {method} needs --density (the fraction of entries kept)")
        _check_fraction("--density", density)
    if majority_sign not in ("total", "frequency"):
        raise UsageError(f"--majority-sign must be total or frequency, not {majority_sign!r}")
    if method == "svd" and rank is None:
        raise UsageError("--method svd needs --rank")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    loaded = _load_all(adapters, format, allow_pickle, alpha=alpha)
    for a in loaded:
        dora = [m.name for m in a.modules.values() if m.is_dora]
        if dora:
            raise UnsupportedAdapterError(
                f"{a.path}: module {dora[0]!r} is DoRA; magnitude vectors do not combine linearly",
                hint="merge DoRA adapters into the base instead",
            )
    names = sorted({n for a in loaded for n in a.modules})
    out: dict[str, LoraModule] = {}
    for name in names:
        present = [(i, a.modules[name]) for i, a in enumerate(loaded) if name in a.modules]
        ref = present[0][1]
        for i, m in present[1:]:
            if (m.kind, tuple(m.weight_shape), m.fan_in_fan_out) != (
                ref.kind,
                tuple(ref.weight_shape),
                ref.fan_in_fan_out,
            ):
                raise ShapeMismatchError(
                    f"module {name!r}: {loaded[present[0][0]].path} has {ref.kind} {list(ref.weight_shape)} but "
                    f"{loaded[i].path} has {m.kind} {list(m.weight_shape)}",
                    hint="the adapters are for different base models",
                )
        b_ref, a_ref = matrices(ref)
        mods = []
        for i, a in enumerate(loaded):
            if name in a.modules:
                b2, a2 = matrices(a.modules[name])
                mods.append((b2, a2, a.modules[name].scale, ws[i]))
            else:
                mods.append(
                    (b_ref.new_zeros(b_ref.shape[0], 0), a_ref.new_zeros(0, a_ref.shape[1]), 1.0, ws[i])
                )
        try:
            if method == "cat":
                nb, na = comb.combine_cat([m for m in mods if m[1].shape[0] > 0])
            elif method == "svd":
                nb, na = comb.combine_svd([m for m in mods if m[1].shape[0] > 0], rank)  # type: ignore[arg-type]
            else:
                nb, na = comb.combine_peft(
                    mods,
                    method,
                    density=density,
                    majority_sign=majority_sign,  # type: ignore[arg-type]
                    rank=rank or max(a.modules[n].rank for a in loaded for n in a.modules),
                    generator_seed=seed,
                )
        except ValueError as e:
            hint = (
                "use --method cat, which is exact for any ranks"
                if "rank" in str(e) and method == "linear"
                else None
            )
            raise UsageError(f"module {name!r}: {e}", hint=hint) from None
        out[name] = with_factors(ref, nb, na, alpha=float(nb.shape[1]))
        out[name].bias = None
        out[name].magnitude = None
    base_adapter = _derived(loaded[0], out)
    base_adapter.modules_to_save = {}
    fmt = to or _writable(loaded[0].format)
    refs = _refs(loaded, ws)
    save_adapter(
        base_adapter,
        output,
        to=fmt,
        force=force,
        inputs=protected_paths(adapters=loaded),
        operation="combine",
        sources=refs,
    )
    ranks = [m.rank for m in out.values()] or [0]
    return CombineResult(
        Path(output),
        fmt,
        method,
        len(out),
        {"min": min(ranks), "max": max(ranks)},
        refs,
        time.perf_counter() - t0,
    )


@dataclass
class ModuleSimilarity:
    name: str
    phi: float
    grid: list[list[float]] | None = None


@dataclass
class SimilarityResult:
    adapters: list[str]
    factor: str
    i: int | None
    j: int | None
    mean_phi: float
    modules: list[ModuleSimilarity]
    grid: list[list[float]] | None = None


@_keeps_torch_threads
def similarity(
    first: str | Path | Adapter,
    second: str | Path | Adapter,
    *,
    i: int | None = None,
    j: int | None = None,
    grid: bool = False,
    factor: str = "A",
    module: str | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
) -> SimilarityResult:
    """The LoRA paper's normalized subspace similarity per module (Hu et al. 2021, Sec. 7.2):
    φ(A₁, A₂, i, j) = ‖U₁ᵢᵀ U₂ⱼ‖²_F / min(i, j), Uₓ the right-singular vectors of the A factors
    (``factor="B"``: the left-singular vectors of B). ``i``/``j`` default to each module's rank.
    ``grid``: the whole i×j matrix per module and its mean over modules (modules of the same ranks).

    Only the factor compared is read from the files. Modules are done on two threads.

    Raises:
        UsageError: i or j out of range, an unknown factor, no module in common (or matching ``module``).
    """
    import fnmatch

    from .ops.similarity import grid_from_overlap, overlap, phi_from_overlap

    if factor not in ("A", "B"):
        raise UsageError(f"--factor must be A or B, not {factor!r}")
    opts = ReadOptions(allow_pickle=allow_pickle, only_factor="down" if factor == "A" else "up")
    a1, a2 = (
        a if isinstance(a, Adapter) else load_adapter(a, format=format, options=opts) for a in (first, second)
    )
    common = [n for n in a1.modules if n in a2.modules and (module is None or fnmatch.fnmatchcase(n, module))]
    if not common:
        what = f" matching {module!r}" if module else ""
        raise UsageError(f"{a1.path} and {a2.path} have no module in common{what}")
    pairs: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
    for n in common:
        m1, m2 = a1.modules[n], a2.modules[n]
        b1, f1 = matrices(m1)
        b2, f2 = matrices(m2)
        x1, x2 = (f1, f2) if factor == "A" else (b1, b2)
        if (factor == "A" and x1.shape[1] != x2.shape[1]) or (factor == "B" and x1.shape[0] != x2.shape[0]):
            raise ShapeMismatchError(
                f"module {n!r}: the two adapters' {factor} factors have different dimensions"
            )
        ii = m1.rank if i is None else i
        jj = m2.rank if j is None else j
        if not (1 <= ii <= m1.rank and 1 <= jj <= m2.rank):
            raise UsageError(f"module {n!r}: i={ii}, j={jj} must be within the ranks {m1.rank} and {m2.rank}")
        pairs.append((x1, x2, ii, jj))

    def one(pair: tuple[torch.Tensor, torch.Tensor, int, int]) -> tuple[float, torch.Tensor | None]:
        x1, x2, ii, jj = pair
        sq = overlap(x1, x2, factor=factor)
        return phi_from_overlap(sq, ii, jj), (grid_from_overlap(sq) if grid else None)

    # small decompositions: two threads of one torch thread each beat one op on two threads
    torch.set_num_threads(1)
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        results = list(pool.map(one, pairs))
    mods = [
        ModuleSimilarity(n, phi, g.tolist() if g is not None else None)
        for n, (phi, g) in zip(common, results)
    ]
    grids = [g for _, g in results if g is not None]
    mean_grid = None
    if grids and all(g.shape == grids[0].shape for g in grids):
        mean_grid = torch.stack(grids).mean(0).tolist()
    return SimilarityResult(
        adapters=[str(a1.path), str(a2.path)],
        factor=factor,
        i=i,
        j=j,
        mean_phi=sum(m.phi for m in mods) / len(mods),
        modules=mods,
        grid=mean_grid,
    )


@dataclass
class AmplificationModule:
    name: str
    rank: int
    delta_norm: float
    w_norm: float
    proj_delta: float
    proj_top: float
    proj_random: float
    amplification: float


@dataclass
class AmplificationResult:
    adapter: str
    base: str
    modules: list[AmplificationModule]


def amplification(
    adapter: str | Path | Adapter,
    base: str | Path,
    *,
    module: str | None = None,
    seed: int = 0,
    format: str | None = None,
    allow_pickle: bool = False,
    alpha: float | None = None,
) -> AmplificationResult:
    """The LoRA paper's Section 7.3 per module: how strongly ΔW amplifies directions of W.

    With U, V the top-r singular vectors of ΔW: ‖UᵀWV‖_F (W on ΔW's subspace), the same for W's own
    top-r directions and for a random subspace, ‖ΔW‖_F, and the amplification ‖ΔW‖_F / ‖UᵀWV‖_F.
    Base tensors are read one at a time.
    """
    import fnmatch

    from .ops.similarity import amplification as amp

    out: list[AmplificationModule] = []
    with open_base(base) as b:
        (a,) = _load_all([adapter], format, allow_pickle, base=b, alpha=alpha)
        resolver = NameResolver(b.tensors, tie_word_embeddings=_tie(b))
        g = torch.Generator().manual_seed(seed)
        for name, m in a.modules.items():
            if module is not None and not fnmatch.fnmatchcase(name, module):
                continue
            key = resolver.resolve(name)
            if key is None:
                raise InputError(f"{b.path}: module {name!r} of {a.path} matches no base weight")
            w = b.read(key).double()
            if tuple(w.shape) != tuple(m.weight_shape):
                raise ShapeMismatchError(
                    f"{a.path}: module {name!r}: adapter update is {list(m.weight_shape)} but base weight "
                    f"{key!r} is {list(w.shape)}",
                    hint="is this adapter for another base model?",
                )
            if m.kind == "embedding" or m.fan_in_fan_out:
                w = w.T
            w = w.reshape(w.shape[0], -1)
            b2, a2 = matrices(m)
            r = amp(w, b2, a2, m.scale, generator=g)
            out.append(AmplificationModule(name=name, rank=m.rank, **r))
    if not out:
        raise UsageError(f"no module of {adapter} matches {module!r}")
    return AmplificationResult(str(adapter), str(base), out)


@dataclass
class ModuleSpectrum:
    name: str
    rank: int
    singular_values: list[float]
    effective_rank: float
    energy: dict[str, float]  # rank -> energy kept


@dataclass
class SpectrumResult:
    adapters: list[dict[str, Any]]


def spectrum(
    adapters: str | Path | Adapter | Sequence[str | Path | Adapter],
    *,
    base: str | Path | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
    alpha: float | None = None,
) -> SpectrumResult:
    """Singular values of each module's update (from factors), entropy effective rank, energy kept
    at ranks 1, 2, 4, … r. ``base``: for formats that need it to be read (GGUF's head counts)."""
    adapters = _as_list(adapters)
    from .ops.factored import effective_rank, energy_kept, factored_svd

    result = []
    if base is not None:
        with open_base(base) as b:
            loaded = _load_all(adapters, format, allow_pickle, base=b, alpha=alpha)
    else:
        loaded = _load_all(adapters, format, allow_pickle, alpha=alpha)
    for a in loaded:
        mods = []
        for name, m in a.modules.items():
            b2, a2 = matrices(m)
            _, s_vals, _ = factored_svd(b2, a2, m.scale)
            ks = sorted({min(2**p, m.rank) for p in range(m.rank.bit_length() + 1)})
            mods.append(
                ModuleSpectrum(
                    name=name,
                    rank=m.rank,
                    singular_values=[float(x) for x in s_vals],
                    effective_rank=effective_rank(s_vals),
                    energy={str(k): energy_kept(s_vals, k) for k in ks},
                )
            )
        result.append({"path": str(a.path), "modules": mods})
    return SpectrumResult(result)


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    output: Path
    source_format: str
    format: str
    modules: int
    normalize: bool
    pad_rank: int | None
    dtype: str | None
    seconds: float


def normalized(m: LoraModule) -> LoraModule:
    """The same update with alpha = r (scale 1): the scale folded into B, computed in float64."""
    up = (m.up.double() * m.scale).to(m.up.dtype)
    bias = (m.bias.double() * m.scale).to(m.bias.dtype) if m.bias is not None else None
    return LoraModule(m.name, m.kind, m.down, up, float(m.rank), False, m.fan_in_fan_out, bias, m.magnitude)


def padded(m: LoraModule, rank: int) -> LoraModule:
    """Zero-pad to ``rank`` keeping B·A; alpha' = alpha·r'/r (rsLoRA: alpha·√(r'/r)) keeps the scale."""
    r = m.rank
    if rank == r:
        return m
    down = torch.cat([m.down, m.down.new_zeros(rank - r, *m.down.shape[1:])], 0)
    up = torch.cat([m.up, m.up.new_zeros(m.up.shape[0], rank - r, *m.up.shape[2:])], 1)
    alpha = m.alpha * (math.sqrt(rank / r) if m.rslora else rank / r)
    return LoraModule(m.name, m.kind, down, up, alpha, m.rslora, m.fan_in_fan_out, m.bias, m.magnitude)


def convert(
    adapter: str | Path,
    output: str | Path,
    *,
    to: str,
    base: str | Path | None = None,
    dtype: str | None = None,
    normalize: bool = False,
    pad_rank: int | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Rewrite an adapter in another format; every module's update s·B·A is unchanged.

    Args:
        adapter: the adapter to read.
        output: the file or folder to write.
        to: ``peft``, ``kohya``, ``diffusers``, ``loralib`` or ``gguf``.
        base: a base model, for formats that need its names or architecture (kohya names, GGUF).
        dtype: ``bf16``/``fp16``/``fp32`` for the factors (default: kept).
        normalize: one alpha convention for all modules: alpha = r, the scale folded into B.
        pad_rank: zero-pad every module to this rank, alpha adjusted so the update is unchanged.
        rank, alpha: r and alpha for adapters that do not state them (loralib; alpha also for a PEFT
            adapter without adapter_config.json).
        progress: called with (modules done, modules total); also turns on Hub download bars.

    Raises:
        UsageError: unknown format or dtype, a pad rank below a module's rank.
    """
    from .formats import FORMATS

    t0 = time.perf_counter()
    if to not in FORMATS:
        raise UsageError(f"unknown --to {to!r}; one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"unknown --dtype {dtype!r}; one of bf16, fp16, fp32")
    if pad_rank is not None and pad_rank < 1:
        raise UsageError(f"--pad-rank {pad_rank} must be at least 1")
    b = open_base(base, progress=progress is not None) if base is not None else None
    base_paths = protected_paths(base=b) if b is not None else []
    try:
        opts = ReadOptions(
            allow_pickle=allow_pickle,
            rank=rank,
            alpha=alpha,
            subfolder=subfolder,
            progress=progress is not None,
        )
        wopts = WriteOptions()
        if b is not None:
            opts.base_keys = wopts.base_keys = list(b.tensors)
            opts.base_config = wopts.base_config = b.config
        a = load_adapter(adapter, format=format, options=opts)
    finally:
        if b is not None:
            b.close()
    mods: dict[str, LoraModule] = {}
    for name, m in a.modules.items():
        if pad_rank is not None and m.rank > pad_rank:
            raise UsageError(
                f"{a.path}: module {name!r} has rank {m.rank}, above --pad-rank {pad_rank}",
                hint=f"truncate it first: loractl truncate {a.path} -o smaller --rank {pad_rank}",
            )
        if dtype is not None:
            dt = torch_dtype(DTYPES[dtype])  # type: ignore[arg-type]
            m = LoraModule(
                m.name,
                m.kind,
                m.down.to(dt),
                m.up.to(dt),
                m.alpha,
                m.rslora,
                m.fan_in_fan_out,
                m.bias.to(dt) if m.bias is not None else None,
                m.magnitude.to(dt) if m.magnitude is not None else None,
            )
        if normalize:
            m = normalized(m)
        if pad_rank is not None:
            m = padded(m, pad_rank)
        mods[name] = m
        if progress is not None:
            progress(len(mods), len(a.modules))
    out = _derived(a, mods)
    refs = [AdapterRef(str(a.path), file_sha256(a.files), 1.0, a.format)]
    save_adapter(
        out,
        output,
        to=to,
        force=force,
        inputs=protected_paths(adapters=[a], also=base_paths),
        operation="convert",
        sources=refs,
        options=wopts,
    )
    return ConvertResult(
        Path(output), a.format, to, len(mods), normalize, pad_rank, dtype, time.perf_counter() - t0
    )


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------
def check(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    target: str | None = None,
    max_rank: int | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
    strict: bool = False,
    alpha: float | None = None,
):  # -> checks.CheckResult
    """A gate before deployment: every finding about ``adapter`` (integrity, NaN/Inf, all-zero modules,
    shapes and coverage against ``base``, and what ``target`` — peft, vllm, llama.cpp, lorax — accepts).

    Returns:
        :class:`loractl.checks.CheckResult`; ``ok`` is False when any finding is an error (with
        ``strict``, also when one is a warning).
    """
    from .checks import check as run_checks

    return run_checks(
        adapter,
        base=base,
        target=target,
        max_rank=max_rank,
        format=format,
        allow_pickle=allow_pickle,
        strict=strict,
        alpha=alpha,
    )
