"""Bases quantized to 4 bits by bitsandbytes (QLoRA's NF4, or FP4) as saved by transformers.

Dequantized in pure torch: bitsandbytes is not needed at run time.

The layout on disk (transformers ``save_pretrained`` keeps ``Linear4bit._save_to_state_dict`` of
``bitsandbytes/nn/modules.py``: the packed weight, then ``QuantState.as_dict(packed=True)`` under
``<m>.weight.``; transformers' ``quantizers/quantizer_bnb_4bit.py`` lists the same names as
``serialized_names`` when it loads them back):

- ``<m>.weight``: the 4-bit codes, two a byte, **high nibble first** (element 2i is ``byte >> 4``,
  element 2i+1 is ``byte & 0xF``: bitsandbytes' pure-torch ``quantize_4bit`` packs
  ``(q[::2] << 4) | q[1::2]``, and its CUDA ``kDequantizeBlockwise`` and CPU
  ``dequantizeBlockwise4bitCpu`` kernels read ``qvals >> 4`` first). ``ceil(n / 2)`` bytes, shaped
  ``[ceil(n / 2), 1]`` in ``uint8``; with ``bnb_4bit_quant_storage`` set to another dtype the same
  bytes are stored as that dtype (e.g. ``bfloat16 [ceil(n / 4), 1]``).
- ``<m>.weight.absmax``: one scale per block of ``blocksize`` consecutive elements of the flattened
  weight (float32), or, with double quantization, its 8-bit codes (uint8).
- ``<m>.weight.quant_map``: the 16 values of the 4-bit type (float32).
- ``<m>.weight.nested_absmax``, ``.nested_quant_map`` (256 values): the second quantization of
  ``absmax`` (double quantization only).
- ``<m>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object
  (bitsandbytes ``utils.pack_dict_to_tensor``) with ``quant_type``, ``blocksize``, ``dtype`` (of the
  weight when it was quantized, which ``dequantize_4bit`` returns), ``shape`` and, with double
  quantization, ``nested_blocksize``, ``nested_dtype`` and ``nested_offset``.

The arithmetic (bitsandbytes ``functional.dequantize_4bit`` and ``dequantize_blockwise``), all in
float32, element ``i`` of the flattened weight, ``b = i // blocksize``::

    absmax[b] = nested_quant_map[absmax_code[b]] · nested_absmax[b // nested_blocksize] + nested_offset
    W[i]      = table[code[i]] · absmax[b]

Each line is one float32 multiply (and one add), so the result equals bitsandbytes' bit for bit.
``dequantize_4bit`` does not use the stored ``quant_map``: its kernels carry the NF4/FP4 tables
themselves. We check that the stored map equals the table (within the 1e-6 that
``QuantState.__eq__`` allows) and use the table, so a file is read as bitsandbytes reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FormatError
from .files import loads_json
from .safetensors import DTYPE_INFO, FLOAT_DTYPES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .safetensors import TensorSource

#: the ``method`` of a 4-bit weight (``inspect``'s ``quantized.method``)
METHOD = "bitsandbytes-4bit"
QUANT_STATE = ".quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
#: auxiliary tensors of a 4-bit weight, by suffix after ``<m>.weight.``
AUX_NAMES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

#: bitsandbytes ``functional.get_4bit_type("nf4")``: quantiles of N(0, 1) (QLoRA, Dettmers et al.
#: 2023, https://arxiv.org/abs/2305.14314), the same numbers as its kernels' ``nf4_dequantization_lut``.
NF4_TABLE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
#: bitsandbytes ``get_4bit_type("fp4")``: 1 sign, 2 exponent, 1 mantissa bit, in code order, divided
#: by 12 (its largest value) in float32. Code 8 is +0.0 here and in the stored ``quant_map`` (the
#: CUDA and scalar CPU kernels give -0.0: equal as numbers, they differ only in the sign bit).
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
#: a quant state is a JSON object of a few hundred bytes
MAX_STATE_BYTES = 1 << 20
#: the float dtypes bitsandbytes quantizes from (``quantize_4bit``) and dequantizes to
COMPUTE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass
class QuantizedWeight:
    """One bitsandbytes 4-bit weight of a base model.

    Attributes:
        name: the packed weight's key, ``<m>.weight``.
        quant_type: ``"nf4"`` or ``"fp4"``.
        shape: the real weight's shape, e.g. ``(out_features, in_features)``.
        dtype: the weight's dtype when it was quantized (``"bfloat16"``, ``"float16"`` or
            ``"float32"``): what bitsandbytes dequantizes it to.
        blocksize: elements per ``absmax`` scale.
        double_quant: ``absmax`` is itself quantized (``bnb_4bit_use_double_quant``).
        aux: every other key belonging to this weight (absmax, quant_map, nested_*, quant_state).
        nested_blocksize: ``absmax`` values per ``nested_absmax`` scale (double quantization).
        nested_offset: added to the dequantized ``absmax`` (double quantization).
        nested_dtype: dtype of the dequantized ``absmax`` before the offset (double quantization).
    """

    name: str
    quant_type: str
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    double_quant: bool
    aux: list[str] = field(default_factory=list)
    nested_blocksize: int | None = None
    nested_offset: float | None = None
    nested_dtype: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        """Number of ``absmax`` scales: ``ceil(numel / blocksize)``."""
        return -(-self.numel // self.blocksize)

    @property
    def st_dtype(self) -> str:
        """The safetensors dtype name of :attr:`dtype` (``"BF16"``...): the natural output dtype."""
        return COMPUTE_DTYPES[self.dtype]

    @property
    def state_key(self) -> str:
        return f"{self.name}{QUANT_STATE}{self.quant_type}"

    def key(self, aux: str) -> str:
        """The key of auxiliary tensor ``aux`` (one of :data:`AUX_NAMES`)."""
        return f"{self.name}.{aux}"

    # the interface of every quantized weight (loractl.io.quantized.QuantizedTensor)
    method: ClassVar[str] = METHOD
    #: a merge writes 4-bit weights in bfloat16 unless ``--dtype`` says otherwise
    merge_dtype: ClassVar[str] = "BF16"
    #: ``merge --requantize`` cannot write 4-bit weights, and a receipt cannot give back their bytes
    requantizable: ClassVar[bool] = False

    def load(self, base: TensorSource, dtype: torch.dtype) -> torch.Tensor:
        """The weight as bitsandbytes' ``dequantize_4bit`` gives it (in :attr:`dtype`, whatever
        ``dtype`` the merge writes: the merge computes from there)."""
        from .safetensors import torch_dtype

        return dequantize(base, self).to(torch_dtype(self.st_dtype))

    def float32(self, base: TensorSource) -> torch.Tensor:
        """The weight's values in float32 (:func:`dequantize`)."""
        return dequantize(base, self)


