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
from .merging import unmerge_jobs, write_merged
from .ops.combine import COMBINE_METHODS
from .ops.truncate import DYLORA_CONVENTIONS
from .plan import match, plan_merge
from .provenance import AdapterRef, metadata, refs
from .recipe import RunResult, StepReport

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
    "InspectResult",
    "MergeResult",
    "ModuleInfo",
    "ModuleSimilarity",
    "ModuleSpectrum",
    "SimilarityResult",
    "SpectrumResult",
    "Storage",
    "TruncateResult",
    "TruncatedModule",
    "UnmergeResult",
    "amplification",
    "check",
    "combine",
    "convert",
    "inspect",
    "load_adapter",
    "merge",
    "run",
    "save_adapter",
    "similarity",
    "spectrum",
    "truncate",
    "unmerge",
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
        files = layout(b, DTYPES[dtype], size)
        inputs = protected_paths(base=b, adapters=loaded)
        # a single-file output has its receipt beside it: checked as an output too, before any work,
        # whether or not one is written now (unmerge would take a receipt left there for this output's)
        check_output(output, inputs, force)  # first: './' has no name to put a receipt beside
        beside = None if b.is_dir else receipt_beside(output)
        if beside is not None:
            check_output(beside, inputs, force)
        notes: list[str] = []
        if receipt and b.quantized:
            receipt = False
            notes.append(
                f"the base is 4-bit ({len(b.quantized)} bitsandbytes weights): they are written dequantized; "
                "no receipt, since an unmerge can only give back the dequantized base, not the 4-bit file"
            )
        sources = refs(loaded, ws)
        written = write_merged(
            b, output, files, plan, loaded, sources, receipt=receipt, force=force, inputs=inputs, progress=progress, notes=notes
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
        format: force the adapters' format.
        allow_pickle: accept pickle adapters.
        subfolder: the folder inside a Hub adapter repo.
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
    rpath = Path(receipt) if receipt is not None else receipt_path(merged)
    if receipt is not None and not rpath.exists():
        raise InputError(f"{rpath}: no such receipt")
    rec = Receipt(rpath) if use_receipt and rpath.exists() else None
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
            files, jobs = unmerge_jobs(b, plan, rec, loaded)
            names = [s.path.name for s in b.shards]

            def metadata_for(i: int, src: dict[str, str]) -> dict[str, str]:
                if rec is not None and names[i] in rec.shard_metadata:
                    return dict(rec.shard_metadata[names[i]])
                return metadata("unmerge", sources, src)

            inputs = protected_paths(base=b, adapters=loaded, also=[rpath if rec is not None else None])
            mode = shard_mode(b)
            notes: list[str] = []
            with atomic_output(output, is_dir=b.is_dir, inputs=inputs, force=force) as tmp:
                written = Stream(b, jobs, progress=progress, mode=mode).write(
                    tmp, files, metadata_for, single_file=not b.is_dir
                )
                if b.is_dir:
                    b.index_metadata = {k: v for k, v in b.index_metadata.items() if not k.startswith("loractl.")}
                    write_index(tmp, b, files, {}, mode)
                    copy_other_files(b, tmp)
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
        if rec is not None:
            rec.close()


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------
@dataclass
class ModuleInfo:
    """One module as ``inspect`` describes it (docs/json.md, ``module_list[]``)."""

    name: str
    kind: str
    rank: int
    alpha: float
    scale: float
    shape: list[int]
    dtype: str
    dora: bool


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
    """A bitsandbytes 4-bit base, as merge writes it (dequantized)."""

    method: str
    quant_types: list[str]
    double_quant: bool
    weights: int
    merged_bytes: int


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
        matched=len(fit.weights),
        unmatched=[p.module for p in fit.unmatched],
        shape_mismatch=[
            ShapeMismatch(p.module, p.adapter_shape or [], p.base_shape or []) for p in fit.problems if p.kind == "shape"
        ],
        incompatible=[Incompatible(p.module, p.message) for p in fit.problems if p.kind not in ("shape", "unmatched")],
        complete=fit.complete,
    )


def _base_fit(b: BaseModel, a: Adapter, count: int) -> BaseFit:
    from .io import quant

    quantized = b.quantized
    base_bytes = b.nbytes
    # a merged copy of a 4-bit base is written dequantized (bf16)
    merged_bytes = quant.dequantized_nbytes(b, 2, quantized) if quantized else base_bytes
    aux = quant.aux_keys(quantized)
    total = base_bytes + count * a.nbytes
    return BaseFit(
        path=str(b.path),
        parameters=sum(q.numel for q in quantized.values())
        + sum(info.numel for n, (_, info) in b.tensors.items() if n not in aux and n not in quantized),
        bytes=base_bytes,
        coverage=_coverage(b, a),
        ratio=a.nbytes / base_bytes if base_bytes else None,
        storage=Storage(count, total, count * merged_bytes, 1 - total / (count * merged_bytes) if merged_bytes else None),
        quantized=QuantizedBase(
            "bitsandbytes-4bit",
            sorted({q.quant_type for q in quantized.values()}),
            any(q.double_quant for q in quantized.values()),
            len(quantized),
            merged_bytes,
        )
        if quantized
        else None,
    )


