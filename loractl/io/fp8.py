"""Bases quantized to FP8 with block scales (DeepSeek-V3/R1, Qwen3-FP8 and others: transformers'
``quant_method: "fp8"``), read and written in pure torch.

The layout on disk (transformers ``integrations/finegrained_fp8.py`` ``FP8Linear``, DeepSeek-V3
``inference/fp8_cast_bf16.py``):

- ``config.json`` ``quantization_config``: ``{"quant_method": "fp8", "weight_block_size": [B0, B1],
  "activation_scheme": "dynamic", ...}``. ``weight_block_size`` absent means transformers' default
  ``[128, 128]``; ``null`` means one scale per tensor.
- each quantized weight ``<w>`` (``<m>.weight``; a fused expert tensor such as ``<m>.gate_up_proj``
  has leading dimensions) is ``F8_E4M3`` (or ``F8_E5M2``), and its scale ``<w>_scale_inv`` holds
  one number per block: shape ``[*leading, ceil(out / B0), ceil(in / B1)]``, the last row and
  column of blocks partial when a dimension is not a multiple of the block. The scale is float32 in
  DeepSeek's checkpoints, bfloat16 in Qwen3-32B-FP8's and float16 in Qwen3-4B-Instruct-2507-FP8's;
  all three are read the same way. A static activation scheme adds ``<m>.activation_scale``.

The arithmetic, element ``(i, j)``::

    W[i, j] = fp32(q[i, j]) · fp32(scale_inv[i // B0, j // B1])      (one float32 rounding)

cast once to the model's dtype. That is transformers' ``Fp8Dequantize._dequantize_one`` (what
``FineGrainedFP8Config(dequantize=True)`` runs) bit for bit wherever transformers takes the right
block, DeepSeek's ``weight_dequant``, and compressed-tensors' ``FP8BlockDequantizer`` bit for bit on
every shape. **Where loractl differs from transformers**: transformers 5.x derives the block from
the scale grid (``dim // grid``) instead of reading ``weight_block_size``; when a dimension is not
a multiple of its block (and larger than one block) it then scales with the wrong block (200 rows,
block 128, grid 2: blocks of 100) or refuses the file (DeepSeek-V3's ``kv_a_proj_with_mqa``,
[576, 7168], grid [5, 56]). loractl reads the block from ``weight_block_size``, with partial last
blocks, as the quantizer that wrote the file did.

The requantization rule is DeepSeek-V3's ``weight_quant``: per block ``s = amax / fmax`` in float32
(a correctly rounded division; 448 for E4M3) and ``q = fp8(w / s)`` (round to nearest even). From the
float32 dequantization of a checkpoint it made, it gives back the same codes and scales bit for
bit; transformers' own rule (``1 / (448 / amax)``) does not. An all-zero block gets scale 1, as in
transformers.

Compressed-tensors' FP8 layout (vLLM's llm-compressor, ``quant_method: "compressed-tensors"``,
``format: "float-quantized"``) is read too: ``<m>.weight`` F8_E4M3 and ``<m>.weight_scale`` in the
model's dtype, one per tensor, per output channel or per block. Its rule computes the product in
the scale's dtype: ``(q.to(scale.dtype) · scale).to(dtype)`` (compressed-tensors
``forward_helpers._dequantize``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from .safetensors import DTYPE_INFO, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .safetensors import TensorSource

FP8_METHOD = "fp8"
CT_METHOD = "compressed-tensors"
#: the scale of FP8 tensor ``<w>`` is ``<w>_scale_inv`` (transformers' ``serialized_names``)
SCALE_INV = "_scale_inv"
#: compressed-tensors: ``<m>.weight`` -> ``<m>.weight_scale``
CT_SCALE = "_scale"
#: the FP8 dtypes and their largest finite value (``torch.finfo(...).max``)
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
#: dtypes a block scale is stored in by real checkpoints (read as float32 in every case)
SCALE_DTYPES = ("F32", "BF16", "F16")
#: config.json's ``dtype`` / ``torch_dtype`` -> the safetensors dtype of a dequantized weight
MODEL_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
#: transformers' ``FineGrainedFP8Config`` default when ``weight_block_size`` is not in the config
DEFAULT_BLOCK = (128, 128)
#: names beside a weight that hold a scale in some FP8 layout (for telling a bad file from a plain one)
SCALE_NAMES = ("_scale_inv", "_scale")
#: float32 elements worked on at once (bounds the temporaries to a few tens of MB)
CHUNK_ELEMS = 1 << 22


@dataclass
class Fp8Weight:
    """One FP8 weight of a base model, with its scale.

    Attributes:
        name: the FP8 tensor's key (``<m>.weight``, or e.g. ``<m>.experts.gate_up_proj``).
        shape: its shape, ``[*leading, out, in]``.
        dtype: its safetensors dtype, ``"F8_E4M3"`` or ``"F8_E5M2"``.
        block: the block ``(B0, B1)`` one scale covers; None for one scale per tensor
            (``strategy`` ``"tensor"``) or per output row (``"channel"``).
        scale_key: the scale tensor's key.
        scale_dtype: the scale's safetensors dtype.
        scale_shape: the scale's shape as stored.
        out_dtype: the model's dtype (safetensors name): what transformers dequantizes to; see
            :func:`model_dtype`.
        aux: every key belonging to this weight other than itself (the scale, an
            ``activation_scale`` / ``input_scale``): what a dequantized copy leaves out.
        method: ``"fp8"`` (block-scaled, ``weight_scale_inv``) or ``"compressed-tensors"``.
        strategy: ``"block"``, ``"tensor"`` or ``"channel"``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    block: tuple[int, int] | None
    scale_key: str
    scale_dtype: str
    scale_shape: tuple[int, ...]
    out_dtype: str
    aux: list[str] = field(default_factory=list)
    method: str = FP8_METHOD
    strategy: str = "block"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def grid(self) -> tuple[int, ...]:
        """The scale shape the weight needs: ``[*leading, ceil(out / B0), ceil(in / B1)]``."""
        return expected_scale_shape(self.shape, self.block, self.strategy)

    # the interface of every quantized weight (loractl.io.quantized.QuantizedTensor)
    @property
    def merge_dtype(self) -> str:
        """The dtype a merge writes this weight in by default: the model's (:attr:`out_dtype`)."""
        return self.out_dtype

    @property
    def requantizable(self) -> bool:
        """Whether ``merge --requantize`` can write it back in its own layout (block-scaled ``fp8`` only)."""
        return self.method == FP8_METHOD

    def load(self, base: TensorSource, dtype: torch.dtype) -> torch.Tensor:
        """The weight as transformers loads it into a model of ``dtype``: :func:`dequantize`."""
        return dequantize(base, self, dtype)

    def float32(self, base: TensorSource) -> torch.Tensor:
        """The weight's values in float32 (:func:`dequantize` to float32)."""
        import torch

        return dequantize(base, self, torch.float32)