# --------------------------------------------------------------------------------------------
# finding the quantized weights (headers and the small JSON tensors only)
# --------------------------------------------------------------------------------------------
def is_quantized(base: TensorSource) -> bool:
    """Whether ``base`` holds bitsandbytes 4-bit weights (looks at tensor names only)."""
    return any(QUANT_STATE in name for name in base.tensors)


def _where(base: TensorSource, name: str) -> str:
    return str(base.file_of(name).path) if name in base.tensors else str(base.path)


def _bad(base: TensorSource, name: str, what: str) -> FormatError:
    return FormatError(
        f"{_where(base, name)}: tensor {name!r}: {what}",
        hint="the bitsandbytes 4-bit state is inconsistent; re-save the model with transformers "
        "(save_pretrained) or use an unquantized base",
    )


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _read_state(base: TensorSource, key: str) -> dict[str, Any]:
    """The JSON object packed in a ``quant_state.bitsandbytes__*`` uint8 tensor."""
    info = base.info(key)
    if info.dtype != "U8" or len(info.shape) != 1 or info.numel > MAX_STATE_BYTES:
        raise _bad(
            base,
            key,
            f"expected a 1-D uint8 tensor of JSON bytes (at most {MAX_STATE_BYTES}), found {info.dtype} {list(info.shape)}",
        )
    raw = base.read(key).numpy().tobytes()
    try:
        state = loads_json(raw, "quant state")
    except FormatError as e:
        raise _bad(
            base, key, f"does not hold a JSON quant state ({e.message.removeprefix('quant state: ')})"
        ) from None
    if not isinstance(state, dict):
        raise _bad(base, key, "the quant state is not a JSON object")
    return state


