"""``loractl verify`` as a pipeline: a merged model audited tensor by tensor against its base and the
adapters' plan (:func:`loractl.plan.plan_merge`), with the arithmetic of :mod:`loractl.ops.verify`.

The merged model must hold the tensors the base holds (a 4-bit base: the tensors a merge writes, its
weights dequantized; see :func:`loractl.io.layout.layout`), each of the base's shape. Pairs of
tensors (the base's, read dequantized where it is stored 4-bit, and the merged model's) are read on
a reading thread while the previous pair is checked, into reused buffers: at most two pairs are in
memory at once. A tensor the plan changes is checked with :func:`~loractl.ops.verify.check_changed`
(PEFT's bits, a float32 merge's, or the rounding bound), any other with
:func:`~loractl.ops.verify.check_untouched`. Each tensor that fails becomes one :class:`Finding`
named by its module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from .io.buffers import BufferPool
from .io.layout import layout
from .io.safetensors import FLOAT_DTYPES, torch_dtype
from .ops import verify as verify_ops

if TYPE_CHECKING:  # pragma: no cover
    from .io.base import BaseModel
    from .io.stream import Progress
    from .ops.merge import Contribution
    from .plan import MergePlan

_T = TypeVar("_T")

#: the finding codes: the verdicts of :mod:`loractl.ops.verify`, and a tensor of another shape
CODES = (
    verify_ops.NOT_MERGED,
    verify_ops.WRONG_SCALE,
    verify_ops.STRAY_CHANGE,
    verify_ops.NAN_INF,
    verify_ops.MISMATCH,
    "shape-mismatch",
    verify_ops.MISSING,
    verify_ops.EXTRA,
)


@dataclass
class Finding:
    """One tensor of the merged model that no correct merge can have written.

    Attributes:
        code: ``not-merged``, ``wrong-scale``, ``stray-change``, ``nan-inf``, ``mismatch`` (changed, but
            not as any scale of the adapters' update), ``shape-mismatch``, ``missing`` or ``extra``.
        module: the adapter module(s) that change the tensor (PEFT's names), or for a tensor no adapter
            changes the module that holds it (the tensor's name without its last part).
        message: one sentence naming the tensor and what is wrong with it.
        tensor: the tensor's name.
        ratio: the least-squares ratio c of ``M − W ≈ c·(E − W)`` (``wrong-scale``: the scale observed
            relative to the one expected; also given for ``not-merged`` and ``mismatch`` when computed).
        outside: elements outside the rounding bound (changed tensors) or different from the base.
        elements: the tensor's elements.
    """

    code: str
    module: str | None
    message: str
    tensor: str
    ratio: float | None = None
    outside: int = 0
    elements: int = 0


@dataclass
class Counts:
    """What was checked, per tensor.

    Attributes:
        tensors: tensors of the base compared with the merged model's.
        changed: of those, tensors the adapters change.
        exact: changed tensors holding exactly the bits of a correct merge (PEFT's, loractl's where they
            differ from PEFT's, or float32 then cast).
        within_bound: changed tensors whose bits differ from those, every element within the rounding bound.
        untouched: tensors no adapter changes, equal to the base (or to the base cast to the merged dtype).
        failed: tensors with a finding (``missing`` and ``extra`` are not counted here).
        orders: tensors by what they equal: ``peft``, ``loractl``, ``fp32`` (changed), ``base``, ``cast`` (untouched).
    """

    tensors: int = 0
    changed: int = 0
    exact: int = 0
    within_bound: int = 0
    untouched: int = 0
    failed: int = 0
    orders: dict[str, int] = field(default_factory=dict)


def owner(tensor: str) -> str:
    """The module holding ``tensor``: its name without the last part (``...input_layernorm.weight``)."""
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def verify_model(
    merged: BaseModel, base: BaseModel, plan: MergePlan, *, progress: Progress | None = None
) -> tuple[list[Finding], Counts]:
    """Check every tensor of ``merged`` against ``base`` and ``plan`` (module docstring).

    Returns:
        The findings (``missing`` and ``extra`` first, then the tensors in the base's order) and the counts.
    """
    expected = {t.name: t.shape for _, items in layout(base, None, None) for t in items}
    missing, extra = verify_ops.missing_and_extra(merged.tensors, expected)
    findings = [_absent(n, verify_ops.MISSING, plan, merged, base) for n in missing]
    findings += [_absent(n, verify_ops.EXTRA, plan, merged, base) for n in extra]
    names: list[str] = []
    for n, shape in expected.items():
        if n not in merged.tensors:
            continue
        got = tuple(merged.info(n).shape)
        if got != tuple(shape):
            findings.append(_shape_finding(n, got, tuple(shape), plan.changes.get(n, []), merged, base))
        else:
            names.append(n)
    shapes = sum(f.code == "shape-mismatch" for f in findings)
    counts = Counts(failed=shapes)
    orders: Counter[str] = Counter()
    reader = _Reader(merged, base, frozenset(plan.changes))
    total = sum(merged.info(n).nbytes + base.info(n).nbytes for n in names)
    done = 0
    if progress is not None:
        progress(0, total)
    for name, pair in _pairs(names, reader):
        changes = plan.changes.get(name, [])
        if pair is None:  # the base's bytes
            check = verify_ops.TensorCheck(verify_ops.OK, exact="base", elements=merged.info(name).numel)
        else:
            w, m = pair
            check = verify_ops.check_changed(m, w, changes) if changes else verify_ops.check_untouched(m, w)
            reader.pool.release(w)
            reader.pool.release(m)
            del w, m, pair
        _count(counts, orders, check, bool(changes))
        if not check.ok:
            findings.append(_finding(name, check, changes))
        done += merged.info(name).nbytes + base.info(name).nbytes
        if progress is not None:
            progress(done, total)
    counts.tensors = len(names) + shapes
    counts.orders = dict(sorted(orders.items()))
    return findings, counts


#: bytes compared at a time when an untouched tensor is compared as bytes
COMPARE_CHUNK = 1 << 22


@dataclass
class _Reader:
    """Reads the pairs, on one reading thread. A tensor no adapter changes, stored in the same dtype in
    both models, is first compared as bytes, a chunk at a time (no whole tensor in memory: the
    embeddings are the largest tensors of a model); only when some byte differs are both read whole."""

    merged: BaseModel
    base: BaseModel
    changed: frozenset[str]
    pool: BufferPool = field(default_factory=BufferPool)
    chunks: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pair, or None when the untouched tensor is the base's byte for byte."""
        if name not in self.changed and name not in self.base.quantized and self._same_bytes(name):
            return None
        return _read_pair(self.merged, self.base, self.pool, name)

    def _same_bytes(self, name: str) -> bool:
        mi, bi = self.merged.info(name), self.base.info(name)  # bytes: any dtype
        if mi.dtype != bi.dtype or mi.nbytes != bi.nbytes:
            return False
        if self.chunks is None:
            self.chunks = (
                torch.empty(COMPARE_CHUNK, dtype=torch.uint8),
                torch.empty(COMPARE_CHUNK, dtype=torch.uint8),
            )
        a, b = self.chunks
        va, vb = memoryview(a.numpy()).cast("B"), memoryview(b.numpy()).cast("B")
        mf, bf = self.merged.file_of(name), self.base.file_of(name)
        for pos in range(0, mi.nbytes, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, mi.nbytes - pos)
            mf.read_range_into(mi.begin + pos, va[:n], name)
            bf.read_range_into(bi.begin + pos, vb[:n], name)
            if not torch.equal(a[:n], b[:n]):
                return False
        return True


def _read_pair(
    merged: BaseModel, base: BaseModel, pool: BufferPool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's tensor (dequantized where it is stored quantized: 4-bit, FP8) and the merged model's, into pooled buffers."""
    q = base.quantized.get(name)
    if q is not None:
        w = q.load(base, torch_dtype(q.merge_dtype))  # as a merge dequantizes it (4-bit, FP8)
    else:
        info = base.info(name)
        w = base.read(name, out=pool.empty(info.shape, torch_dtype(info.dtype)))
    info = merged.file_of(name).readable_info(name)
    m = merged.read(name, out=pool.empty(info.shape, torch_dtype(info.dtype)))
    return w, m


def _pairs(names: Sequence[str], read: Callable[[str], _T]) -> Iterator[tuple[str, _T]]:
    """``(name, read(name))`` for each name, the next one read on a thread while the caller checks this one."""
    if not names:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-read") as io:
        nxt = io.submit(read, names[0])
        for k, name in enumerate(names):
            got = nxt.result()
            if k + 1 < len(names):
                nxt = io.submit(read, names[k + 1])
            yield name, got
            del got


def _count(counts: Counts, orders: Counter[str], check: verify_ops.TensorCheck, changed: bool) -> None:
    counts.changed += changed
    if not check.ok:
        counts.failed += 1
        return
    if check.exact is not None:
        orders[check.exact] += 1
    if not changed:
        counts.untouched += 1
    elif check.exact is not None:
        counts.exact += 1
    else:
        counts.within_bound += 1


def _modules(changes: Sequence[Contribution], tensor: str) -> tuple[str, str]:
    """(the ``module`` of a finding, how a sentence names it)."""
    names = list(dict.fromkeys(c.module.name for c in changes if c.module is not None))
    if not names:
        kinds = {c.kind for c in changes}
        what = "saved tensor (modules_to_save)" if kinds == {"replace"} else "module"
        return owner(tensor), f"{what} {owner(tensor)!r}"
    if len(names) == 1:
        return names[0], f"module {names[0]!r}"
    return ", ".join(names), "modules " + ", ".join(repr(n) for n in names)


def _at(check: verify_ops.TensorCheck) -> str:
    return f" at {list(check.worst)}" if check.worst is not None else ""


def _weights(changes: Sequence[Contribution]) -> set[float]:
    return {c.weight for c in changes if c.kind == "lora"}


def _finding(tensor: str, check: verify_ops.TensorCheck, changes: Sequence[Contribution]) -> Finding:
    """The finding for one tensor that failed its check, its message naming the tensor and the module."""
    module, who = _modules(changes, tensor)
    c = check.ratio
    code = check.verdict
    if code == verify_ops.NOT_MERGED:
        if check.note == "equal to the base" or c is None:
            msg = f"tensor {tensor!r} equals the base: {who} is not merged"
        else:
            msg = f"tensor {tensor!r} holds {c:.3g}× the update of {who} (least squares): it is not merged"
    elif code == verify_ops.WRONG_SCALE:
        assert c is not None
        msg = (
            f"tensor {tensor!r} holds {c:.4g}× the expected update of {who} (least-squares ratio, "
            f"residual {check.residual or 0:.2g}): merged at the wrong scale"
        )
        ws = _weights(changes)
        if len(ws) == 1:
            (w,) = ws
            msg += f" (weight {w * c:.4g} instead of {w:g}?)"
    elif code == verify_ops.NAN_INF:
        expect = "a correct merge" if changes else "the base"
        msg = f"tensor {tensor!r} holds {check.nonfinite} NaN/Inf values where {expect} is finite (first{_at(check)})"
    elif code == verify_ops.STRAY_CHANGE:
        msg = (
            f"tensor {tensor!r} is changed by no adapter, yet {check.outside} of {check.elements} values differ "
            f"from the base (largest |M − W| {check.max_abs_diff:.3g}{_at(check)})"
        )
    else:
        ratio = f"; least-squares ratio {c:.4g}, residual {check.residual:.2g}" if c is not None else ""
        note = f" ({check.note})" if check.note else ""
        msg = (
            f"tensor {tensor!r}: {check.outside} of {check.elements} values are beyond the rounding of any correct "
            f"merge of {who}{note} (largest |M − E| {check.max_abs_diff:.3g}{_at(check)}{ratio})"
        )
    return Finding(code, module, msg, tensor, ratio=c, outside=check.outside, elements=check.elements)


def _shape_finding(
    tensor: str,
    got: tuple[int, ...],
    want: tuple[int, ...],
    changes: Sequence[Contribution],
    merged: BaseModel,
    base: BaseModel,
) -> Finding:
    module, _ = _modules(changes, tensor)
    msg = f"{merged.path}: tensor {tensor!r} is {list(got)} but the base's ({base.path}) is {list(want)}"
    return Finding("shape-mismatch", module, msg, tensor, elements=_numel(got))


def _absent(tensor: str, code: str, plan: MergePlan, merged: BaseModel, base: BaseModel) -> Finding:
    module, who = _modules(plan.changes.get(tensor, []), tensor)
    if code == verify_ops.MISSING:
        changed = f" ({who} changes it)" if tensor in plan.changes else ""
        msg = f"{merged.path}: tensor {tensor!r} of the base is missing{changed}"
    else:
        msg = f"{merged.path}: tensor {tensor!r} is not in the base {base.path}"
    return Finding(code, module, msg, tensor)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def verify_notes(m: BaseModel, b: BaseModel, plan: MergePlan) -> list[str]:
    """What a user should know about a verification: modules not checked, a 4-bit base, dtypes that
    differ between the base and the merged model (and how they are judged)."""
    notes = []
    if plan.unmatched:
        notes.append(
            f"{len(plan.unmatched)} adapter modules match no base weight and were not checked (--allow-partial)"
        )
    if b.quantized:
        notes.append(
            f"the base is 4-bit ({len(b.quantized)} bitsandbytes weights): compared dequantized, as merge writes them"
        )
    pairs = {
        (b.info(n).dtype, m.info(n).dtype)
        for n in m.tensors
        if n in b.tensors and n not in b.quantized and b.info(n).dtype != m.info(n).dtype
    }
    for bd, md in sorted(pairs):
        if bd not in FLOAT_DTYPES or md not in FLOAT_DTYPES:
            continue
        if verify_ops.exact_cast(torch_dtype(bd), torch_dtype(md)):
            how = f"a merge in {md}, which holds the base's values exactly (PEFT loading the base in {md})"
        else:
            how = (
                f"both correct orders: the base cast to {md} first (PEFT loading it in {md}), or merged in {bd} "
                "and cast once (loractl merge --dtype, mergekit)"
            )
        notes.append(f"tensors {bd} in the base are {md} in the merged model: checked against {how}")
    return notes