def _describe(path: str | Path, a: Adapter) -> AdapterInfo:
    mods = [
        ModuleInfo(m.name, m.kind, m.rank, m.alpha, m.scale, list(m.weight_shape), dtype_name(m.up.dtype), m.is_dora)
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
) -> TruncateResult:
    """Lower an adapter's rank.

    Default: for each module the best rank-k approximation of its update (Eckart–Young), computed
    from the factors (:func:`loractl.ops.truncate.svd_truncate`); k is ``rank``, or the smallest rank
    meeting the dynamic rule (``energy``: Σσ²ₖ/Σσ² ≥ F; ``sv_ratio`` P: σᵢ ≥ σ₁/P; ``sv_cumulative``:
    Σσₖ/Σσ ≥ F; ``sv_fro``: √(Σσ²ₖ/Σσ²) ≥ F) with ``rank`` as a cap. Modules already at or below the
    rank are kept as they are; truncated ones are written with alpha = new rank.

    ``nested`` (DyLoRA): keep the first ``rank`` components exactly, A[:R] and B[:, :R]; the new alpha
    follows ``dylora_convention`` (``original``, ``kohya``, ``lycoris``: see :func:`_dylora`).

    Returns:
        Each module's rank before and after and the energy kept.

    Raises:
        UsageError: no rule, rank < 1, a fraction outside (0, 1], a rank above the adapter's, nested
            truncation of an adapter that is not DyLoRA (unless ``force``), a rank that is not a
            multiple of the DyLoRA unit.
    """
    from .ops.truncate import nested_truncate, svd_truncate

    t0 = time.perf_counter()
    given = _truncation_rule(rank, {"energy": energy, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative, "sv_fro": sv_fro})
    owned = not isinstance(adapter, Adapter)  # loaded here, so its tensors may be let go of
    a = adapter if isinstance(adapter, Adapter) else load_adapter(
        adapter, format=format, options=read_options(allow_pickle=allow_pickle, subfolder=subfolder, alpha=alpha)
    )
    max_rank = max((m.rank for m in a.modules.values()), default=0)
    if rank is not None and rank > max_rank and not given:
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
    for name, m in a.modules.items():
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
        if m is not None and (m.kind, tuple(m.weight_shape), m.fan_in_fan_out) != (
            ref.kind,
            tuple(ref.weight_shape),
            ref.fan_in_fan_out,
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
    """For each module: the two compared factors and the ranks i, j (checked)."""
    pairs = []
    for n in names:
        m1, m2 = a1.modules[n], a2.modules[n]
        (b1, f1), (b2, f2) = m1.matrices(), m2.matrices()
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
        return phi_from_overlap(sq, ii, jj), (grid_from_overlap(sq) if grid else None)

    # small decompositions: two threads of one torch thread each beat one op on two threads
    torch.set_num_threads(1)
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        results = list(pool.map(one, pairs))
    mods = [ModuleSimilarity(n, phi, g.tolist() if g is not None else None) for n, (phi, g) in zip(common, results)]
    grids = [g for _, g in results if g is not None]
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
            w = _base_weight(b, fit.weights[name]).double()
            if m.kind == "embedding" or m.fan_in_fan_out:
                w = w.T
            b2, a2 = m.matrices()
            r = amp(w.reshape(w.shape[0], -1), b2, a2, m.scale, generator=g)
            out.append(AmplificationModule(name=name, rank=m.rank, **r))
    if not out:
        raise UsageError(f"no module of {adapter} matches {module!r}")
    return AmplificationResult(str(adapter), str(base), out)


def _base_weight(b: BaseModel, key: str) -> torch.Tensor:
    """A base weight as the model computes with it: dequantized when it is stored quantized."""
    from .io import quant

    q = b.quantized.get(key)
    return quant.dequantize(b, q) if q is not None else b.read(key)


@dataclass
class ModuleSpectrum:
    name: str
    rank: int
    singular_values: list[float]
    effective_rank: float
    energy: dict[str, float]  # rank -> energy kept


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
            _, s_vals, _ = factored_svd(*m.matrices(), m.scale)
            ks = sorted({min(2**p, m.rank) for p in range(m.rank.bit_length() + 1)})
            energy = {str(k): energy_kept(s_vals, k) for k in ks}
            mods.append(ModuleSpectrum(name, m.rank, [float(x) for x in s_vals], effective_rank(s_vals), energy))
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
        mods[name] = _converted(m, dtype, normalize, pad_rank, a.path)
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
    return ConvertResult(Path(output), a.format, to, len(mods), normalize, pad_rank, dtype, time.perf_counter() - t0)


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