# --------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------
def quant_method(config: dict[str, Any]) -> str | None:
    """``config.json``'s ``quantization_config.quant_method``, if any."""
    qc = config.get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def model_dtype(config: dict[str, Any]) -> str:
    """The dtype (safetensors name) FP8 weights are dequantized to: config.json's ``dtype`` (or the
    older ``torch_dtype``) when it is bfloat16, float16 or float32, else ``"BF16"``.

    transformers loads with ``dtype="auto"`` and so takes the same key; with neither key it takes the
    first floating tensor of the file that is not FP8, which for these files can be a float32
    ``weight_scale_inv``. loractl takes bfloat16 there, as DeepSeek's ``fp8_cast_bf16.py`` writes and
    as transformers' own CPU fallback says ("default to dequantizing the model to bf16").
    """
    for key in ("dtype", "torch_dtype"):
        v = config.get(key)
        if isinstance(v, str) and v in MODEL_DTYPES:
            return MODEL_DTYPES[v]
    return "BF16"


def _config_file(base: TensorSource) -> str:
    return str(base.path / "config.json") if base.is_dir else str(base.path)


def _config_error(base: TensorSource, key: str, what: str) -> FormatError:
    return FormatError(
        f"{_config_file(base)}: key {key!r}: {what}",
        hint="fix config.json's quantization_config (see the model card) or use an unquantized base",
    )


def _block_of(base: TensorSource, qc: dict[str, Any]) -> tuple[int, int] | None:
    if "weight_block_size" not in qc:
        return DEFAULT_BLOCK
    b = qc["weight_block_size"]
    if b is None:
        return None
    if (
        isinstance(b, list)
        and len(b) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in b)
    ):
        return (b[0], b[1])
    raise _config_error(
        base, "quantization_config.weight_block_size", f"{b!r} is not two positive integers (or null)"
    )


def expected_scale_shape(
    shape: tuple[int, ...], block: tuple[int, int] | None, strategy: str = "block"
) -> tuple[int, ...]:
    """The scale shape of a weight of ``shape``: the ceil grid ``[*leading, ceil(out / B0), ceil(in /
    B1)]`` for blocks, ``[*leading, out, 1]`` per channel, ``[]`` per tensor (transformers' 0-d scale;
    ``[1]`` and ``[1, 1]`` are accepted as well)."""
    if strategy == "tensor":
        return ()
    *lead, rows, cols = shape
    if strategy == "channel":
        return (*lead, rows, 1)
    assert block is not None
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


# --------------------------------------------------------------------------------------------
# finding the FP8 weights (headers and config.json only)
# --------------------------------------------------------------------------------------------
def _where(base: TensorSource, name: str) -> str:
    return str(base.file_of(name).path) if name in base.tensors else str(base.path)


