"""Merge and unmerge as pipelines over :mod:`loractl.io.stream`: which tensors are computed and by which
job (:func:`loractl.ops.merge.merge_tensor`, :func:`~loractl.ops.merge.unmerge_tensor`), the receipt
written alongside a merge (:class:`~loractl.io.receipt.ReceiptWriter`) or read by an unmerge, and the
files around the weights (index, the base folder's other files)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .io.atomic import atomic_output
from .io.base import RECEIPT_NAME
from .io.layout import Files, copy_notes, copy_other_files, layout, shard_mode, write_index
from .io.receipt import Receipt, ReceiptWriter, receipt_beside, spool_beside
from .io.safetensors import torch_dtype
from .io.stream import Job, Progress, Stream
from .ops import merge as merge_ops
from .provenance import metadata

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .io.base import BaseModel
    from .io.quant import QuantizedWeight
    from .plan import MergePlan
    from .provenance import AdapterRef


def _dequantized(b: BaseModel, q: QuantizedWeight) -> torch.Tensor:
    """A 4-bit weight read dequantized, exactly as bitsandbytes' dequantize_4bit gives it."""
    from .io import quant

    return quant.dequantize(b, q).to(torch_dtype(q.st_dtype))


def check_finite(
    result: torch.Tensor,
    *,
    original: Callable[[], torch.Tensor],
    key: str,
    contributions: Sequence[merge_ops.Contribution],
    adapters: Sequence[Adapter],
    op: str = "merging",
    source: object = None,
) -> None:
    """NaN/Inf are never written where the original was finite: a result with any is compared with
    the original element by element (``original()`` reads it again: the computation may have
    overwritten it in place); only NaN/Inf the original already held at the same places pass.

    Raises:
        InputError: naming ``source`` (the base file holding the tensor), the tensor, the modules and
            adapters that changed it, and how many values.
    """
    if merge_ops.all_finite(result) or bool(torch.isfinite(result).all()):
        return
    w0 = original()
    bad = int((~torch.isfinite(result) & torch.isfinite(w0)).sum()) if w0.shape == result.shape else result.numel()
    if not bad:
        return
    mods = sorted({f"{c.module.name!r} of {adapters[c.adapter].path}" for c in contributions if c.module is not None})
    by = f" by module {', '.join(mods)}" if mods else ""
    raise InputError(
        f"{source}: " * (source is not None) + f"tensor {key!r}: {op} it{by} gives {bad} NaN/Inf values where the original is finite "
        f"({str(result.dtype).replace('torch.', '')})",
        hint="the update overflows this dtype (a huge scale, --weight or factor?); nothing was written",
    )


def merge_jobs(
    b: BaseModel, plan: MergePlan, files: Files, receipt: bool, adapters: Sequence[Adapter]
) -> tuple[dict[str, Job], dict[str, Callable[[], torch.Tensor]], dict[str, str]]:
    """The job of every tensor a merge computes (changed by an adapter, or written in another dtype),
    the loaders of quantized weights (read dequantized), and the tensors whose dtype changes."""
    fused = merge_ops.fused_ok(plan.changes.values())  # may leave torch at one thread: callers restore it
    jobs: dict[str, Job] = {}
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    changed_dtypes: dict[str, str] = {}
    for _, items in files:
        for t in items:
            q = b.quantized.get(t.name)
            if q is not None:
                loaders[t.name] = functools.partial(_dequantized, b, q)
            elif t.name not in plan.changes and t.dtype == b.info(t.name).dtype:
                continue
            elif t.dtype != b.info(t.name).dtype:
                changed_dtypes[t.name] = b.info(t.name).dtype
            contribs = plan.changes.get(t.name, [])
            original = loaders.get(t.name) or functools.partial(b.read, t.name)
            jobs[t.name] = functools.partial(
                merge_ops.merge_tensor,
                contribs=contribs,
                out_dtype=torch_dtype(t.dtype),
                fused=fused,
                receipt=receipt,
                original=original,
                check=functools.partial(
                    check_finite, original=original, key=t.name, contributions=contribs, adapters=adapters,
                    source=b.file_of(t.name).path,
                ),
            )
    return jobs, loaders, changed_dtypes


