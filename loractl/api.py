"""The operations users call: one function per command, each returning a small result dataclass and
never printing (the CLI renders the results).

This module is a facade. It checks the arguments, reads the inputs (:mod:`loractl.inputs`), asks
:mod:`loractl.plan` which base tensor each adapter module changes, computes with :mod:`loractl.ops`,
and writes with :mod:`loractl.io` (:mod:`~loractl.io.layout`, :mod:`~loractl.io.stream`,
:mod:`~loractl.io.receipt`). docs/architecture.md draws the layers.

Every function that takes adapters takes one path (or loaded :class:`~loractl.adapter.Adapter`) or a
list of them, and one weight or a list of them. Errors are :class:`~loractl.errors.LoractlError`
subclasses; their ``hint`` names keyword arguments (``force=True``) where the command line names
options (``--force``).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .adapter import Adapter, LoraModule
from .checks import check
from .errors import InputError, ShapeMismatchError, UnsupportedAdapterError, UsageError
from .extracting import ExtractBudget, ExtractedModule, ExtractTotal, SavedTensor
from .formats import FORMATS, WriteOptions, writable, write_adapter
from .inputs import (
    Adapters,
    Weights,
    as_list,
    load_adapter,
    load_adapters,
    protected_paths,
    read_options,
    weights_for,
)
from .io.atomic import atomic_output, check_output
from .io.base import BaseModel, open_base
from .io.layout import DTYPES, copy_notes, copy_other_files, layout, parse_size, shard_mode, write_index
from .io.receipt import Receipt, receipt_beside, receipt_path, remove_stale
from .io.safetensors import dtype_name, torch_dtype
from .io.stream import Progress, Stream
from .merging import restore_originals, unmerge_jobs, write_merged
from .merging_quantized import four_bit_note, quantized_notes
from .ops.combine import COMBINE_METHODS
from .ops.truncate import DYLORA_CONVENTIONS
from .plan import match, plan_merge
from .provenance import AdapterRef, metadata, refs
from .recipe import RunResult, StepReport
from .verifying import Counts as VerifyCounts
from .verifying import Finding as VerifyFinding
from .verifying import verify_model, verify_notes

__all__ = [
    "AdapterInfo",
    "AdapterRef",
    "AdapterSpectrum",
    "AmplificationModule",
    "AmplificationResult",
    "BaseFit",
    "CombineResult",
    "ConvertResult",
    "Coverage",
    "ExtractBudget",
    "ExtractResult",
    "ExtractTotal",
    "ExtractedModule",
    "InspectResult",
    "MergeResult",
    "ModuleInfo",
    "ModuleSimilarity",
    "ModuleSpectrum",
    "SavedTensor",
    "SimilarityResult",
    "SpectrumResult",
    "Storage",
    "TruncateResult",
    "TruncatedModule",
    "UnmergeResult",
    "VerifyResult",
    "amplification",
    "check",
    "combine",
    "convert",
    "extract",
    "inspect",
    "load_adapter",
    "merge",
    "run",
    "save_adapter",
    "similarity",
    "spectrum",
    "truncate",
    "unmerge",
    "verify",
]


_F = TypeVar("_F", bound=Callable[..., Any])


def _keeps_torch_threads(fn: _F) -> _F:
    """Restore torch's thread count after ``fn``, whatever it set it to."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------
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
        inputs: paths the output must not be, contain or lie inside.
        operation: recorded in the metadata (``truncate``, ``combine``, ``convert``...).
        sources: the adapters it was made from, recorded with their sha256 and weight.
        options: writer options (base names and config for kohya/GGUF).

    Returns:
        The output path.

    Raises:
        UsageError: an unknown format, or one that cannot hold the adapter.
        OutputError: the output exists (without ``force``), is an input, or the disk is full.
    """
    options = options or WriteOptions()
    options.metadata = {**metadata(operation, sources), **options.metadata}
    return write_adapter(adapter, Path(output), to, options, force=force, inputs=inputs)


# --------------------------------------------------------------------------------------------
# merge and unmerge
# --------------------------------------------------------------------------------------------
@dataclass
class MergeResult:
    """What ``merge`` did.

    Attributes:
        output: the merged model written.
        adapters: the adapters merged, in order, with their weights.
        tensors_changed: base tensors an adapter changed.
        tensors_copied: tensors copied unchanged.
        modules: adapter modules merged.
        unmatched: modules skipped with ``allow_partial``.
        receipt: the receipt written, or None.
        receipt_bytes: its size.
        bytes_written: bytes of the weight files written.
        seconds: wall time.
        dtype: the ``dtype`` asked for.
        notes: what a user should know (files not copied, a 4-bit base written dequantized...).
    """

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


@_keeps_torch_threads
def merge(
    base: str | Path,
    adapters: Adapters,
    output: str | Path,
    *,
    weights: Weights = None,
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
    requantize: bool = False,
) -> MergeResult:
    """Write ``base + Σ wᵢ·ΔWᵢ`` to ``output`` in the base's own layout, one tensor at a time.

    Each adapter is merged in turn exactly as PEFT's ``merge_and_unload`` does (bit for bit).

    Args:
        base: a base model folder or file, or a Hub reference.
        adapters: one adapter or a list (paths or loaded), merged in this order.
        output: the folder (or file, for a single-file base) to create.
        weights: one merge weight per adapter (multiplies its scale), or one for a lone adapter; default 1.
        dtype: ``auto`` (the base's dtypes) or ``bf16``/``fp16``/``fp32`` for float tensors.
        shard_size: re-shard the output (e.g. ``"5GB"``); default: the base's own shards.
        receipt: write the receipt that lets ``unmerge`` restore the base bit for bit.
        allow_partial: do not fail when an adapter module matches no base weight.
        force: replace an existing output.
        format: force the adapters' format.
        allow_pickle: accept pickle adapters.
        subfolder: the folder inside a Hub adapter repo.
        alpha: lora_alpha for adapters that do not state it (a PEFT adapter without
            adapter_config.json); an error for one that does.
            Every other command that reads adapters and needs their scales takes it too.
        progress: called with (bytes done, bytes total); also turns on Hub download bars.
        requantize: an FP8 base (``quant_method: "fp8"``): write the changed weights back in FP8 (the
            base's blocks, new scales, its config kept); default: dequantized, config without it.

    Returns:
        What was merged and written.

    Raises:
        InputError: bad base or adapter, adapter that does not fit, unmatched modules.
        OutputError: output exists, is an input, or the disk is full.
    """
    t0 = time.perf_counter()
    adapters = as_list(adapters)
    if not adapters:
        raise UsageError("no adapter given")
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ws = weights_for(weights, len(adapters))
    size = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    output = Path(output)
    with open_base(base, progress=progress is not None) as b:
        opts = read_options(
            b, allow_pickle=allow_pickle, subfolder=subfolder, progress=progress is not None, alpha=alpha
        )
        loaded = load_adapters(adapters, format, opts)
        plan = plan_merge(b, loaded, ws)
        plan.refuse_unmatched(b, loaded, allow_partial)
        notes: list[str] = quantized_notes(b, plan, dtype, requantize)
        files = layout(b, DTYPES[dtype], size, keep_quantized=requantize)
        inputs = protected_paths(base=b, adapters=loaded)
        # a single-file output has its receipt beside it: checked as an output too, before any work,
        # whether or not one is written now (unmerge would take a receipt left there for this output's)
        check_output(output, inputs, force)  # first: './' has no name to put a receipt beside
        beside = None if b.is_dir else receipt_beside(output)
        if beside is not None:
            check_output(beside, inputs, force)
        receipt = receipt and not four_bit_note(b, notes)
        sources = refs(loaded, ws)
        written = write_merged(
            b, output, files, plan, loaded, sources, receipt=receipt, force=force, inputs=inputs, progress=progress,
            notes=notes, requantize=requantize,
        )
        if beside is not None and written.receipt is None and remove_stale(beside):
            notes.append(f"removed {beside}: it was the receipt of the output replaced")
        return MergeResult(
            output=output,
            adapters=sources,
            tensors_changed=len(plan.changes),
            tensors_copied=sum(len(items) for _, items in files) - written.computed,
            modules=sum(len(a.modules) for a in loaded) - len(plan.unmatched),
            unmatched=plan.unmatched,
            receipt=written.receipt,
            receipt_bytes=written.receipt_bytes,
            bytes_written=written.bytes,
            seconds=time.perf_counter() - t0,
            dtype=dtype,
            notes=notes,
        )


@dataclass
class UnmergeResult:
    """What ``unmerge`` did.

    Attributes:
        output: the model written.
        adapters: the adapters removed, with their weights.
        exact: a receipt made the result the original base, bit for bit.
        receipt: the receipt used, or None.
        tensors_changed: base tensors restored.
        bytes_written: bytes of the weight files written.
        seconds: wall time.
        notes: what a user should know (files not copied...).
        warnings: what could not be checked (no loractl merge record without a receipt).
    """

    output: Path
    adapters: list[AdapterRef]
    exact: bool
    receipt: Path | None
    tensors_changed: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@_keeps_torch_threads
def _open_receipt(merged: Path, receipt: str | Path | None, use: bool) -> tuple[Path, Receipt | None]:
    """The receipt's path (given, or beside ``merged``) and the receipt, open (None when not used or absent).

    Raises:
        InputError: a receipt given that does not exist, or is not a receipt.
    """
    rpath = Path(receipt) if receipt is not None else receipt_path(merged)
    if receipt is not None and not rpath.exists():
        raise InputError(f"{rpath}: no such receipt")
    return rpath, (Receipt(rpath) if use and rpath.exists() else None)


def unmerge(
    merged: str | Path,
    adapters: Adapters,
    output: str | Path,
    *,
    weights: Weights = None,
    receipt: str | Path | None = None,
    use_receipt: bool = True,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    alpha: float | None = None,
    progress: Progress | None = None,
) -> UnmergeResult:
    """Remove adapters from a merged model.

    With the receipt ``merge`` wrote (found beside the merged model, or given), the result equals
    the original base bit for bit; without it, the updates are subtracted (close, not exact) and
    DoRA adapters and ``modules_to_save`` are refused.

    Args:
        merged: the merged model (folder or file).
        adapters: the adapters merged, in the merge's order.
        output: the model to write.
        weights: the merge's weights.
        receipt: the receipt, when not where merge put it.
        use_receipt: False subtracts even when a receipt is there.
        force: replace an existing output.
        format, allow_pickle, subfolder: the adapters' format, pickles, Hub folder (as :func:`merge`).
        progress: called with (bytes done, bytes total).

    Returns:
        What was restored and whether it is exact.

    Raises:
        InputError: the receipt belongs to other adapters, the merged model was changed after the
            merge, or an adapter cannot be unmerged.
    """
    t0 = time.perf_counter()
    adapters = as_list(adapters)
    if not adapters:
        raise UsageError("no adapter given")
    ws = weights_for(weights, len(adapters))
    merged, output = Path(merged), Path(output)
    rpath, rec = _open_receipt(merged, receipt, use_receipt)
    try:
        with open_base(merged) as b:
            loaded = load_adapters(adapters, format, read_options(b, allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha))
            plan = plan_merge(b, loaded, ws)
            sources = refs(loaded, ws)
            warnings: list[str] = []
            if rec is not None:
                rec.check_adapters(sources)
            else:
                from .provenance import check_merge_record

                warnings = check_merge_record(b.shards, b.path, sources)
                plan.refuse_subtraction(loaded)
            files, jobs, loaders = unmerge_jobs(b, plan, rec, loaded)
            names = [s.path.name for s in b.shards]

            def metadata_for(i: int, src: dict[str, str]) -> dict[str, str]:
                if rec is not None and names[i] in rec.shard_metadata:
                    return dict(rec.shard_metadata[names[i]])
                return metadata("unmerge", sources, src)

            inputs = protected_paths(base=b, adapters=loaded, also=[rpath if rec is not None else None])
            mode = shard_mode(b)
            notes: list[str] = []
            with atomic_output(output, is_dir=b.is_dir, inputs=inputs, force=force) as tmp:
                written = Stream(b, jobs, loaders, progress=progress, mode=mode).write(
                    tmp, files, metadata_for, single_file=not b.is_dir
                )
                if b.is_dir:
                    b.index_metadata = {k: v for k, v in b.index_metadata.items() if not k.startswith("loractl.")}
                    write_index(tmp, b, files, {}, mode)
                    copy_other_files(b, tmp)
                    if rec is not None:
                        restore_originals(tmp, b.index_name, files, rec)
                    notes = copy_notes(b, output)
            return UnmergeResult(
                output=output,
                adapters=sources,
                exact=rec is not None,
                receipt=rpath if rec is not None else None,
                tensors_changed=len(plan.changes),
                bytes_written=written,
                seconds=time.perf_counter() - t0,
                notes=notes,
                warnings=warnings,
            )
    finally:
        from .ops.merge import forget

        forget()  # the experts' updates kept for reuse
        if rec is not None:
            rec.close()


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    """What ``verify`` found.

    Attributes:
        ok: every tensor is what a correct merge writes (no finding).
        merged: the merged model checked, as given.
        base: the base model, as given.
        adapters: the adapters it should hold, in merge order, with their weights.
        findings: each tensor no correct merge can have written (:class:`~loractl.verifying.Finding`).
        tensors: counts per tensor (:class:`~loractl.verifying.Counts`).
        seconds: wall time.
        notes: what a user should know (the merged model's dtype is not the base's...).
    """

    ok: bool
    merged: str
    base: str
    adapters: list[AdapterRef]
    findings: list[VerifyFinding]
    tensors: VerifyCounts
    seconds: float
    notes: list[str] = field(default_factory=list)


@_keeps_torch_threads
def verify(
    merged: str | Path,
    adapters: Adapters,
    *,
    base: str | Path,
    weights: Weights = None,
    allow_partial: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    alpha: float | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Audit a merged model, whoever made it (loractl, PEFT ``merge_and_unload``, mergekit...): every
    tensor the adapters change must equal ``base + Σ wᵢ·ΔWᵢ`` up to the rounding a correct merge may
    make in its dtype, every other tensor must equal the base (or the base cast to the merged dtype).

    Reads the base and the merged model tensor by tensor; nothing is written. The arithmetic and the
    bound are :mod:`loractl.ops.verify` (docs/merge.md, "verify: the rounding bound").

    Args:
        merged: the merged model (folder, file or Hub reference).
        adapters: the adapters it should hold, in merge order.
        base: the base model they were merged into (a 4-bit base: read dequantized, as merge does).
        weights: the merge weight of each adapter (default 1).
        allow_partial: check the modules that match a base weight and ignore the others (for a model
            merged with ``allow_partial``).
        format: force the adapters' format.
        allow_pickle: accept pickle adapters.
        subfolder: the folder inside a Hub adapter repo.
        alpha: lora_alpha for adapters that do not state it.
        progress: called with (bytes read, bytes total).

    Returns:
        ``ok`` and the findings; ``ok`` is False when the merged model is not a correct merge.

    Raises:
        InputError: a missing or unreadable model or adapter; an adapter that does not fit the base
            (as merge refuses it).
        UsageError: no adapter, or a weight per adapter missing.
    """
    t0 = time.perf_counter()
    adapters = as_list(adapters)
    if not adapters:
        raise UsageError("no adapter given")
    ws = weights_for(weights, len(adapters))
    with open_base(base, progress=progress is not None) as b, open_base(merged, progress=progress is not None) as m:
        opts = read_options(b, allow_pickle=allow_pickle, subfolder=subfolder, progress=progress is not None, alpha=alpha)
        loaded = load_adapters(adapters, format, opts)
        plan = plan_merge(b, loaded, ws)
        plan.refuse_unmatched(b, loaded, allow_partial, verb="verify")
        findings, counts = verify_model(m, b, plan, progress=progress)
        notes = verify_notes(m, b, plan)
    return VerifyResult(
        ok=not findings,
        merged=str(merged),
        base=str(base),
        adapters=refs(loaded, ws),
        findings=findings,
        tensors=counts,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------
@dataclass
class ModuleInfo:
    """One module as ``inspect`` describes it (docs/json.md, ``module_list[]``): a parameter LoRA (MoE
    experts) is named by its parameter, ``rank`` is the rank per expert, ``experts`` E (0 for a module)."""

    name: str
    kind: str
    rank: int
    alpha: float
    scale: float
    shape: list[int]
    dtype: str
    dora: bool
    experts: int = 0


@dataclass
class ShapeMismatch:
    """A module whose update has another shape than the base weight it resolves to."""

    module: str
    adapter: list[int]
    base: list[int]


@dataclass
class Incompatible:
    """A module that resolves but cannot be merged for another reason (a ``lora_B.bias`` on a layer
    without bias, an integer weight, a name that matches several base tensors)."""

    module: str
    message: str


@dataclass
class Coverage:
    """How an adapter fits a base, by :func:`loractl.plan.match`: ``complete`` exactly when ``merge``
    accepts it without ``allow_partial`` and ``check --base`` finds no fit error."""

    matched: int
    unmatched: list[str]
    shape_mismatch: list[ShapeMismatch]
    incompatible: list[Incompatible]
    complete: bool


@dataclass
class Storage:
    """The LoRA paper's storage arithmetic for ``count`` adapters of one base."""

    count: int
    base_plus_adapters: int
    merged_copies: int
    saving: float | None


@dataclass
class QuantizedBase:
    """A quantized base (bitsandbytes 4-bit, FP8), as merge writes it (dequantized).

    Attributes:
        method: ``bitsandbytes-4bit``, ``fp8`` or ``compressed-tensors`` (several joined by ``+``).
        quant_types: ``nf4``/``fp4`` for 4-bit; the FP8 dtypes (``F8_E4M3``, ``F8_E5M2``) for FP8.
        double_quant: 4-bit statistics quantized again.
        weights: quantized weights.
        merged_bytes: tensor bytes of a merge written with ``--dtype auto`` (dequantized).
        block: FP8's ``weight_block_size`` ([B0, B1]; None per tensor or channel, or for 4-bit).
    """

    method: str
    quant_types: list[str]
    double_quant: bool
    weights: int
    merged_bytes: int
    block: list[int] | None = None


@dataclass
class BaseFit:
    """An adapter against a base (``inspect --base``)."""

    path: str
    parameters: int
    bytes: int
    coverage: Coverage
    ratio: float | None
    storage: Storage
    quantized: QuantizedBase | None = None


@dataclass
class AdapterInfo:
    """One adapter as ``inspect`` describes it (docs/json.md, ``adapters[]``)."""

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
    base: BaseFit | None = None


@dataclass
class InspectResult:
    adapters: list[AdapterInfo] = field(default_factory=list)


def _coverage(b: BaseModel, a: Adapter) -> Coverage:
    fit = match(b, a)
    return Coverage(
        matched=fit.matched,
        unmatched=[p.module for p in fit.unmatched],
        shape_mismatch=[
            ShapeMismatch(p.module, p.adapter_shape or [], p.base_shape or []) for p in fit.problems if p.kind == "shape"
        ],
        incompatible=[Incompatible(p.module, p.message) for p in fit.problems if p.kind not in ("shape", "unmatched")],
        complete=fit.complete,
    )


def _quantized_base(quantized: dict, merged_bytes: int) -> QuantizedBase:
    from .io import quantized as qz

    qs = list(quantized.values())
    blocks = {tuple(q.block) for q in qs if getattr(q, "block", None)}
    return QuantizedBase(
        "+".join(qz.methods(quantized)),
        sorted({getattr(q, "quant_type", None) or q.dtype for q in qs}),
        any(getattr(q, "double_quant", False) for q in qs),
        len(qs),
        merged_bytes,
        list(next(iter(blocks))) if len(blocks) == 1 else None,
    )


def _base_fit(b: BaseModel, a: Adapter, count: int) -> BaseFit:
    from .io import quantized as qz

    quantized = b.quantized
    base_bytes = b.nbytes
    # a merged copy of a quantized base is written dequantized
    merged_bytes = qz.dequantized_nbytes(b, quantized) if quantized else base_bytes
    aux = qz.aux_keys(quantized)
    total = base_bytes + count * a.nbytes
    return BaseFit(
        path=str(b.path),
        parameters=sum(q.numel for q in quantized.values())
        + sum(info.numel for n, (_, info) in b.tensors.items() if n not in aux and n not in quantized),
        bytes=base_bytes,
        coverage=_coverage(b, a),
        ratio=a.nbytes / base_bytes if base_bytes else None,
        storage=Storage(count, total, count * merged_bytes, 1 - total / (count * merged_bytes) if merged_bytes else None),
        quantized=_quantized_base(quantized, merged_bytes) if quantized else None,
    )


def _describe(path: str | Path, a: Adapter) -> AdapterInfo:
    mods = [
        ModuleInfo(
            m.name, m.kind, m.rank, m.alpha, m.scale, list(m.weight_shape), dtype_name(m.up.dtype), m.is_dora, m.experts
        )
        for m in a.modules.values()
    ]
    ranks = [m.rank for m in mods] or [0]
    return AdapterInfo(
        path=str(path),
        format=a.format,
        kind=a.kind,
        rslora=a.rslora,
        modules=len(mods),
        rank={"min": min(ranks), "max": max(ranks)},
        parameters=a.parameters,
        bytes=a.nbytes,
        dtypes=sorted({dtype_name(t.dtype) for m in a.modules.values() for t in (m.up, m.down)}),
        module_list=mods,
        modules_to_save=sorted(a.modules_to_save),
        init=a.init,
    )


def inspect(
    adapters: Adapters,
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
        adapters: one adapter path or a list.
        base: a base model to check coverage against and to size storage with.
        count: N in "one base + N adapters vs N merged copies".
        format: force the adapters' format.
        allow_pickle: accept pickle adapters.
        subfolder: the folder inside a Hub adapter repo.

    Returns:
        One description per adapter, in order.

    Raises:
        InputError: a missing, unreadable or non-finite adapter; a base that cannot be opened.
    """
    if count < 1:
        raise UsageError("--count must be at least 1")
    result = InspectResult()
    b = open_base(base) if base is not None else None
    try:
        opts = read_options(b, allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha)
        for path in as_list(adapters):
            a = path if isinstance(path, Adapter) else load_adapter(path, format=format, options=opts)
            info = _describe(a.path if isinstance(path, Adapter) else path, a)
            if b is not None:
                info.base = _base_fit(b, a, count)
            result.adapters.append(info)
    finally:
        if b is not None:
            b.close()
    return result


# --------------------------------------------------------------------------------------------
# adapter algebra: truncate, combine, similarity, spectra (all from the factors)
# --------------------------------------------------------------------------------------------
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


def _truncation_rule(
    rank: int | None, rules: dict[str, float | None]
) -> dict[str, float]:
    """The one dynamic rule given (``energy``, ``sv_ratio``, ``sv_cumulative``, ``sv_fro``), checked."""
    given = {k: v for k, v in rules.items() if v is not None}
    if rank is None and not given:
        raise UsageError("say how far to truncate: --rank, --energy, --sv-ratio, --sv-cumulative or --sv-fro")
    if len(given) > 1:
        raise UsageError(f"give one dynamic rule, not {len(given)} ({', '.join(given)})")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    for flag in ("energy", "sv_cumulative", "sv_fro"):
        _check_fraction("--" + flag.replace("_", "-"), rules[flag])
    if rules["sv_ratio"] is not None and rules["sv_ratio"] < 1:
        raise UsageError(f"--sv-ratio {rules['sv_ratio']} must be at least 1 (keep σᵢ ≥ σ₁/P)")
    return given


def _dylora(a: Adapter, rank: int, convention: str | None, force: bool) -> tuple[str, float]:
    """The DyLoRA convention of a nested truncation and the factor it multiplies alpha by.

    ``original`` (Valipour et al.: s = alpha/R, alpha kept), ``kohya`` (sd-scripts'
    extract_lora_from_dylora.py keeps alpha; R a multiple of the unit), ``lycoris`` (LyCORIS scales by
    alpha/blocks used: alpha' = alpha·block, R a multiple of the block)."""
    from .formats.kohya import dylora_unit

    unit = dylora_unit(a)
    convention = convention or ("kohya" if unit is not None else "original")
    if convention not in DYLORA_CONVENTIONS:
        raise UsageError(f"unknown --dylora-convention {convention!r}; one of {', '.join(DYLORA_CONVENTIONS)}")
    if unit is None and not force:
        raise UsageError(
            f"{a.path}: not a DyLoRA adapter (no networks.dylora metadata): its first components are "
            "not trained to stand alone, so a nested truncation would not be a valid adapter",
            hint="use the default SVD truncation, or --force if you know it was trained nested",
        )
    block = (unit or 4) if convention == "lycoris" else (unit or 1)
    if convention in ("kohya", "lycoris") and rank % block:
        raise UsageError(f"{a.path}: --rank {rank} is not a multiple of the DyLoRA unit {block}")
    return convention, float(block) if convention == "lycoris" else 1.0


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
    subfolder: str | None = None,
    alpha: float | None = None,
    budget: str | int | None = None,
) -> TruncateResult:
    """Lower an adapter's rank.

    Default: for each module the best rank-k approximation of its update (Eckart–Young), computed
    from the factors (:func:`loractl.ops.truncate.svd_truncate`); k is ``rank``, or the smallest rank
    meeting the dynamic rule (``energy``: Σσ²ₖ/Σσ² ≥ F; ``sv_ratio`` P: σᵢ ≥ σ₁/P; ``sv_cumulative``:
    Σσₖ/Σσ ≥ F; ``sv_fro``: √(Σσ²ₖ/Σσ²) ≥ F) with ``rank`` as a cap. Modules already at or below the
    rank are kept as they are; truncated ones are written with alpha = new rank.

    ``nested`` (DyLoRA): keep the first ``rank`` components exactly, A[:R] and B[:, :R]; the new alpha
    follows ``dylora_convention`` (``original``, ``kohya``, ``lycoris``: see :func:`_dylora`).

    ``budget`` (bytes or ``"50MB"``, instead of a rank rule): ranks across modules that minimise the
    total squared error within that output size, with the allocator of ``extract --budget``
    (:func:`loractl.ops.truncate.budget_truncate`); every module keeps rank ≥ 1.

    Returns:
        Each module's rank before and after and the energy kept.

    Raises:
        UsageError: no rule, rank < 1, a fraction outside (0, 1], a rank above the adapter's, nested
            truncation of an adapter that is not DyLoRA (unless ``force``), a rank that is not a
            multiple of the DyLoRA unit.
    """
    from .ops.truncate import nested_truncate, svd_truncate

    t0 = time.perf_counter()
    rules = {"energy": energy, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative, "sv_fro": sv_fro}
    if budget is not None:
        if rank is not None or nested or any(v is not None for v in rules.values()):
            raise UsageError("--budget chooses every module's rank: give it without --rank, a dynamic rule or --nested")
        rank, rules = 1 << 30, {k: None for k in rules}  # checked by the budget itself below
    given = _truncation_rule(rank, rules)
    owned = not isinstance(adapter, Adapter)  # loaded here, so its tensors may be let go of
    a = adapter if isinstance(adapter, Adapter) else load_adapter(
        adapter, format=format, options=read_options(allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha)
    )
    max_rank = max((m.rank for m in a.modules.values()), default=0)
    if rank is not None and rank > max_rank and not given and budget is None:
        raise UsageError(
            f"{a.path}: --rank {rank} is larger than the adapter's largest rank {max_rank}",
            hint="truncation lowers the rank; use convert --pad-rank to raise it",
        )
    if nested:
        if given or rank is None:
            raise UsageError("--nested keeps the first R components: give --rank R (no dynamic rule)")
        convention, factor = _dylora(a, rank, dylora_convention, force)
        method = f"nested-{convention}"
    out: dict[str, LoraModule] = {}
    report: list[TruncatedModule] = []
    done = _truncate_budget(a, budget) if budget is not None else {}
    for name, m in a.modules.items():
        if budget is not None:
            t = done[name]
        else:
            t = nested_truncate(m, rank, factor) if nested else svd_truncate(m, rank, **given)  # type: ignore[arg-type]
        out[name] = t.module
        report.append(TruncatedModule(name, m.rank, t.rank, t.energy_kept, math.sqrt(t.energy_kept)))
        if owned and not nested and t.module is not m:  # the input's factors are not needed again
            m.down = torch.empty_like(m.down, device="meta")
            m.up = torch.empty_like(m.up, device="meta")
    fmt = to or writable(a.format)
    sources = refs([a])
    save_adapter(a.derived(out), output, to=fmt, force=force, inputs=protected_paths(adapters=[a]), operation="truncate", sources=sources)
    return TruncateResult(Path(output), fmt, method if nested else "svd", report, time.perf_counter() - t0)


def _truncate_budget(a: Adapter, budget: str | int) -> dict[str, Any]:
    """``truncate --budget``: what is not factors (biases, DoRA magnitudes, modules_to_save, headers)
    is paid first; the rest goes to ranks (:func:`loractl.ops.truncate.budget_truncate`)."""
    from .extracting import overhead
    from .ops.truncate import budget_truncate

    size = parse_size(budget) if isinstance(budget, str) else budget
    if size is None or size < 1:
        raise UsageError(f"--budget {budget} must be a positive size", hint="e.g. 50MB or 52428800")
    factors = sum(m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size() for m in a.modules.values())
    other = sum(m.nbytes for m in a.modules.values()) - factors
    other += sum(t.numel() * t.element_size() for t in (a.modules_to_save or {}).values())
    fixed = other + overhead(list(a.modules), list(a.modules_to_save or {}), 0)
    try:
        done, _ = budget_truncate(a.modules, size - fixed)
    except ValueError as e:
        raise UsageError(
            f"{a.path}: --budget of {size} bytes: {e} after {fixed} bytes for what is not factors and headers",
            hint="raise --budget",
        ) from None
    return done


@dataclass
class CombineResult:
    output: Path
    format: str
    method: str
    modules: int
    rank: dict[str, int]
    adapters: list[AdapterRef]
    seconds: float


def _combine_options(method: str, n: int, density: float | None, majority_sign: str, rank: int | None) -> None:
    if method not in COMBINE_METHODS:
        raise UsageError(f"unknown --method {method!r}; one of {', '.join(COMBINE_METHODS)}")
    if n < 2:
        raise UsageError("combine needs at least two adapters")
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


def _same_module(name: str, loaded: Sequence[Adapter]) -> list[LoraModule | None]:
    """Each adapter's module ``name`` (None where it has none), checked to update the same weight."""
    mods = [a.modules.get(name) for a in loaded]
    first = next(i for i, m in enumerate(mods) if m is not None)
    ref = mods[first]
    assert ref is not None
    for i, m in enumerate(mods):
        if m is not None and (m.kind, tuple(m.weight_shape), m.fan_in_fan_out, m.experts) != (
            ref.kind,
            tuple(ref.weight_shape),
            ref.fan_in_fan_out,
            ref.experts,
        ):
            raise ShapeMismatchError(
                f"module {name!r}: {loaded[first].path} has {ref.kind} {list(ref.weight_shape)} but "
                f"{loaded[i].path} has {m.kind} {list(m.weight_shape)}",
                hint="the adapters are for different base models",
            )
    return mods


def combine(
    adapters: Adapters,
    output: str | Path,
    *,
    weights: Weights = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    to: str | None = None,
    force: bool = False,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    alpha: float | None = None,
) -> CombineResult:
    """One adapter from several, module by module over the union of their modules.

    ``cat`` is exact: B = [w₁s₁B₁ | w₂s₂B₂ | …], A = [A₁; A₂; …], rank Σrᵢ, scale 1. ``svd`` is the
    exact weighted sum Σwᵢsᵢ BᵢAᵢ truncated optimally to ``rank`` (from factors). ``linear``, ``ties``,
    ``dare-linear``, ``dare-ties``, ``magnitude-prune`` reproduce PEFT's ``add_weighted_adapter``
    (``linear``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) module
    by module, ``seed`` seeding DARE's draws. A module missing from an adapter counts as zero.

    Returns:
        The combined adapter's method, module count and ranks.

    Raises:
        UsageError: unknown method, weights not matching adapters, a method's missing option.
        ShapeMismatchError: adapters whose modules disagree in shape (adapters for different bases).
        UnsupportedAdapterError: DoRA adapters (their magnitude vectors do not combine linearly).
    """
    from .ops.combine import combine_modules

    t0 = time.perf_counter()
    adapters = as_list(adapters)
    _combine_options(method, len(adapters), density, majority_sign, rank)
    if seed is not None and not 0 <= seed < 2**63:
        raise UsageError(f"--seed {seed} is out of range: 0 to 2^63 - 1 (torch's generator seeds)")
    ws = weights_for(weights, len(adapters))
    loaded = load_adapters(adapters, format, read_options(allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha))
    for a in loaded:
        dora = [m.name for m in a.modules.values() if m.is_dora]
        if dora:
            raise UnsupportedAdapterError(
                f"{a.path}: module {dora[0]!r} is DoRA; magnitude vectors do not combine linearly",
                hint="merge DoRA adapters into the base instead",
            )
    # PEFT's svd_rank default: the largest configured r of the adapters
    peft_rank = rank or max(m.rank for a in loaded for m in a.modules.values())
    out: dict[str, LoraModule] = {}
    for name in sorted({n for a in loaded for n in a.modules}):
        try:
            out[name] = combine_modules(
                _same_module(name, loaded),
                ws,
                method,
                rank=rank if method in ("cat", "svd") else peft_rank,
                density=density,
                majority_sign=majority_sign,  # type: ignore[arg-type]
                seed=seed,
            )
        except ValueError as e:
            hint = "use --method cat, which is exact for any ranks" if "rank" in str(e) and method == "linear" else None
            raise UsageError(f"module {name!r}: {e}", hint=hint) from None
        except torch.linalg.LinAlgError:  # the SVD of a sum that overflowed (a huge alpha, huge values)
            paths = ", ".join(str(a.path) for a in loaded if name in a.modules)
            raise InputError(
                f"{paths}: module {name!r}: the weighted sum of the updates is not finite (a scale or values "
                "too large for float32), so it has no SVD"
            ) from None
    combined = loaded[0].derived(out)
    combined.modules_to_save = {}
    fmt = to or writable(loaded[0].format)
    sources = refs(loaded, ws)
    save_adapter(combined, output, to=fmt, force=force, inputs=protected_paths(adapters=loaded), operation="combine", sources=sources)
    ranks = [m.rank for m in out.values()] or [0]
    return CombineResult(
        Path(output), fmt, method, len(out), {"min": min(ranks), "max": max(ranks)}, sources, time.perf_counter() - t0
    )


@dataclass
class ModuleSimilarity:
    name: str
    phi: float
    grid: list[list[float]] | None = None
    experts: list[float] | None = None  # a parameter LoRA: φ of each expert (``phi`` is their mean)


@dataclass
class SimilarityResult:
    adapters: list[str]
    factor: str
    i: int | None
    j: int | None
    mean_phi: float
    modules: list[ModuleSimilarity]
    grid: list[list[float]] | None = None


def _compared_factors(
    a1: Adapter, a2: Adapter, names: list[str], factor: str, i: int | None, j: int | None
) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """For each module: the two compared factors and the ranks i, j (checked); for a parameter LoRA one
    pair per expert (expert e of one adapter against expert e of the other), in order."""
    pairs = []
    for n in names:
        m1, m2 = a1.modules[n], a2.modules[n]
        if m1.experts != m2.experts:
            raise ShapeMismatchError(
                f"parameter {n!r}: {a1.path} has LoRAs of {m1.experts} experts, {a2.path} of {m2.experts}",
                hint="the adapters are for different base models",
            )
        for e1, e2 in zip(m1.split_experts(), m2.split_experts()):
            (b1, f1), (b2, f2) = e1.matrices(), e2.matrices()
            x1, x2 = (f1, f2) if factor == "A" else (b1, b2)
            if (factor == "A" and x1.shape[1] != x2.shape[1]) or (factor == "B" and x1.shape[0] != x2.shape[0]):
                raise ShapeMismatchError(f"module {n!r}: the two adapters' {factor} factors have different dimensions")
            ii = m1.rank if i is None else i
            jj = m2.rank if j is None else j
            if not (1 <= ii <= m1.rank and 1 <= jj <= m2.rank):
                raise UsageError(f"module {n!r}: i={ii}, j={jj} must be within the ranks {m1.rank} and {m2.rank}")
            pairs.append((x1, x2, ii, jj))
    return pairs


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
    subfolder: str | None = None,
) -> SimilarityResult:
    """The LoRA paper's normalized subspace similarity per module (Hu et al. 2021, Sec. 7.2):
    φ(A₁, A₂, i, j) = ‖U₁ᵢᵀ U₂ⱼ‖²_F / min(i, j), Uₓ the right-singular vectors of the A factors
    (``factor="B"``: the left-singular vectors of B). ``i``/``j`` default to each module's rank.
    ``grid``: the whole i×j matrix per module and its mean over modules (modules of the same ranks).

    Only the factor compared is read from the files. Modules are done on two threads.

    Returns:
        φ per module and its mean.

    Raises:
        UsageError: i or j out of range, an unknown factor, no module in common (or matching ``module``).
    """
    from .ops.similarity import grid_from_overlap, overlap, phi_from_overlap

    if factor not in ("A", "B"):
        raise UsageError(f"--factor must be A or B, not {factor!r}")
    opts = read_options(allow_pickle=allow_pickle, subfolder=subfolder, only_factor="down" if factor == "A" else "up")
    a1, a2 = (a if isinstance(a, Adapter) else load_adapter(a, format=format, options=opts) for a in (first, second))
    common = [n for n in a1.modules if n in a2.modules and (module is None or fnmatch.fnmatchcase(n, module))]
    if not common:
        what = f" matching {module!r}" if module else ""
        raise UsageError(f"{a1.path} and {a2.path} have no module in common{what}")
    pairs = _compared_factors(a1, a2, common, factor, i, j)

    def one(pair: tuple[torch.Tensor, torch.Tensor, int, int]) -> tuple[float, torch.Tensor | None]:
        x1, x2, ii, jj = pair
        sq = overlap(x1, x2, factor=factor)
        # a default i/j (the module's rank) beyond the basis the factor spans (rank > its size): all of it
        ii, jj = (min(ii, sq.shape[0]) if i is None else ii), (min(jj, sq.shape[1]) if j is None else jj)
        if not (1 <= ii <= sq.shape[0] and 1 <= jj <= sq.shape[1]):
            raise UsageError(f"i={ii}, j={jj}: the compared subspaces have {sq.shape[0]} and {sq.shape[1]} dimensions")
        return phi_from_overlap(sq, ii, jj), (grid_from_overlap(sq) if grid else None)

    # small decompositions: two threads of one torch thread each beat one op on two threads
    torch.set_num_threads(1)
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        results = list(pool.map(one, pairs))
    mods: list[ModuleSimilarity] = []
    grids: list[torch.Tensor] = []
    pos = 0
    for n in common:  # a parameter LoRA's experts: φ each, their mean, their mean grid
        k = max(1, a1.modules[n].experts)
        part, pos = results[pos : pos + k], pos + k
        phi = part[0][0] if k == 1 else sum(p for p, _ in part) / k
        g = part[0][1] if k == 1 else (torch.stack([g for _, g in part]).mean(0) if grid else None)
        if g is not None:
            grids.append(g)
        mods.append(ModuleSimilarity(n, phi, g.tolist() if g is not None else None, [p for p, _ in part] if k > 1 else None))
    mean_grid = torch.stack(grids).mean(0).tolist() if grids and all(g.shape == grids[0].shape for g in grids) else None
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
    expert: int | None = None  # a parameter LoRA (MoE experts): one entry per expert


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
    subfolder: str | None = None,
    alpha: float | None = None,
) -> AmplificationResult:
    """The LoRA paper's Section 7.3 per module: how strongly ΔW amplifies directions of W.

    With U, V the top-r singular vectors of ΔW: ‖UᵀWV‖_F (W on ΔW's subspace), the same for W's own
    top-r directions and for a random subspace, ‖ΔW‖_F, and the amplification ‖ΔW‖_F / ‖UᵀWV‖_F.
    Base tensors are read one at a time (dequantized where the base is quantized).

    Raises:
        InputError: a module that does not fit the base (the rule of :func:`loractl.plan.match`).
        UsageError: no module matches ``module``.
    """
    from .ops.similarity import amplification as amp

    out: list[AmplificationModule] = []
    with open_base(base) as b:
        (a,) = load_adapters([adapter], format, read_options(b, allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha))
        fit = match(b, a)
        g = torch.Generator().manual_seed(seed)
        for name, m in a.modules.items():
            if module is not None and not fnmatch.fnmatchcase(name, module):
                continue
            problem = next((p for p in fit.problems if p.module == name), None)
            if problem is not None:
                error = ShapeMismatchError if problem.kind == "shape" else InputError
                raise error(problem.message, hint="is this adapter for another base model?")
            if m.experts:
                out += _expert_amplification(b, m, fit.pieces[name], g)
                continue
            w = _base_weight(b, fit.weights[name]).double()
            if not bool(torch.isfinite(w).all()):
                key = fit.weights[name]
                raise InputError(f"{b.file_of(key).path}: tensor {key!r} holds NaN/Inf: it has no singular vectors")
            if m.kind == "embedding" or m.fan_in_fan_out:
                w = w.T
            b2, a2 = m.matrices()
            r = amp(w.reshape(w.shape[0], -1), b2, a2, m.scale, generator=g)
            out.append(AmplificationModule(name=name, rank=m.rank, **r))
    if not out:
        raise UsageError(f"no module of {adapter} matches {module!r}")
    return AmplificationResult(str(adapter), str(base), out)


def _expert_amplification(b: BaseModel, m: LoraModule, pieces: list, g: torch.Generator) -> list[AmplificationModule]:
    """:func:`amplification` of each expert of a parameter LoRA: W_e assembled from the base tensors its pieces
    name (rows of a per-expert tensor, or slice ``[e]`` of a fused one), in the orientation of ``B_e·A_e``."""
    from .ops.similarity import amplification as amp

    out: list[AmplificationModule] = []
    held: dict[str, torch.Tensor] = {}
    for e, one in enumerate(m.split_experts()):
        b2, a2 = one.matrices()
        w: torch.Tensor | None = None
        for p in (p for p in pieces if p.expert == e):
            if p.tensor not in held:
                held.clear()  # one base tensor at a time
                held[p.tensor] = _base_weight(b, p.tensor).double()
            t = held[p.tensor] if p.index is None else held[p.tensor][p.index]
            if p.rows is None:
                w = t
            else:
                w = w if w is not None else t.new_zeros(b2.shape[0], a2.shape[1])
                w[p.rows] = t
        assert w is not None
        r = amp(w.T if pieces[0].transposed else w, b2, a2, one.scale, generator=g)
        out.append(AmplificationModule(name=m.name, rank=m.rank, **r, expert=e if m.experts > 1 else None))
    return out


def _base_weight(b: BaseModel, key: str) -> torch.Tensor:
    """A base weight as the model computes with it: dequantized (float32) when it is stored quantized."""
    q = b.quantized.get(key)
    return q.float32(b) if q is not None else b.read(key)


@dataclass
class ModuleSpectrum:
    name: str
    rank: int
    singular_values: list[float]
    effective_rank: float
    energy: dict[str, float]  # rank -> energy kept
    expert: int | None = None  # a parameter LoRA (MoE experts): one spectrum per expert


@dataclass
class AdapterSpectrum:
    path: str
    modules: list[ModuleSpectrum]


@dataclass
class SpectrumResult:
    adapters: list[AdapterSpectrum]


def spectrum(
    adapters: Adapters,
    *,
    base: str | Path | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    alpha: float | None = None,
) -> SpectrumResult:
    """Singular values of each module's update (from factors), entropy effective rank, energy kept
    at ranks 1, 2, 4, … r. ``base``: for formats that need it to be read (GGUF's head counts).

    Returns:
        One spectrum per module of each adapter.
    """
    from .ops.factored import effective_rank, energy_kept, factored_svd

    b = open_base(base) if base is not None else None
    try:
        loaded = load_adapters(adapters, format, read_options(b, allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha))
    finally:
        if b is not None:
            b.close()
    result = []
    for a in loaded:
        mods = []
        for name, m in a.modules.items():
            for e, one in enumerate(m.split_experts()):
                _, s_vals, _ = factored_svd(*one.matrices(), one.scale)
                ks = sorted({min(2**p, m.rank) for p in range(m.rank.bit_length() + 1)})
                energy = {str(k): energy_kept(s_vals, k) for k in ks}
                spec = ModuleSpectrum(name, m.rank, [float(x) for x in s_vals], effective_rank(s_vals), energy)
                spec.expert = e if m.experts > 1 else None
                mods.append(spec)
        result.append(AdapterSpectrum(str(a.path), mods))
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
    experts: str | None = None  # "per-expert": parameter LoRAs rewritten as one module per expert


#: ``convert --experts`` choices: parameter LoRAs kept as PEFT stacks them, or one module per expert
EXPERT_FORMS = ("stacked", "per-expert")


def _converted(m: LoraModule, dtype: str | None, normalize: bool, pad_rank: int | None, source: Path) -> LoraModule:
    if pad_rank is not None and m.rank > pad_rank:
        raise UsageError(
            f"{source}: module {m.name!r} has rank {m.rank}, above --pad-rank {pad_rank}",
            hint=f"truncate it first: loractl truncate {source} -o smaller --rank {pad_rank}",
        )
    widest = max(math.prod(m.down.shape[1:]), m.up.shape[0])
    if pad_rank is not None and pad_rank > widest:  # zeros past the module's own size: memory, no meaning
        raise UsageError(
            f"{source}: module {m.name!r}: --pad-rank {pad_rank} is above its larger dimension {widest}",
            hint=f"pad to at most {widest}",
        )
    if dtype is not None:
        m = m.cast(torch_dtype(DTYPES[dtype]))  # type: ignore[arg-type]
    if normalize:
        m = m.normalized()
    if pad_rank is not None:
        m = m.padded(pad_rank)
    return m


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
    experts: str | None = None,
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
        experts: ``per-expert`` rewrites LoRAs on MoE expert parameters (PEFT ``target_parameters``) as one
            module LoRA per expert and on-disk tensor, named as the base's checkpoint names them
            (:func:`loractl.formats.experts.per_expert`; needs ``base``); ``stacked`` (default) keeps them.
        force: replace an existing output.
        format: force the source format.
        allow_pickle: accept a pickle adapter.
        subfolder: the folder inside a Hub adapter repo.
        progress: called with (modules done, modules total); also turns on Hub download bars.

    Returns:
        The formats and what was changed.

    Raises:
        UsageError: unknown format or dtype, a pad rank below a module's rank.
    """
    t0 = time.perf_counter()
    if to not in FORMATS:
        raise UsageError(f"unknown --to {to!r}; one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"unknown --dtype {dtype!r}; one of bf16, fp16, fp32")
    if pad_rank is not None and pad_rank < 1:
        raise UsageError(f"--pad-rank {pad_rank} must be at least 1")
    if experts is not None and experts not in EXPERT_FORMS:
        raise UsageError(f"unknown --experts {experts!r}; one of {', '.join(EXPERT_FORMS)}")
    if experts == "per-expert" and base is None:
        raise UsageError(
            "--experts per-expert needs --base: the experts' tensor names come from the base's architecture"
        )
    b = open_base(base, progress=progress is not None) if base is not None else None
    try:
        base_paths = protected_paths(base=b) if b is not None else []
        opts = read_options(
            b, allow_pickle=allow_pickle, rank=rank, alpha=alpha, subfolder=subfolder, progress=progress is not None
        )
        wopts = WriteOptions(base_keys=opts.base_keys, base_config=opts.base_config)
        a = load_adapter(adapter, format=format, options=opts)
    finally:
        if b is not None:
            b.close()
    mods: dict[str, LoraModule] = {}
    for name, m in a.modules.items():
        m = _converted(m, dtype, normalize, pad_rank, a.path)
        if experts == "per-expert" and m.experts:
            from .formats.experts import per_expert

            source = str(a.files[0] if a.files else a.path)
            mods.update((one.name, one) for one in per_expert(m, opts.base_config, source=source))
        else:
            mods[name] = m
        if progress is not None:
            progress(len(mods), len(a.modules))
    save_adapter(
        a.derived(mods),
        output,
        to=to,
        force=force,
        inputs=protected_paths(adapters=[a], also=base_paths),
        operation="convert",
        sources=refs([a]),
        options=wopts,
    )
    return ConvertResult(
        Path(output), a.format, to, len(mods), normalize, pad_rank, dtype, time.perf_counter() - t0, experts
    )


# --------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------
@dataclass
class ExtractResult:
    """What ``extract`` wrote.

    Attributes:
        output: the adapter written.
        format: its format.
        base, tuned: the models, as given.
        rule: ``rank``, ``energy`` or ``budget``.
        rank, energy: the rule's value (None for the others).
        dtype: dtype of the LoRA factors.
        modules: every changed weight with its rank (0: not in the adapter), relative error and
            energy kept, in file order.
        saved_full: tensors saved in full (``modules_to_save``), and why.
        left_out: changed tensors not in the adapter, and why.
        lora_bias: the biases' changes are in PEFT's ``lora_B.bias``.
        unchanged: tensors equal in both models (not in the adapter).
        total: totals.
        budget: how the budget was spent (None without one).
        bytes: bytes of the files written.
        seconds: wall time.
        notes: what a user should know (e.g. a resized vocabulary).
    """

    output: Path
    format: str
    base: str
    tuned: str
    rule: str
    rank: int | None
    energy: float | None
    dtype: str
    modules: list[ExtractedModule]
    saved_full: list[SavedTensor]
    left_out: list[SavedTensor]
    lora_bias: bool
    unchanged: int
    total: ExtractTotal
    budget: ExtractBudget | None
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _extract_rule(rank: int | None, energy: float | None, budget: str | int | None) -> tuple[str, int | None]:
    """The one rule given, checked; and the budget in bytes."""
    given = [n for n, v in (("--rank", rank), ("--energy", energy), ("--budget", budget)) if v is not None]
    if len(given) != 1:
        raise UsageError(
            "say how many ranks: one of --rank R, --energy F or --budget SIZE"
            + (f" (not {' and '.join(given)})" if given else "")
        )
    if rank is not None and (isinstance(rank, bool) or rank < 1):
        raise UsageError(f"--rank {rank} must be at least 1")
    _check_fraction("--energy", energy)
    size = parse_size(budget) if isinstance(budget, str) else budget
    if size is not None and size < 1:
        raise UsageError(f"--budget {budget} must be a positive size", hint="e.g. 200MB or 52428800")
    return given[0][2:], size


def _output_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _extract_config(base: str | Path, tuned: BaseModel) -> dict[str, Any]:
    """The PEFT config fields an extraction knows: the base (as given) and, for a causal LM, the task."""
    archs = tuned.config.get("architectures") or []
    causal = any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)
    return {"base_model_name_or_path": str(base), "task_type": "CAUSAL_LM" if causal else None}


def extract(
    base: str | Path,
    tuned: str | Path,
    output: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: str | int | None = None,
    module: str | Sequence[str] | None = None,
    full: bool = True,
    dtype: str = "fp32",
    to: str = "peft",
    force: bool = False,
    progress: Progress | None = None,
) -> ExtractResult:
    """The best LoRA of a full fine-tune: for every weight that differs between ``tuned`` and ``base``,
    the optimal (Eckart–Young) or certified near-optimal rank-k approximation of ``tuned − base``
    (:func:`loractl.ops.lowrank.low_rank`), streamed one pair of tensors at a time.

    Linear, conv and embedding weights become LoRA modules (alpha = rank, scale 1; embeddings as
    ``lora_embedding_A/B``). What a LoRA cannot hold (biases, norms, a resized vocabulary) is saved
    in full (``modules_to_save``, or ``lora_B.bias`` for the biases of LoRA layers when every one
    has a bias) or, with ``full=False``, listed in ``left_out``; never dropped silently. Unchanged
    tensors are not in the adapter. See docs/algebra.md ("extract").

    Args:
        base: the base model: folder, file or Hub reference ``org/name[@revision]``.
        tuned: the fine-tuned model, the same way.
        output: the adapter to create (a PEFT folder, or a file for other formats).
        rank: a fixed rank R per module (never above the update's numerical rank).
        energy: or the smallest rank keeping this fraction of each update's squared norm.
        budget: or a total size (``"200MB"`` or bytes) spent where it lowers the total squared
            error most (:func:`loractl.ops.lowrank.allocate`).
        module: fnmatch globs of module names to extract (default: all).
        full: save what a LoRA cannot hold in full (else list it as left out).
        dtype: ``fp32`` (default), ``bf16`` or ``fp16`` for the factors; errors are measured on
            the factors as written.
        to: the format written (any ``convert --to`` format).
        force: replace an existing output.
        progress: called with (bytes read, bytes to read); also turns on Hub download bars.

    Returns:
        Per module rank, relative error and energy kept; what was saved in full or left out.

    Raises:
        UsageError: not exactly one rule, a bad value, a --module glob matching nothing, a budget
            too small.
        InputError: models that do not belong together (another architecture, a tensor in one
            only, another shape: named), identical models, a NaN/Inf, nothing a LoRA can hold.
        OutputError: the output exists (without ``force``) or is an input.
    """
    from . import extracting as ex

    t0 = time.perf_counter()
    rule, size = _extract_rule(rank, energy, budget)
    if dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"unknown --dtype {dtype!r}; one of bf16, fp16, fp32")
    if to not in FORMATS:
        raise UsageError(f"unknown --to {to!r}; one of {', '.join(FORMATS)}")
    out_dtype = torch_dtype(DTYPES[dtype])  # type: ignore[arg-type]
    globs = [module] if isinstance(module, str) else list(module or [])
    output = Path(output)
    meta = {"loractl.base": str(base), "loractl.tuned": str(tuned)}
    with open_base(base, progress=progress is not None) as b, open_base(tuned, progress=progress is not None) as t:
        if b.path.resolve() == t.path.resolve():
            raise InputError(f"{t.path}: BASE and TUNED are the same model: nothing to extract")
        pairs = ex.select(ex.pair_tensors(b, t), globs, t.path)
        inputs = protected_paths(base=b) + protected_paths(base=t)
        check_output(output, inputs, force)
        run = ex.run(b, t, pairs, ex.Rule(rank=rank, energy=energy), size, full, out_dtype, len(json.dumps(meta)), progress)
        ex.nothing_to_extract(run, b, t, globs)
        placed = run.placed
        adapter = Adapter(t.path, "peft", placed.modules, placed.modules_to_save, config=_extract_config(base, t))
        options = WriteOptions(base_keys=list(b.tensors), base_config=b.config, metadata=meta)
        save_adapter(adapter, output, to=to, force=force, inputs=inputs, operation="extract", options=options)
        written = _output_bytes(output)
        if run.budget is not None and written > run.budget.size:  # pragma: no cover - the header allowance is generous
            run.notes.append(f"the output is {written} bytes, {written - run.budget.size} above the budget: please report this")
    return ExtractResult(
        output, to, str(base), str(tuned), rule, rank, energy, dtype, run.report, placed.saved_full, placed.left_out,
        placed.lora_bias, run.unchanged, run.total, run.budget, written, time.perf_counter() - t0, run.notes,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# check and recipes
# --------------------------------------------------------------------------------------------
def run(
    recipe: str | Path,
    *,
    vars: Mapping[str, str] | None = None,
    dry_run: bool = False,
    allow_pickle: bool = False,
    defaults: Mapping[str, Any] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> RunResult:
    """Run a TOML recipe of steps (``check``, ``truncate``, ``combine``, ``convert``, ``merge``,
    ``inspect``: the functions of :data:`STEPS`), validated before anything runs; a failed step
    stops it (see :mod:`loractl.recipe`).

    Args:
        recipe: the TOML file.
        vars: values for the recipe's ``${name}`` variables (the command line's ``--set``).
        dry_run: validate and plan only.
        allow_pickle: let every step read pickle adapters.
        defaults: option defaults per step kind (``[tool.loractl]``: ``{"merge": {"dtype": "bf16"}}``).
        on_step: called with each step's report as it finishes.

    Returns:
        Each step's status, output and result; ``ok`` is False when a step failed.

    Raises:
        UsageError: the recipe does not validate (naming its file, line and key).
    """
    from . import recipe as rec

    plan = rec.load(recipe, steps=STEPS, overrides=dict(vars or {}), defaults=defaults, allow_pickle=allow_pickle)
    return rec.run(plan, dry_run=dry_run, on_step=on_step)


#: the api function of each recipe step kind
STEPS: dict[str, Callable[..., Any]] = {
    "check": check,
    "truncate": truncate,
    "combine": combine,
    "convert": convert,
    "merge": merge,
    "inspect": inspect,
}