def _bad(base: TensorSource, name: str, what: str, hint: str | None = None) -> FormatError:
    return FormatError(
        f"{_where(base, name)}: tensor {name!r}: {what}",
        hint=hint
        or "the FP8 weights and their scales disagree; re-download the checkpoint or use an unquantized base",
    )


def _shape(s: tuple[int, ...]) -> str:
    return str(list(s))


def _scale_sibling(base: TensorSource, name: str) -> str | None:
    for suffix in SCALE_NAMES:
        if name + suffix in base.tensors:
            return name + suffix
    return None


def is_fp8(base: TensorSource) -> bool:
    """Whether ``base`` declares an FP8 quantization or holds an FP8 tensor with a scale beside it
    (headers and config only; :func:`find_fp8` validates)."""
    if quant_method(base.config) in (FP8_METHOD, CT_METHOD) and any(
        info.dtype in FP8_MAX for _, info in base.tensors.values()
    ):
        return True
    return any(
        info.dtype in FP8_MAX and _scale_sibling(base, name) for name, (_, info) in base.tensors.items()
    )


def find_fp8(base: TensorSource) -> dict[str, Fp8Weight]:
    """Every FP8 weight of ``base`` with its scale, by the weight's key.

    Reads config.json and the tensor headers only; the scales' values are checked when
    :func:`dequantize` reads them.

    ``quant_method: "fp8"``: every F8 tensor must have its ``<w>_scale_inv`` beside it, and every
    ``*_scale_inv`` an F8 tensor, as transformers pairs them when it loads the file (it dequantizes
    each pair whatever ``modules_to_not_convert`` says, so loractl does too). A base with no
    ``quantization_config`` and no scale beside its F8 tensors is not a quantized base (FP8 weights
    stored as a plain cast, as some diffusion checkpoints are): the result is empty.

    Returns:
        weight key -> :class:`Fp8Weight`, in the base's key order; empty for a base that is not FP8.

    Raises:
        FormatError: naming the file and tensor (or config.json and key):
            an F8 tensor with a scale beside it but no FP8 ``quantization_config``;
            an F8 tensor without its scale; a scale with no F8 tensor (or beside a weight that is
            not FP8); a scale whose dtype is not float32/bfloat16/float16, or whose shape is not
            exactly the grid ``weight_block_size`` gives (a block size that does not divide the
            weight as the config says); ``weight_block_size`` not two positive integers;
            ``quant_method: "fp8"`` with no F8 tensor at all.
    """
    qc = base.config.get("quantization_config")
    method = quant_method(base.config)
    if method == CT_METHOD:
        return _find_ct(base, qc)  # type: ignore[arg-type]
    if method != FP8_METHOD:
        for name, (_, info) in base.tensors.items():
            scale = _scale_sibling(base, name) if info.dtype in FP8_MAX else None
            if scale is not None:
                said = f"quant_method {method!r}" if method else "no quantization_config"
                raise _bad(
                    base,
                    name,
                    f"{info.dtype} weight with a scale {scale!r} beside it, but {_config_file(base)} has "
                    f'{said}, not quant_method "fp8": the block size is unknown',
                    hint="open the model's folder with its config.json (quantization_config: quant_method "
                    '"fp8", weight_block_size), not a lone weights file',
                )
        return {}
    assert isinstance(qc, dict)
    block = _block_of(base, qc)
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise _config_error(
            base, "quantization_config.modules_to_not_convert", f"{skip!r} is not a list of names"
        )
    out_dtype = model_dtype(base.config)
    found: dict[str, Fp8Weight] = {}
    for name, (_, info) in base.tensors.items():
        if name.endswith(SCALE_INV):
            owner = name[: -len(SCALE_INV)]
            if owner not in base.tensors:
                raise _bad(base, name, f"a scale for {owner!r}, which the base does not have")
            if base.info(owner).dtype not in FP8_MAX:
                o = base.info(owner)
                raise _bad(
                    base,
                    name,
                    f"a scale for {owner!r}, which is {o.dtype}, not FP8 (F8_E4M3/F8_E5M2)",
                )
            continue
        if info.dtype not in FP8_MAX:
            continue
        scale_key = name + SCALE_INV
        if scale_key not in base.tensors:
            other = _scale_sibling(base, name)
            listed = any(name.removesuffix(".weight") == m or name.startswith(m + ".") for m in skip or [])
            raise _bad(
                base,
                name,
                f"{info.dtype} weight without its scale {scale_key!r}"
                + (f" (found {other!r}, another layout's name)" if other else "")
                + (" (it is listed in modules_to_not_convert, yet stored as FP8)" if listed else ""),
            )
        found[name] = _check_pair(base, name, scale_key, block, "block" if block else "tensor", out_dtype)
        # a static activation scheme's scale: <m>.activation_scale, or <m>.gate_up_proj_activation_scale
        # beside fused experts (transformers' FP8Experts)
        act = (
            name[: -len(".weight")] + ".activation_scale"
            if name.endswith(".weight")
            else name + "_activation_scale"
        )
        if act in base.tensors:
            found[name].aux.append(act)
    if not found:
        raise _config_error(
            base,
            "quantization_config.quant_method",
            f'says "fp8" but no tensor of {base.path} is FP8 (F8_E4M3/F8_E5M2)',
        )
    return found