@dataclass
class Written:
    bytes: int
    receipt: Path | None
    receipt_bytes: int
    computed: int  # tensors computed (the others were copied)


def write_merged(
    b: BaseModel,
    output: Path,
    files: Files,
    plan: MergePlan,
    adapters: Sequence[Adapter],
    sources: list[AdapterRef],
    *,
    receipt: bool,
    force: bool,
    inputs: list[Path],
    progress: Progress | None,
    notes: list[str],
) -> Written:
    """Stream the merged model to ``output`` (atomically), with its index, the base folder's other
    files and, with ``receipt``, the receipt (inside a folder, or beside a single file)."""
    from .io.quant import dequantized_config

    jobs, loaders, changed_dtypes = merge_jobs(b, plan, files, receipt, adapters)
    mode = shard_mode(b)
    stream = Stream(b, jobs, loaders, progress=progress, mode=mode)
    rw: ReceiptWriter | None = None
    receipt_file: Path | None = None
    receipt_bytes = 0
    try:
        with atomic_output(output, is_dir=b.is_dir, inputs=inputs, force=force) as tmp:
            if receipt:
                rw = ReceiptWriter(spool_beside(tmp))
                stream.on_read, stream.on_parts = rw.checksum, rw.add
            nbytes = stream.write(tmp, files, lambda i, src: metadata("merge", sources, src), single_file=not b.is_dir)
            if b.is_dir:
                write_index(tmp, b, files, {"loractl.operation": "merge"}, mode)
                copy_other_files(b, tmp, config=dequantized_config(b.config) if b.quantized else None)
                notes += copy_notes(b, output)
                if rw is not None:
                    receipt_bytes = rw.finish(tmp / RECEIPT_NAME, sources, b, list(plan.changes), changed_dtypes, mode)
                    receipt_file = output / RECEIPT_NAME
            elif rw is not None:
                # a single-file output's receipt lies beside it: placed just before the output itself,
                # and removed again if the output does not make it into place
                beside = receipt_beside(output)
                with atomic_output(beside, is_dir=False, inputs=inputs, force=force) as rtmp:
                    receipt_bytes = rw.finish(rtmp, sources, b, list(plan.changes), changed_dtypes, mode)
                receipt_file = beside
    except BaseException:
        if receipt_file is not None and not b.is_dir:
            receipt_file.unlink(missing_ok=True)
        raise
    finally:
        if rw is not None:
            rw.close()
    return Written(nbytes, receipt_file, receipt_bytes, len(jobs))


def _unmerge_job(
    m: torch.Tensor,
    *,
    b: BaseModel,
    name: str,
    contribs: list[merge_ops.Contribution],
    orig: torch.dtype,
    fused: bool,
    receipt: Receipt | None,
    adapters: Sequence[Adapter],
) -> tuple[torch.Tensor, None]:
    parts = receipt.parts(name, m.shape, orig) if receipt is not None else {}
    reread = functools.partial(b.read, name)
    check = functools.partial(
        check_finite, original=reread, key=name, contributions=contribs, adapters=adapters, op="unmerging",
        source=b.file_of(name).path,
    )
    restored = merge_ops.unmerge_tensor(m, contribs, orig, parts, fused=fused, merged=reread, check=check)
    if receipt is not None:
        receipt.verify(name, restored, b.path)
    return restored, None


def unmerge_jobs(
    b: BaseModel, plan: MergePlan, receipt: Receipt | None, adapters: Sequence[Adapter]
) -> tuple[Files, dict[str, Job]]:
    """The layout of the restored model (dtypes as the receipt recorded them) and its jobs."""
    dtypes = receipt.dtypes if receipt is not None else {}
    files = layout(b, None, None)
    for _, items in files:
        for t in items:
            t.dtype = dtypes.get(t.name, t.dtype)
    fused = merge_ops.fused_ok(plan.changes.values())  # the merge's own check: row blocks give PEFT's bits
    jobs: dict[str, Job] = {
        t.name: functools.partial(
            _unmerge_job,
            b=b,
            name=t.name,
            contribs=plan.changes.get(t.name, []),
            orig=torch_dtype(t.dtype),
            fused=fused,
            receipt=receipt,
            adapters=adapters,
        )
        for _, items in files
        for t in items
        if t.name in plan.changes or t.name in dtypes
    }
    return files, jobs


