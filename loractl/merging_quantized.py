"""The merge and unmerge jobs of quantized base weights (:mod:`loractl.io.quantized`: bitsandbytes 4-bit,
FP8 with scales).

Merge. Each quantized weight is dequantized as its runtime does (:meth:`QuantizedTensor.load`:
bitsandbytes' ``dequantize_4bit``, transformers' ``Fp8Dequantize``) and merged exactly as PEFT merges
into that dense model (:func:`loractl.ops.merge.merge_tensor`); it is written dense (``--dtype``,
default bf16) unless ``--requantize``: then an FP8 weight is merged in float32 and quantized again in
its own layout (:func:`loractl.io.fp8.requantize_weight`: new codes and a new ``weight_scale_inv`` per
block, DeepSeek-V3's rule). The weight and its scale are two tensors of the output, written in the
base's order (a safetensors file lists a float32 scale before its 1-byte weight), so their two jobs
share one :class:`Requantized` computation: whichever runs first computes both, the other takes its
half.

The receipt of an FP8 weight (:func:`code_parts`): the subtraction an unmerge will compute (from the
bf16 weight written, or from the requantized codes dequantized to float32), quantized with the base's
own scales (:func:`loractl.io.fp8.encode_codes`), and the few codes that come out differently; the
base's scales and other auxiliary tensors are kept whole (``<key>::full``) by
:func:`loractl.merging.write_merged`. :func:`unmerge_fp8` gives back the base's codes from them, bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError, UsageError
from .io import fp8
from .ops import merge as merge_ops

if TYPE_CHECKING:  # pragma: no cover
    from .io.base import BaseModel
    from .io.quantized import QuantizedTensor
    from .io.receipt import Receipt
    from .io.stream import Parts
    from .plan import MergePlan

#: a merged tensor's check for NaN/Inf (loractl.merging.check_finite with its arguments)
Check = Callable[[torch.Tensor], None]


def merge_quantized(
    stored: torch.Tensor,
    *,
    b: BaseModel,
    q: QuantizedTensor,
    contribs: Sequence[merge_ops.Contribution],
    out_dtype: torch.dtype,
    fused: bool,
    receipt: bool,
    check: Check,
) -> tuple[torch.Tensor, Parts | None]:
    """The job of a quantized weight written dense: dequantized (``q.load``), merged as PEFT merges.

    Args:
        stored: the weight as stored (the FP8 codes, the packed 4-bit codes): with ``receipt``, the
            original an unmerge gives back.
        b: the base.
        q: the weight.
        contribs: its contributions ([] for a weight only dequantized).
        out_dtype: the dtype written.
        fused: the merge may compute a single LoRA by row blocks (:func:`loractl.ops.merge.fused_ok`).
        receipt: also return the receipt's parts (FP8 only: :func:`code_parts`).
        check: the NaN/Inf check of the merged tensor.
    """
    dense = q.load(b, out_dtype)
    if not receipt:
        return merge_ops.merge_tensor(
            dense, contribs, out_dtype, fused=fused, receipt=False, original=lambda: q.load(b, out_dtype), check=check
        )
    assert isinstance(q, fp8.Fp8Weight)
    deltas: dict[int, torch.Tensor] = {}
    merged = merge_ops.merged_tensor(dense, contribs, out_dtype, deltas=deltas)
    check(merged)
    return merged, code_parts(stored, b.read(q.scale_key), q.block, dense, merged, contribs, deltas)


def code_parts(
    codes: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] | None,
    dense: torch.Tensor,
    written: torch.Tensor,
    contribs: Sequence[merge_ops.Contribution],
    deltas: dict[int, torch.Tensor],
) -> Parts:
    """The receipt's parts of an FP8 weight: what turns the unmerge's subtraction back into the base's
    ``codes`` under the base's ``scale``.

    ``written`` is what the unmerge starts from (the dense merged weight, or the requantized one
    dequantized to float32), in the dtype the unmerge computes in; ``dense`` is the base weight
    dequantized as the merge used it (DoRA's norms are taken from it). The parts are
    :func:`loractl.io.fp8.encode_codes`' corrections (``full``: the codes themselves, when a saved
    tensor replaced the weight or most codes move) and DoRA's factors (``dora<k>``).
    """
    if any(c.kind == "replace" for c in contribs):
        return {"full": codes.contiguous()}
    factors = merge_ops.dora_factors(dense, contribs, deltas)
    rec = merge_ops.unmerged_tensor(written, contribs, written.dtype, factors, deltas)
    parts = fp8.encode_codes(codes, rec, scale, block)
    for pos, f in factors.items():
        parts[f"dora{pos}"] = f.contiguous()
    return parts


class Requantized:
    """The requantized merge of one FP8 weight, shared by the jobs of the weight and of its scale.

    The first of the two jobs to run computes it: dequantized to float32, merged in float32 as PEFT
    merges into a float32 model, requantized in the weight's layout (new scales per block), and, with
    ``receipt``, the receipt's parts (:func:`code_parts`, from the requantized weight dequantized to
    float32: what an unmerge starts from). Each job then takes its tensor; nothing is kept after that.
    With ``unmerge`` the contributions are subtracted instead (an unmerge without a receipt: close to
    the base, with new scales).
    """

    def __init__(
        self,
        b: BaseModel,
        q: fp8.Fp8Weight,
        contribs: Sequence[merge_ops.Contribution],
        *,
        receipt: bool,
        check: Check,
        unmerge: bool = False,
    ) -> None:
        self.b, self.q, self.contribs, self.receipt, self.check = b, q, contribs, receipt, check
        self.unmerge = unmerge
        self._out: dict[str, tuple[torch.Tensor, Parts | None]] | None = None

    def take(self, name: str) -> tuple[torch.Tensor, Parts | None]:
        """The job of ``name`` (the weight or its scale; the tensor read is not needed)."""
        if self._out is None:
            self._out = self._compute()
        return self._out.pop(name)

    def job(self, name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, Parts | None]]:
        return lambda _read: self.take(name)

    def _compute(self) -> dict[str, tuple[torch.Tensor, Parts | None]]:
        b, q = self.b, self.q
        dense = q.load(b, torch.float32)
        deltas: dict[int, torch.Tensor] | None = {} if self.receipt else None
        if self.unmerge:
            merged = merge_ops.unmerged_tensor(dense, self.contribs, torch.float32)
        else:
            merged = merge_ops.merged_tensor(
                dense, self.contribs, torch.float32, inplace=not self.receipt, deltas=deltas
            )
        self.check(merged)
        try:
            new = fp8.requantize_weight(q, merged)
        except ValueError as e:
            raise InputError(
                f"{b.file_of(q.name).path}: tensor {q.name!r}: the merged weight cannot be requantized: {e}",
                hint="merge without --requantize (the weights are then written in bf16)",
            ) from None
        codes, scale = new[q.name], new[q.scale_key]
        parts = None
        if self.receipt:
            assert deltas is not None
            back = fp8.dequantize(b, q, torch.float32, codes=codes, scale=scale)
            parts = code_parts(b.read(q.name), b.read(q.scale_key), q.block, dense, back, self.contribs, deltas)
        return {q.name: (codes, parts), q.scale_key: (scale, None)}


# --------------------------------------------------------------------------------------------
# unmerge
# --------------------------------------------------------------------------------------------
def unmerge_fp8(
    m: torch.Tensor,
    *,
    b: BaseModel,
    name: str,
    info: dict[str, Any],
    contribs: Sequence[merge_ops.Contribution],
    receipt: Receipt,
) -> tuple[torch.Tensor, None]:
    """The job of an FP8 weight an unmerge gives back: the base's codes, bit for bit.

    ``m`` is the merged weight read: dense (bf16...), or the requantized codes (``info["requantized"]``),
    then dequantized to float32 with the merged model's scales. The contributions are subtracted
    (:func:`loractl.ops.merge.unmerged_tensor`, as :func:`code_parts` did at merge time), the result
    quantized with the base's scales from the receipt and corrected with its parts
    (:func:`loractl.io.fp8.decode_codes`), then checked against the checksum the merge recorded.

    Args:
        info: the receipt's record of the weight: ``dtype``, ``block``, ``scale`` (the scale's key),
            ``requantized``.
    """
    from .io.safetensors import torch_dtype

    parts = receipt.parts(name, m.shape, torch_dtype(info["dtype"]))
    if "full" in parts:
        codes = parts["full"]
    else:
        scale = receipt.whole(info["scale"])
        block = tuple(info["block"]) if info["block"] else None
        if info["requantized"]:
            q = b.quantized[name]
            assert isinstance(q, fp8.Fp8Weight)
            m = fp8.dequantize(b, q, torch.float32, codes=m)
        factors = {int(k[4:]): v for k, v in parts.items() if k.startswith("dora")}
        rec = merge_ops.unmerged_tensor(m, contribs, m.dtype, factors)
        codes = fp8.decode_codes(rec, scale, block, parts, torch_dtype(info["dtype"]))  # type: ignore[arg-type]
    receipt.verify(name, codes, b.path)
    return codes, None


def restore_whole(t: torch.Tensor, *, name: str, receipt: Receipt, path: Any) -> tuple[torch.Tensor, None]:
    """The job of a tensor the receipt keeps whole (an FP8 weight's original scale), given by its
    loader from the receipt: checked against the checksum the merge recorded."""
    receipt.verify(name, t, path)
    return t, None


def quantized_notes(b: BaseModel, plan: MergePlan, dtype: str, requantize: bool) -> list[str]:
    """What a merge of a quantized (FP8) base tells its user; refuses ``requantize`` where it cannot be done.

    Raises:
        UsageError: ``requantize`` for a base with no block-scaled FP8 weight (unquantized, 4-bit or
            compressed-tensors), or with a ``dtype`` other than ``auto``.
    """
    fp8s = [q for q in b.quantized.values() if q.method != "bitsandbytes-4bit"]
    if requantize:
        if not fp8s or not all(q.requantizable for q in b.quantized.values()):
            what = ", ".join(sorted({q.method for q in b.quantized.values()})) or "not quantized"
            raise UsageError(
                f"--requantize: {b.path} is {what}; only transformers' block-scaled FP8 "
                '(quant_method "fp8", weight_scale_inv) is written back quantized',
                hint="merge without --requantize: the weights are then written dequantized (bf16)",
            )
        if dtype != "auto":
            raise UsageError("--requantize writes the base's own dtypes: leave out --dtype")
        changed = sum(q.name in plan.changes for q in fp8s)
        return [
            f"FP8 base: the {changed} FP8 weights an adapter changes are requantized in the base's blocks "
            f"(new scales); the other {len(fp8s) - changed} are copied"
        ]
    if not fp8s:
        return []
    notes = [
        f"FP8 base ({fp8s[0].method}, {len(fp8s)} weights): written dequantized ({dtype if dtype != 'auto' else fp8s[0].merge_dtype}) "
        "with a config.json without quantization_config; --requantize keeps FP8"
    ]
    partial = [q for q in fp8s if q.block and any(d > bk and d % bk for d, bk in zip(q.shape[-2:], q.block))]
    if partial:
        notes.append(
            f"{len(partial)} FP8 weights have a partial last block (e.g. {partial[0].name!r} {list(partial[0].shape)} "
            f"in blocks {list(partial[0].block)}): loractl scales them by weight_block_size as DeepSeek and "
            "compressed-tensors do; transformers 5.x derives the block from the scale grid and dequantizes "
            "them differently (docs/formats.md)"
        )
    return notes


def four_bit_note(b: BaseModel, notes: list[str]) -> bool:
    """Whether ``b`` holds 4-bit weights (then no receipt: a note says why)."""
    if not any(q.method == "bitsandbytes-4bit" for q in b.quantized.values()):
        return False
    notes.append(
        f"the base is 4-bit ({len(b.quantized)} bitsandbytes weights): they are written dequantized; "
        "no receipt, since an unmerge can only give back the dequantized base, not the 4-bit file"
    )
    return True
