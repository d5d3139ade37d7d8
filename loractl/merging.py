"""Merge and unmerge as pipelines over :mod:`loractl.io.stream`: which tensors are computed and by which
job (:func:`loractl.ops.merge.merge_tensor`, :func:`~loractl.ops.merge.unmerge_tensor`), the receipt
written alongside a merge (:class:`~loractl.io.receipt.ReceiptWriter`) or read by an unmerge, and the
files around the weights (index, the base folder's other files)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .io.atomic import atomic_output
from .io.base import RECEIPT_NAME
from .io.layout import Files, OutTensor, copy_notes, copy_other_files, layout, shard_mode, write_index
from .io.receipt import Receipt, ReceiptWriter, receipt_beside, spool_beside
from .io.safetensors import torch_dtype
from .io.stream import Job, Progress, Stream
from .ops import merge as merge_ops
from .provenance import metadata

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .io.base import BaseModel
    from .plan import MergePlan
    from .provenance import AdapterRef


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
        ("" if source is None else f"{source}: ")
        + f"tensor {key!r}: {op} it{by} gives {bad} NaN/Inf values where the original is finite "
        f"({str(result.dtype).replace('torch.', '')})",
        hint="the update overflows this dtype (a huge scale, --weight or factor?); nothing was written",
    )


def merge_jobs(
    b: BaseModel,
    plan: MergePlan,
    files: Files,
    receipt: bool,
    adapters: Sequence[Adapter],
    requantize: bool = False,
) -> tuple[dict[str, Job], dict[str, str]]:
    """The job of every tensor a merge computes (changed by an adapter, or written in another dtype,
    such as a quantized weight written dense) and the tensors whose dtype changes.

    Quantized weights (:attr:`BaseModel.quantized`) are dequantized and merged by
    :func:`loractl.merging_quantized.merge_quantized`; with ``requantize``, an FP8 weight an adapter
    changes and its scale are computed together (:class:`~loractl.merging_quantized.Requantized`) and
    the others are copied as they are."""
    from .merging_quantized import Requantized, merge_quantized

    fused = merge_ops.fused_ok(plan.changes.values())  # may leave torch at one thread: callers restore it
    jobs: dict[str, Job] = {}
    changed_dtypes: dict[str, str] = {}
    for _, items in files:
        for t in items:
            q = b.quantized.get(t.name)
            contribs = plan.changes.get(t.name, [])
            out_dtype = torch.float32 if requantize else torch_dtype(t.dtype)
            original = (
                functools.partial(q.load, b, out_dtype) if q is not None else functools.partial(b.read, t.name)
            )
            check = functools.partial(
                check_finite,
                original=original,
                key=t.name,
                contributions=contribs,
                adapters=adapters,
                source=b.file_of(t.name).path,
            )
            if q is not None and requantize:
                if contribs:
                    pair = Requantized(b, q, contribs, receipt=receipt, check=check)  # type: ignore[arg-type]
                    jobs[t.name], jobs[q.scale_key] = pair.job(t.name), pair.job(q.scale_key)  # type: ignore[attr-defined]
                continue
            if q is not None:
                changed_dtypes[t.name] = b.info(t.name).dtype
                jobs[t.name] = functools.partial(
                    merge_quantized, b=b, q=q, contribs=contribs, out_dtype=out_dtype, fused=fused, receipt=receipt, check=check
                )
                continue
            if t.name not in plan.changes and t.dtype == b.info(t.name).dtype:
                continue
            if t.dtype != b.info(t.name).dtype:
                changed_dtypes[t.name] = b.info(t.name).dtype
            jobs[t.name] = functools.partial(
                merge_ops.merge_tensor,
                contribs=contribs,
                out_dtype=out_dtype,
                fused=fused,
                receipt=receipt,
                original=original,
                check=check,
            )
    return jobs, changed_dtypes


def _written_dtype(files: Files, b: BaseModel) -> str | None:
    """The dtype the quantized weights are written in (the first one's), for config.json's ``dtype``."""
    return next((t.dtype for _, items in files for t in items if t.name in b.quantized), None)


def keep_originals(
    rw: ReceiptWriter, b: BaseModel, files: Files, jobs: dict[str, Job], requantize: bool, config: dict | None
) -> dict[str, str]:
    """What the receipt of a merge keeps besides the parts of each tensor: the auxiliary tensors (FP8
    scales, activation scales) of each quantized weight the merge rewrites, whole, when the output drops
    or rewrites them; and, as metadata (returned), each such weight's record (``quantized``: dtype,
    block, scale key, requantized or not), those auxiliary keys (``aux``), the base's tensor order per
    shard when the output drops some (``order``), the original config.json (``config``) when the
    output's differs, and the original index (``index``)."""
    written = {t.name for _, items in files for t in items}
    quantized: dict[str, dict] = {}
    aux: list[str] = []
    for name, q in b.quantized.items():
        if name not in jobs:
            continue
        quantized[name] = {
            "method": q.method,
            "dtype": b.info(name).dtype,
            "block": list(q.block) if getattr(q, "block", None) else None,
            "scale": getattr(q, "scale_key", None),
            "requantized": requantize,
            "aux": list(q.aux),
        }
        for k in q.aux:
            if k in jobs or k not in written:
                original = b.read(k)
                rw.checksum(k, original)
                rw.add(k, {"full": original})
                aux.append(k)
    extra: dict[str, str] = {}
    if quantized:
        extra["quantized"] = json.dumps(quantized)
        extra["aux"] = json.dumps(aux)
    if any(k not in written for k in aux):
        extra["order"] = json.dumps({s.path.name: list(s.tensors) for s in b.shards})
    if b.is_dir and config is not None and (b.path / "config.json").is_file():
        extra["config"] = (b.path / "config.json").read_bytes().decode("utf-8")
    if b.index_name is not None:
        extra["index"] = (b.path / b.index_name).read_bytes().decode("utf-8")
    return extra


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
    requantize: bool = False,
) -> Written:
    """Stream the merged model to ``output`` (atomically), with its index, the base folder's other
    files and, with ``receipt``, the receipt (inside a folder, or beside a single file)."""
    from .io.quantized import dequantized_config

    jobs, changed_dtypes = merge_jobs(b, plan, files, receipt, adapters, requantize)
    mode = shard_mode(b)
    stream = Stream(b, jobs, progress=progress, mode=mode)
    rw: ReceiptWriter | None = None
    receipt_file: Path | None = None
    receipt_bytes = 0
    dense = bool(b.quantized) and not requantize
    config = dequantized_config(b.config, b.quantized, _written_dtype(files, b)) if dense else None
    try:
        with atomic_output(output, is_dir=b.is_dir, inputs=inputs, force=force) as tmp:
            extra: dict[str, str] = {}
            if receipt:
                rw = ReceiptWriter(spool_beside(tmp))
                stream.on_read, stream.on_parts = rw.checksum, rw.add
                extra = keep_originals(rw, b, files, jobs, requantize, config)
            nbytes = stream.write(tmp, files, lambda i, src: metadata("merge", sources, src), single_file=not b.is_dir)
            if b.is_dir:
                write_index(tmp, b, files, {"loractl.operation": "merge"}, mode)
                copy_other_files(b, tmp, config=config)
                notes += copy_notes(b, output)
                if rw is not None:
                    receipt_bytes = rw.finish(
                        tmp / RECEIPT_NAME, sources, b, list(plan.changes), changed_dtypes, mode, extra=extra
                    )
                    receipt_file = output / RECEIPT_NAME
            elif rw is not None:
                # a single-file output's receipt lies beside it: placed just before the output itself,
                # and removed again if the output does not make it into place
                beside = receipt_beside(output)
                with atomic_output(beside, is_dir=False, inputs=inputs, force=force) as rtmp:
                    receipt_bytes = rw.finish(rtmp, sources, b, list(plan.changes), changed_dtypes, mode, extra=extra)
                receipt_file = beside
    except BaseException:
        if receipt_file is not None and not b.is_dir:
            receipt_file.unlink(missing_ok=True)
        raise
    finally:
        merge_ops.forget()
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
) -> tuple[Files, dict[str, Job], dict[str, Callable[[], torch.Tensor]]]:
    """The layout of the restored model (dtypes as the receipt recorded them, and the tensors it keeps
    whole put back where the base had them), its jobs, and the loaders of the tensors the receipt
    holds (FP8 scales)."""
    from .merging_quantized import Requantized, restore_whole, unmerge_fp8

    files = restored_layout(b, receipt)
    dtypes = receipt.dtypes if receipt is not None else {}
    fused = merge_ops.fused_ok(plan.changes.values())  # the merge's own check: row blocks give PEFT's bits
    jobs: dict[str, Job] = {}
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for _, items in files:
        for t in items:
            contribs = plan.changes.get(t.name, [])
            if receipt is not None and t.name in receipt.aux:
                loaders[t.name] = functools.partial(receipt.whole, t.name)
                jobs[t.name] = functools.partial(restore_whole, name=t.name, receipt=receipt, path=b.path)
            elif receipt is not None and t.name in receipt.quantized:
                jobs[t.name] = functools.partial(
                    unmerge_fp8, b=b, name=t.name, info=receipt.quantized[t.name], contribs=contribs, receipt=receipt
                )
            elif t.name in b.quantized and contribs:  # a requantized merge, without its receipt
                q = b.quantized[t.name]
                check = functools.partial(
                    check_finite,
                    original=functools.partial(q.load, b, torch.float32),
                    key=t.name,
                    contributions=contribs,
                    adapters=adapters,
                    op="unmerging",
                )
                pair = Requantized(b, q, contribs, receipt=False, check=check, unmerge=True)  # type: ignore[arg-type]
                jobs[t.name], jobs[q.scale_key] = pair.job(t.name), pair.job(q.scale_key)  # type: ignore[attr-defined]
            elif t.name in plan.changes or t.name in dtypes:
                jobs[t.name] = functools.partial(
                    _unmerge_job,
                    b=b,
                    name=t.name,
                    contribs=contribs,
                    orig=torch_dtype(t.dtype),
                    fused=fused,
                    receipt=receipt,
                    adapters=adapters,
                )
    return files, jobs, loaders