def _parse(base: TensorSource, key: str) -> QuantizedWeight:
    name, _, qt = key.partition(QUANT_STATE)
    if qt not in QUANT_TYPES:
        raise _bad(base, key, f"unknown bitsandbytes quant type {qt!r} (expected nf4 or fp4)")
    state = _read_state(base, key)
    if state.get("quant_type") != qt:
        raise _bad(base, key, f"quant_type is {state.get('quant_type')!r} but the key says {qt!r}")
    blocksize = state.get("blocksize")
    if not _pos_int(blocksize):
        raise _bad(base, key, f"blocksize {blocksize!r} is not a positive integer")
    dtype = state.get("dtype")
    if dtype not in COMPUTE_DTYPES:
        raise _bad(base, key, f"dtype {dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    shape = state.get("shape")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(base, key, f"shape {shape!r} is not a list of sizes")
    nested_keys = {"nested_blocksize", "nested_offset"} & state.keys()
    has_nested = f"{name}.nested_absmax" in base.tensors or f"{name}.nested_quant_map" in base.tensors
    double = bool(nested_keys) or has_nested
    q = QuantizedWeight(
        name=name,
        quant_type=qt,
        shape=tuple(shape),
        dtype=dtype,
        blocksize=blocksize,
        double_quant=double,
    )
    if double:
        nbs, off = state.get("nested_blocksize"), state.get("nested_offset")
        ndt = state.get("nested_dtype", "float32")
        if not _pos_int(nbs):
            raise _bad(base, key, f"nested_blocksize {nbs!r} is not a positive integer")
        if not isinstance(off, (int, float)) or isinstance(off, bool) or not math.isfinite(off):
            raise _bad(base, key, f"nested_offset {off!r} is not a finite number")
        if ndt not in COMPUTE_DTYPES:
            raise _bad(base, key, f"nested_dtype {ndt!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        q.nested_blocksize, q.nested_offset, q.nested_dtype = nbs, float(off), ndt
    _check_headers(base, q)
    q.aux = [q.key(a) for a in AUX_NAMES if q.key(a) in base.tensors] + [key]
    return q


def _check_headers(base: TensorSource, q: QuantizedWeight) -> None:
    """Sizes and dtypes of the packed weight and its statistics, from the headers alone."""
    state = q.state_key
    if q.name not in base.tensors:
        raise _bad(base, state, f"quant state of {q.name!r}, but the base has no tensor {q.name!r}")
    packed = base.info(q.name)
    need = -(-q.numel // 2)
    if packed.nbytes != need:
        raise _bad(
            base,
            q.name,
            f"{packed.nbytes} bytes of 4-bit codes ({packed.dtype} {list(packed.shape)}) but shape "
            f"{list(q.shape)} needs {need}",
        )

    def expect(aux: str, numel: int, dtypes: frozenset[str] | set[str], what: str) -> None:
        k = q.key(aux)
        if k not in base.tensors:
            raise _bad(base, state, f"{q.name!r} is missing its {aux} tensor {k!r}")
        info = base.info(k)
        if info.dtype not in dtypes or info.numel != numel:
            raise _bad(base, k, f"expected {numel} {what} values, found {info.dtype} {list(info.shape)}")

    floats = set(FLOAT_DTYPES)
    expect("quant_map", 16, floats, "float")
    if q.double_quant:
        assert q.nested_blocksize is not None
        expect("absmax", q.blocks, {"U8"}, "uint8 (double-quantized)")
        expect("nested_absmax", -(-q.blocks // q.nested_blocksize), floats, "float")
        expect("nested_quant_map", 256, floats, "float")
    else:
        expect("absmax", q.blocks, floats, "float")


def find_quantized(base: TensorSource) -> dict[str, QuantizedWeight]:
    """Every bitsandbytes 4-bit weight of ``base``, by its ``<m>.weight`` key.

    Reads the tensor headers and the small ``quant_state`` JSON tensors only.

    Args:
        base: an open base model.

    Returns:
        weight key -> :class:`QuantizedWeight`, in the base's key order; empty for an unquantized base.

    Raises:
        FormatError: a quant state that is not valid JSON, names an unknown type, or disagrees with
            the tensors beside it (missing or mis-sized weight/absmax/maps), two quant states for one
            weight, or 4-bit statistics (``<m>.weight.absmax``...) with no quant state.
    """
    found: dict[str, QuantizedWeight] = {}
    for key in base.tensors:
        if QUANT_STATE not in key:
            continue
        q = _parse(base, key)
        if q.name in found:
            raise _bad(base, key, f"a second quant state for {q.name!r} (also {found[q.name].state_key!r})")
        found[q.name] = q
    for key in base.tensors:
        stem, _, aux = key.rpartition(".")
        if aux in AUX_NAMES and stem in base.tensors and stem not in found:
            raise _bad(
                base,
                key,
                f"bitsandbytes 4-bit statistics for {stem!r} but no quant state "
                f"({stem}{QUANT_STATE}nf4 or fp4)",
            )
    return found


# --------------------------------------------------------------------------------------------
# dequantizing
# --------------------------------------------------------------------------------------------
def table(quant_type: str) -> torch.Tensor:
    """The 16 float32 values of a 4-bit type, as bitsandbytes' ``get_4bit_type`` computes them."""
    import torch

    if quant_type == "nf4":
        return torch.tensor(NF4_TABLE, dtype=torch.float32)
    if quant_type == "fp4":
        t = torch.tensor(FP4_RAW, dtype=torch.float32)
        return t.div_(t.abs().max())
    raise ValueError(f"unknown 4-bit type {quant_type!r}")


def _finite(base: TensorSource, key: str, t: torch.Tensor) -> None:
    import torch

    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise _bad(base, key, f"holds {bad} NaN/Inf values")


def _absmax(base: TensorSource, q: QuantizedWeight) -> torch.Tensor:
    """The float32 scale of every block (bitsandbytes ``dequantize_4bit``'s ``absmax``).

    With double quantization (bitsandbytes ``dequantize_blockwise`` then ``absmax += offset``)::

        absmax[b] = nested_quant_map[code[b]] · nested_absmax[b // nested_blocksize] + nested_offset
    """
    import torch

    key = q.key("absmax")
    raw = base.read(key).reshape(-1)
    if not q.double_quant:
        absmax = raw.float()
        _finite(base, key, absmax)
        return absmax
    assert q.nested_blocksize is not None and q.nested_offset is not None and q.nested_dtype is not None
    nmap = base.read(q.key("nested_quant_map")).reshape(-1).float()
    nabs = base.read(q.key("nested_absmax")).reshape(-1).float()
    _finite(base, q.key("nested_quant_map"), nmap)
    _finite(base, q.key("nested_absmax"), nabs)
    nbs = q.nested_blocksize
    vals = nmap[raw.long()]
    pad = (-vals.numel()) % nbs
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    vals = (vals.view(-1, nbs) * nabs.view(-1, 1)).reshape(-1)[: raw.numel()]
    vals = vals.to(getattr(torch, q.nested_dtype))
    # bitsandbytes: offset = torch.tensor(float(nested_offset)) (float32); absmax += offset
    vals += torch.tensor(q.nested_offset, dtype=torch.float32)
    return vals.float()


#: bytes of packed codes dequantized per step (bounds the temporaries to a few MB)
CHUNK_BYTES = 1 << 20


def dequantize(base: TensorSource, q: QuantizedWeight) -> torch.Tensor:
    """The weight ``q`` in float32 with its real shape, equal to bitsandbytes' ``dequantize_4bit``.

    ``W[i] = table[code[i]] · absmax[i // blocksize]`` over the flattened weight, ``code[2j]`` the high
    and ``code[2j+1]`` the low nibble of byte ``j``; see the module docstring for the sources.

    Args:
        base: the open base model.
        q: a weight from :func:`find_quantized`.

    Returns:
        A new float32 tensor of shape ``q.shape``. Cast it to ``q.dtype`` to get exactly what
        bitsandbytes returns.

    Raises:
        FormatError: the stored ``quant_map`` is not the ``q.quant_type`` table, or a statistic
            holds NaN/Inf.
    """
    import torch

    lut = table(q.quant_type)
    qmap = base.read(q.key("quant_map")).reshape(-1).float()
    if not torch.allclose(qmap, lut, rtol=0.0, atol=1e-6):
        raise _bad(
            base,
            q.key("quant_map"),
            f"is not bitsandbytes' {q.quant_type.upper()} table (bitsandbytes would ignore it; "
            "this file was not written by bitsandbytes)",
        )
    absmax = _absmax(base, q)
    packed = base.read(q.name).contiguous().view(-1).view(torch.uint8)
    n, bs = q.numel, q.blocksize
    # (value of the high nibble, value of the low nibble) for each of the 256 bytes
    byte = torch.arange(256)
    pairs = torch.stack([lut[byte >> 4], lut[byte & 0xF]], dim=1)
    out = torch.empty(packed.numel() * 2, dtype=torch.float32)
    out2 = out.view(-1, 2)
    for a in range(0, packed.numel(), CHUNK_BYTES):
        idx = packed[a : a + CHUNK_BYTES].to(torch.int32)
        out2[a : a + idx.numel()] = pairs.index_select(0, idx)
    full = n // bs
    if full:
        out[: full * bs].view(full, bs).mul_(absmax[:full].view(-1, 1))
    if n > full * bs:
        out[full * bs : n].mul_(absmax[full])
    return out[:n].view(q.shape) if n == out.numel() else out[:n].clone().view(q.shape)


# --------------------------------------------------------------------------------------------
# sizes and config for a dequantized copy
# --------------------------------------------------------------------------------------------
def aux_keys(quantized: dict[str, QuantizedWeight]) -> set[str]:
    """Every auxiliary key of ``quantized``: what a dequantized copy leaves out."""
    return {k for q in quantized.values() for k in q.aux}


def dequantized_nbytes(
    base: TensorSource, dtype_bytes: int | None = 2, quantized: dict[str, QuantizedWeight] | None = None
) -> int:
    """Tensor bytes of a copy of ``base`` whose 4-bit weights are written dequantized.

    Each 4-bit weight counts ``numel × dtype_bytes`` (2 for bf16/fp16), its auxiliary tensors count
    nothing, and every other tensor counts its stored bytes (as ``merge --dtype auto`` writes it).

    Args:
        base: the open base model.
        dtype_bytes: bytes per element of the dequantized weights; ``None``: each weight's own
            :attr:`QuantizedWeight.dtype` (what bitsandbytes dequantizes to).
        quantized: the result of :func:`find_quantized`, if already at hand.

    Raises:
        FormatError: as :func:`find_quantized`.
    """
    quantized = find_quantized(base) if quantized is None else quantized
    skip = aux_keys(quantized)
    total = 0
    for name, (_, info) in base.tensors.items():
        if name in quantized:
            q = quantized[name]
            total += q.numel * (DTYPE_INFO[q.st_dtype][0] if dtype_bytes is None else dtype_bytes)
        elif name not in skip:
            total += info.nbytes
    return total


def dequantized_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for a dequantized copy: without ``quantization_config``.

    transformers reads ``quantization_config`` as "these weights are bitsandbytes 4-bit" and would
    try to load the dequantized weights as packed codes.
    """
    return {k: v for k, v in config.items() if k != "quantization_config"}