def _check_pair(
    base: TensorSource,
    name: str,
    scale_key: str,
    block: tuple[int, int] | None,
    strategy: str,
    out_dtype: str,
    scale_dtypes: tuple[str, ...] = SCALE_DTYPES,
    method: str = FP8_METHOD,
) -> Fp8Weight:
    """Dtype and shape of an FP8 weight and of its scale, from the headers."""
    info, sinfo = base.info(name), base.info(scale_key)
    if len(info.shape) < 2 and strategy != "tensor":
        raise _bad(
            base, name, f"{info.dtype} {_shape(info.shape)}: a block-scaled weight has two dimensions or more"
        )
    if sinfo.dtype not in scale_dtypes:
        raise _bad(
            base,
            scale_key,
            f"the scale of {name!r} is {sinfo.dtype}; expected {' or '.join(scale_dtypes)}",
        )
    need = expected_scale_shape(info.shape, block, strategy)
    ok = sinfo.shape == need or (strategy == "tensor" and sinfo.numel == 1 and len(sinfo.shape) <= 2)
    if not ok:
        if strategy == "block":
            assert block is not None
            how = (
                f"weight {_shape(info.shape)} with weight_block_size {list(block)} needs the grid "
                f"{_shape(need)} (ceil of each dimension over its block)"
            )
        elif strategy == "channel":
            how = f"weight {_shape(info.shape)} has one scale per output row: {_shape(need)}"
        else:
            how = "one scale for the whole tensor (weight_block_size is null)"
        raise _bad(base, scale_key, f"scale is {_shape(sinfo.shape)}, but {how}")
    return Fp8Weight(
        name=name,
        shape=tuple(info.shape),
        dtype=info.dtype,
        block=block if strategy == "block" else None,
        scale_key=scale_key,
        scale_dtype=sinfo.dtype,
        scale_shape=tuple(sinfo.shape),
        out_dtype=out_dtype,
        aux=[scale_key],
        method=method,
        strategy=strategy,
    )