def restored_layout(b: BaseModel, receipt: Receipt | None) -> Files:
    """The merged model's layout with the base's dtypes (the receipt's ``dtypes``) and the tensors the
    merged model lacks but the receipt keeps (``aux``: an FP8 base's scales) put back: in the base's
    order when the files are the base's (``order``), else each right after its weight."""
    files = layout(b, None, None, keep_quantized=True)
    if receipt is None:
        return files
    for _, items in files:
        for t in items:
            t.dtype = receipt.dtypes.get(t.name, t.dtype)
    missing = [k for k in receipt.aux if k not in b.tensors]
    if not missing:
        return files
    owner = {k: w for w, rec in receipt.quantized.items() for k in rec.get("aux", []) if k in missing}
    order = receipt.order
    out: Files = []
    for fname, items in files:
        src = items[0].src if items else 0
        here = {t.name for t in items}
        back = [k for k in missing if owner.get(k) in here]
        extra = {k: OutTensor(k, src, *receipt.stored(k)) for k in back}
        if order is not None and fname in order and set(order[fname]) == here | set(extra):
            by_name = {t.name: t for t in items} | extra
            out.append((fname, [by_name[n] for n in order[fname]]))
            continue
        new: list[OutTensor] = []
        for t in items:
            new.append(t)
            new += [extra[k] for k in back if owner[k] == t.name]
        out.append((fname, new))
    return out


def restore_originals(folder: Path, index_name: str | None, files: Files, receipt: Receipt) -> None:
    """Write back what the receipt keeps of the base folder: its config.json (when the merge changed
    it) and its index, when the restored files are laid out as the index says (else the index written
    from the files stays)."""
    if receipt.config is not None and (folder / "config.json").exists():
        (folder / "config.json").write_bytes(receipt.config.encode("utf-8"))
    if receipt.index is None or index_name is None or not (folder / index_name).exists():
        return
    try:
        index = json.loads(receipt.index)
        weight_map = index["weight_map"]
    except (ValueError, TypeError, KeyError):
        return
    if weight_map == {t.name: fname for fname, items in files for t in items}:
        (folder / index_name).write_bytes(receipt.index.encode("utf-8"))