# --------------------------------------------------------------------------------------------
# compressed-tensors' FP8 ("float-quantized")
# --------------------------------------------------------------------------------------------
def _ct_schemes(base: TensorSource, qc: dict[str, Any]) -> list[tuple[str, tuple[int, int] | None]]:
    """The (strategy, block) of every config group that quantizes weights to 8-bit floats."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict):
        raise _config_error(base, "quantization_config.config_groups", "missing or not an object")
    schemes: list[tuple[str, tuple[int, int] | None]] = []
    for gname, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict) or w.get("type") != "float" or w.get("num_bits") != 8:
            continue
        key = f"quantization_config.config_groups.{gname}.weights"
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise _config_error(
                base, key + ".strategy", f"{strategy!r}: loractl reads tensor, channel and block"
            )
        if w.get("symmetric") is False:
            raise _config_error(base, key + ".symmetric", "asymmetric FP8 (a zero point) is not supported")
        block = None
        if strategy == "block":
            b = w.get("block_structure")
            if not (
                isinstance(b, list)
                and len(b) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in b)
            ):
                raise _config_error(base, key + ".block_structure", f"{b!r} is not two positive integers")
            block = (b[0], b[1])
        schemes.append((strategy, block))
    return schemes


def _find_ct(base: TensorSource, qc: dict[str, Any]) -> dict[str, Fp8Weight]:
    fmt = qc.get("format")
    f8 = [n for n, (_, info) in base.tensors.items() if info.dtype in FP8_MAX]
    if fmt not in ("float-quantized", "naive-quantized") or not f8:
        if f8:
            raise _config_error(
                base, "quantization_config.format", f'{fmt!r}: loractl reads FP8 as "float-quantized"'
            )
        return {}  # another compressed-tensors format (int4, sparse...): not FP8, not for this module
    schemes = _ct_schemes(base, qc)
    if not schemes:
        raise _config_error(
            base, "quantization_config.config_groups", "no group quantizes weights to 8-bit floats"
        )
    out_dtype = model_dtype(base.config)
    found: dict[str, Fp8Weight] = {}
    for name in f8:
        scale_key = name + CT_SCALE
        if scale_key not in base.tensors:
            raise _bad(base, name, f"{base.info(name).dtype} weight without its scale {scale_key!r}")
        sinfo = base.info(scale_key)
        cands = [
            (st, b)
            for st, b in schemes
            if sinfo.shape == expected_scale_shape(base.info(name).shape, b, st)
            or (st == "tensor" and sinfo.numel == 1 and len(sinfo.shape) <= 1)
        ]
        strategy, block = cands[0] if cands else schemes[0]
        w = _check_pair(base, name, scale_key, block, strategy, out_dtype, SCALE_DTYPES, CT_METHOD)
        inp = name.removesuffix(".weight") + ".input_scale" if name.endswith(".weight") else None
        if inp is not None and inp in base.tensors:
            w.aux.append(inp)
        found[name] = w
    for name in base.tensors:
        if name.endswith(".weight" + CT_SCALE):
            owner = name[: -len(CT_SCALE)]
            if owner not in found:
                raise _bad(base, name, f"a scale for {owner!r}, which is not an FP8 tensor of the base")
    return found


# --------------------------------------------------------------------------------------------
# dequantizing
# --------------------------------------------------------------------------------------------
def _read_scale(base: TensorSource, w: Fp8Weight, raw: torch.Tensor | None = None) -> torch.Tensor:
    """The scale as float32 with the weight's grid shape (a per-tensor scale as ``[1, 1]``); refuses
    NaN, infinite and negative scales.

    Every quantizer writes ``amax / fmax`` (or 1 for an all-zero block): never negative, never NaN.
    A NaN or infinite scale makes NaN/Inf weights, and a negative one is a sign that the bytes are not
    what the header says; transformers would load either silently. A zero scale (an all-zero block
    from a quantizer without transformers' guard) is accepted: it dequantizes to zeros.
    """
    import torch

    if raw is None:
        raw = base.read(w.scale_key)
    elif tuple(raw.shape) != w.scale_shape:
        raise ValueError(f"scale for {w.name!r} is {tuple(raw.shape)}, not {w.scale_shape}")
    s = raw.to(torch.float32)
    bad = ~torch.isfinite(s) | (s < 0)
    if bool(bad.any()):
        n = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0]) if s.ndim else ()
        raise _bad(
            base,
            w.scale_key,
            f"{n} of its {s.numel()} scales are NaN, infinite or negative (first at {list(first)}: "
            f"{s[first].item() if s.ndim else s.item()})",
        )
    if w.strategy == "tensor":
        return s.reshape(1, 1)
    return s.reshape(-1, *w.grid[-2:]) if len(w.shape) > 2 else s


def _apply_scales(
    x: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None, r0: int, *, divide: bool = False
) -> torch.Tensor:
    """Multiply (or divide) rows ``r0 .. r0 + len(x)`` of one ``[out, in]`` matrix (float32, ``x``
    [n, in], in place) by their scales. ``s`` (float32) is that matrix's scale grid ``[gr, gc]`` for
    blocks, ``[out, 1]`` per channel (``block`` None), or ``[1, 1]`` for one scale."""
    n, cols = x.shape
    op = "div_" if divide else "mul_"
    if block is None:
        if s.numel() == 1:
            return getattr(x, op)(s.reshape(()))
        return getattr(x, op)(s[r0 : r0 + n])
    b0, b1 = block
    rows_s = s[r0 // b0 : -(-(r0 + n) // b0)].repeat_interleave(b0, 0)[:n]  # [n, grid cols]
    full = cols // b1
    if full:
        getattr(x[:, : full * b1].view(n, full, b1), op)(rows_s[:, :full, None])
    if cols > full * b1:
        getattr(x[:, full * b1 :], op)(rows_s[:, full : full + 1])
    return x


def _matrices(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` as (matrices, rows, columns): ``[*leading, out, in]``; a 0-d or 1-D tensor is one row."""
    rows, cols = shape[-2:] if len(shape) >= 2 else (1, math.prod(shape))
    return (math.prod(shape) // (rows * cols) if rows * cols else 0), rows, cols


def _row_step(cols: int, block: tuple[int, int] | None) -> int:
    """Rows worked on at once: whole rows of blocks, about :data:`CHUNK_ELEMS` elements."""
    b0 = block[0] if block else 1
    return max(1, CHUNK_ELEMS // max(1, cols * b0)) * b0


def dequantize(
    base: TensorSource,
    w: Fp8Weight,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    *,
    codes: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight ``w`` dequantized to ``dtype`` (default: ``w.out_dtype``, the model's dtype).

    Block-scaled (``quant_method: "fp8"``)::

        W[..., i, j] = fp32(q[..., i, j]) · fp32(scale_inv[..., i // B0, j // B1])   cast once to dtype

    equal bit for bit to transformers' ``FineGrainedFP8Config(dequantize=True)`` where transformers
    takes the right block, and to compressed-tensors' ``FP8BlockDequantizer`` everywhere (see the
    module docstring for where transformers differs). compressed-tensors' layout::

        W = (q.to(scale.dtype) · scale).to(dtype)      (the product rounded in the scale's dtype)

    Works through the weight a few whole rows of blocks at a time, reading those rows' FP8 bytes
    from the file: besides the result it holds one chunk (:data:`CHUNK_ELEMS` float32 values).

    Args:
        base: the open base model.
        w: a weight from :func:`find_fp8`.
        dtype: the result's dtype.
        out: a contiguous tensor of ``w.shape`` and ``dtype`` to write into (else a new one).
        codes: the FP8 codes (``w.shape``, ``w.dtype``) to dequantize instead of the base's (e.g.
            a requantized merge's, or a receipt's).
        scale: the scale tensor (``w.scale_shape``) to use instead of the base's.

    Raises:
        FormatError: a scale that is NaN, infinite or negative; an FP8 code that is NaN; a product
            that overflows ``dtype`` (float16).
    """
    import torch

    dtype = torch_dtype(w.out_dtype) if dtype is None else dtype
    if out is None:
        out = torch.empty(w.shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != w.shape or not out.is_contiguous():
        raise ValueError(f"buffer for {w.name!r} is {out.dtype} {tuple(out.shape)}")
    s_all = _read_scale(base, w, scale)
    ct = w.method == CT_METHOD
    if ct:  # compressed-tensors: the product is rounded to the scale's dtype
        s_all = s_all.to(torch_dtype(w.scale_dtype)).to(torch.float32)
    mats, rows, cols = _matrices(w.shape)
    fp8 = torch_dtype(w.dtype)
    if codes is not None and (codes.dtype != fp8 or tuple(codes.shape) != w.shape):
        raise ValueError(f"codes for {w.name!r} are {codes.dtype} {tuple(codes.shape)}")
    flat_codes = codes.contiguous().view(-1).view(torch.uint8) if codes is not None else None
    step = min(_row_step(cols, w.block), rows)
    buf = torch.empty(0 if codes is not None else step * cols, dtype=torch.uint8)
    tmp = torch.empty(step * cols, dtype=torch.float32)
    flat_out = out.view(mats, rows, cols)
    for m in range(mats):
        s = s_all[m] if s_all.ndim == 3 else s_all
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            at = (m * rows + r0) * cols
            if flat_codes is not None:
                b = flat_codes[at : at + n * cols]
            else:
                b = buf[: n * cols]
                base.file_of(w.name).read_range_into(base.info(w.name).begin + at, memoryview(b.numpy()), w.name)
            x = tmp[: n * cols].view(n, cols)
            x.copy_(b.view(fp8).view(n, cols))
            _apply_scales(x, s, w.block, r0)
            dst = flat_out[m, r0 : r0 + n]
            dst.copy_(x.to(torch_dtype(w.scale_dtype)) if ct else x)
            if not _all_finite(dst):
                _not_finite(base, w, b.view(fp8).view(n, cols), dst, m, r0, dtype)
    return out


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in ``x`` (non-empty): its min and max are finite (they propagate NaN), a
    reduction that is many times faster than ``isfinite(x).all()`` on bfloat16."""
    import torch

    lo, hi = torch.aminmax(x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _not_finite(
    base: TensorSource, w: Fp8Weight, q: torch.Tensor, x: torch.Tensor, m: int, r0: int, dtype: torch.dtype
) -> None:
    import torch

    nan_codes = int(torch.isnan(q.to(torch.float32)).sum())
    at = [int(i) for i in torch.nonzero(~torch.isfinite(x))[0]]
    at[0] += r0
    pos = ([m] if len(w.shape) > 2 else []) + at
    if nan_codes:
        raise _bad(base, w.name, f"holds NaN FP8 codes ({nan_codes} in rows {r0}.., first at {pos})")
    raise _bad(
        base,
        w.name,
        f"dequantized to {dtype} it overflows at {pos} (FP8 value × scale is beyond {dtype}'s range)",
        hint="dequantize to bfloat16 or float32 instead (--dtype)",
    )


# --------------------------------------------------------------------------------------------
# quantizing: the requantization rule, and the receipt's quantization with given scales
# --------------------------------------------------------------------------------------------
def _fmax(fp8_dtype: torch.dtype) -> float:
    import torch

    return float(torch.finfo(fp8_dtype).max)


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest ``|x|`` of each block of ``x`` [n, in] (a partial last block: of what it holds)."""
    import torch

    n, cols = x.shape
    b0, b1 = block
    gr, gc = -(-n // b0), -(-cols // b1)
    a = x.abs()
    if n % b0 or cols % b1:  # zero-padded to whole blocks: |x| >= 0, so the padding changes no maximum
        padded = torch.zeros(gr * b0, gc * b1, dtype=a.dtype)
        padded[:n, :cols] = a
        a = padded
    return a.view(gr, b0, gc, b1).amax(dim=(1, 3))


def _divide(
    w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None, r0: int, fp8_dtype: torch.dtype
) -> torch.Tensor:
    """``fp8(clamp(w / s, ±fmax))`` for rows ``r0 ..`` of one matrix (``s`` float32, as
    :func:`_apply_scales`); where a scale is 0 the code is +0 (every code dequantizes to 0 there)."""
    import torch

    zero = s == 0
    if bool(zero.any()):  # w / inf = ±0, then + 0.0 makes it +0
        s = s.masked_fill(zero, math.inf)
    x = _apply_scales(w.to(torch.float32, copy=True), s, block, r0, divide=True)
    if bool(zero.any()):
        x.add_(0.0)
    fmax = _fmax(fp8_dtype)
    return x.clamp_(-fmax, fmax).to(fp8_dtype)


def requantize(
    w32: torch.Tensor,
    block: tuple[int, int] | None,
    fp8_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float32 weight to FP8 blocks with DeepSeek-V3's ``weight_quant`` rule.

    Per block ``s = amax / fmax`` in float32 (1 for an all-zero block), stored in ``scale_dtype``;
    ``q = fp8(clamp(w / s, ±fmax))`` (round to nearest even). With float32 scales this round-trips:
    ``requantize(dequantize(q, s) in float32) == (q, s)`` bit for bit for a checkpoint made by this
    rule (fp8.md §2.4), so weights a merge leaves alone come back with their own bytes. Start from the
    float32 merge: a bfloat16 intermediate changes nearly every scale. With bfloat16/float16 scales
    (Qwen3-FP8), ``s`` is rounded to that dtype first and ``q`` divides by the rounded scale.

    Works a few rows of blocks at a time: besides ``w32`` and the result it holds one chunk.

    Args:
        w32: the weight, float32, ``[*leading, out, in]``.
        block: ``(B0, B1)``, or None for one scale for the whole tensor.
        fp8_dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
        scale_dtype: the scales' dtype (default float32).

    Returns:
        ``(q, s)``: ``q`` of ``w32``'s shape in ``fp8_dtype``; ``s`` of shape ``[*leading,
        ceil(out / B0), ceil(in / B1)]`` (a 0-d tensor for ``block=None``) in ``scale_dtype``.

    Raises:
        ValueError: ``w32`` is not float32, holds NaN/Inf, or a block's scale is not representable in
            ``scale_dtype`` (0 or infinite); the caller names the tensor.
    """
    import torch

    fp8_dtype = torch.float8_e4m3fn if fp8_dtype is None else fp8_dtype
    scale_dtype = torch.float32 if scale_dtype is None else scale_dtype
    if w32.dtype != torch.float32:
        raise ValueError(f"requantize needs the float32 weight, got {w32.dtype}")
    fmax = _fmax(fp8_dtype)
    mats, rows, cols = _matrices(tuple(w32.shape))
    w3 = w32.reshape(mats, rows, cols)
    q = torch.empty(w3.shape, dtype=fp8_dtype)

    def scale_of(amax: torch.Tensor) -> torch.Tensor:
        s = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).to(scale_dtype)
        s32 = s.to(torch.float32)
        if not bool((torch.isfinite(s32) & (s32 > 0)).all()):
            raise ValueError(f"a block's scale (amax / {fmax:g}) is not representable in {scale_dtype}")
        return s

    def finite(x: torch.Tensor) -> None:
        if x.numel() and not _all_finite(x):
            bad = int((~torch.isfinite(w32)).sum())
            raise ValueError(f"{bad} values are NaN or infinite: they have no FP8 code")

    if block is None:
        finite(w32)
        s = scale_of(w32.abs().amax() if w32.numel() else torch.zeros(()))
        for m in range(mats):
            q[m] = _divide(w3[m], s.to(torch.float32).reshape(1, 1), None, 0, fp8_dtype)
        return q.reshape(w32.shape), s.reshape(())
    gr, gc = -(-rows // block[0]), -(-cols // block[1])
    scales = torch.empty(mats, gr, gc, dtype=scale_dtype)
    step = _row_step(cols, block)
    for m in range(mats):
        for r0 in range(0, rows, step):
            x = w3[m, r0 : r0 + step]
            finite(x)
            s = scale_of(_block_amax(x, block))
            g0 = r0 // block[0]
            scales[m, g0 : g0 + s.shape[0]] = s
            q[m, r0 : r0 + step] = _divide(x, s.to(torch.float32), block, 0, fp8_dtype)
    return q.reshape(w32.shape), scales.reshape(*w32.shape[:-2], gr, gc)


def quantize_with_scales(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] | None,
    fp8_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The FP8 codes of ``w`` under given scales: ``fp8(clamp(w / s, ±fmax))`` per block (round to
    nearest even; +0 where a scale is 0). An unmerge uses it with the base's own scales (kept in the
    receipt) to get back the base's codes from the reconstructed weight; :func:`encode_codes` keeps
    the few codes it misses.

    Args:
        w: the weight, any float dtype (computed in float32), ``[*leading, out, in]``.
        scale_inv: the scales, ``[*leading, ceil(out / B0), ceil(in / B1)]`` (for ``block=None``:
            one value, or one per output row ``[*leading, out, 1]``), any float dtype (read as float32).
        block: ``(B0, B1)`` or None.
        fp8_dtype: default ``torch.float8_e4m3fn``.
    """
    import torch

    fp8_dtype = torch.float8_e4m3fn if fp8_dtype is None else fp8_dtype
    s32 = scale_inv.to(torch.float32)
    mats, rows, cols = _matrices(tuple(w.shape))
    channel = block is None and tuple(s32.shape) == expected_scale_shape(tuple(w.shape), None, "channel")
    if block is not None:
        need = expected_scale_shape(tuple(w.shape), block)
        if tuple(s32.shape) != need:
            raise ValueError(f"scales {list(s32.shape)} do not fit {list(w.shape)} in blocks {list(block)}")
        s3 = s32.reshape(mats, *need[-2:])
    elif channel and s32.numel() != 1:  # compressed-tensors' one scale per output row: [*leading, out, 1]
        s3 = s32.reshape(mats, rows, 1)
    elif s32.numel() != 1:
        raise ValueError(f"one scale (or one per row) expected for block=None, got {list(s32.shape)}")
    else:
        s3 = s32.reshape(1, 1, 1).expand(mats, 1, 1)
    w3 = w.reshape(mats, rows, cols)
    q = torch.empty(w3.shape, dtype=fp8_dtype)
    step = _row_step(cols, block)
    for m in range(mats):
        for r0 in range(0, rows, step):
            q[m, r0 : r0 + step] = _divide(w3[m, r0 : r0 + step], s3[m], block, r0, fp8_dtype)
    return q.reshape(w.shape)


def encode_codes(
    original: torch.Tensor,
    reconstructed: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] | None,
) -> dict[str, torch.Tensor]:
    """The receipt's corrections for an FP8 weight: :func:`quantize_with_scales` of the weight an
    unmerge reconstructs, under the base's scales, compared with the base's codes ``original``
    (loractl.ops.residual.encode on the 1-byte codes: {} when they all agree)."""
    from ..ops import residual

    return residual.encode(original, quantize_with_scales(reconstructed, scale_inv, block, original.dtype))


def decode_codes(
    reconstructed: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] | None,
    parts: dict[str, torch.Tensor],
    fp8_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The base's FP8 codes back: :func:`quantize_with_scales`, then :func:`encode_codes`' corrections."""
    from ..ops import residual

    return residual.decode(quantize_with_scales(reconstructed, scale_inv, block, fp8_dtype), parts)


def requantize_weight(w: Fp8Weight, w32: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w32`` requantized in ``w``'s own layout: ``{w.name: q, w.scale_key: s}`` with the base's block,
    FP8 dtype, scale dtype and scale shape (block-scaled layout only)."""
    if w.method != FP8_METHOD:
        raise ValueError(f"{w.name}: requantizing the {w.method} layout is not supported")
    q, s = requantize(w32.reshape(w.shape), w.block, torch_dtype(w.dtype), torch_dtype(w.scale_dtype))
    return {w.name: q, w.scale_key: s.reshape(w.scale_shape)}


# --------------------------------------------------------------------------------------------
# sizes and configs of the copies
# --------------------------------------------------------------------------------------------
def aux_keys(found: dict[str, Fp8Weight]) -> set[str]:
    """Every scale (and activation/input scale) of ``found``: what a dequantized copy leaves out."""
    return {k for w in found.values() for k in w.aux}


def dequantized_nbytes(base: TensorSource, dtype_bytes: int | None, found: dict[str, Fp8Weight]) -> int:
    """Tensor bytes of a copy of ``base`` whose FP8 weights are written dequantized.

    Each FP8 weight counts ``numel × dtype_bytes`` (None: its :attr:`Fp8Weight.out_dtype`'s size),
    its scales count nothing, every other tensor its stored bytes.
    """
    skip = aux_keys(found)
    total = 0
    for name, (_, info) in base.tensors.items():
        if name in found:
            w = found[name]
            total += w.numel * (DTYPE_INFO[w.out_dtype][0] if dtype_bytes is None else dtype_bytes)
        elif name not in skip:
            total += info.nbytes
    return total


def dequantized_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``config.json`` for a dequantized copy: no ``quantization_config`` (transformers would take the
    dense weights for FP8 ones), and ``dtype`` (and ``torch_dtype``, where the config has that older
    key; likewise in sub-configs such as ``text_config`` that carry one) set to the written dtype,
    as transformers' own ``save_pretrained`` of a dequantized model writes.

    Args:
        config: the base's config.json.
        dtype: the dequantized weights' safetensors dtype (``"BF16"``, ``"F16"``, ``"F32"``).
    """
    name = {v: k for k, v in MODEL_DTYPES.items()}[dtype]
    out = {k: copy.deepcopy(v) for k, v in config.items() if k != "quantization_config"}
    out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    for v in out.values():
        if isinstance(v, dict):
            for k in ("dtype", "torch_dtype"):
                if k in v:
                    v[k] = name
    return out


def requantized_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for a requantized copy: the base's, ``quantization_config`` kept as it is
    (same method, block, activation scheme): the written weights are in the base's layout."""
    return copy.deepcopy(config)
