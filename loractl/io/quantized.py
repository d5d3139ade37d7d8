"""The weights of a base stored quantized, whatever the scheme: bitsandbytes 4-bit (:mod:`.quant`) and
FP8 with scales (:mod:`.fp8`: transformers' block-scaled ``fp8``, compressed-tensors' FP8).

Every consumer (the fit rule's shapes, the output's layout, merge's jobs, ``inspect``'s sizes,
``similarity --base``) asks :attr:`loractl.io.base.BaseModel.quantized`, which is :func:`find` here,
and works through the small interface :class:`QuantizedTensor` that both kinds of weight share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .safetensors import DTYPE_INFO

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .safetensors import TensorSource


class QuantizedTensor(Protocol):
    """One quantized weight of a base (:class:`.quant.QuantizedWeight`, :class:`.fp8.Fp8Weight`).

    Attributes:
        name: the stored weight's key.
        shape: the real weight's shape (what it dequantizes to, what an adapter's update must have).
        aux: the other keys that belong to it (statistics, scales): what a dequantized copy leaves out.
        method: ``"bitsandbytes-4bit"``, ``"fp8"`` or ``"compressed-tensors"``.
        merge_dtype: the dtype (safetensors name) a merge writes it in when ``--dtype`` is ``auto``.
        requantizable: ``merge --requantize`` writes it back in its own layout, and a receipt gives
            back its bytes.
    """

    name: str
    shape: tuple[int, ...]
    aux: list[str]
    method: str

    @property
    def numel(self) -> int: ...

    @property
    def merge_dtype(self) -> str: ...

    @property
    def requantizable(self) -> bool: ...

    def load(self, base: TensorSource, dtype: torch.dtype) -> torch.Tensor:
        """The weight dequantized as its runtime does it for a model computed in ``dtype``."""
        ...

    def float32(self, base: TensorSource) -> torch.Tensor:
        """The weight's values in float32 (for analyses: ``similarity --base``)."""
        ...


def find(base: TensorSource) -> dict[str, QuantizedTensor]:
    """Every quantized weight of ``base`` by its key: the 4-bit ones, then the FP8 ones.

    Raises:
        FormatError: as :func:`.quant.find_quantized` and :func:`.fp8.find_fp8` (naming the file and
            tensor, or config.json and key).
    """
    from .fp8 import find_fp8
    from .quant import find_quantized

    found: dict[str, QuantizedTensor] = dict(find_quantized(base))
    found.update(find_fp8(base))
    return found


def aux_keys(found: dict[str, QuantizedTensor]) -> set[str]:
    """Every auxiliary key of ``found``: what a dequantized copy leaves out."""
    return {k for q in found.values() for k in q.aux}


def methods(found: dict[str, QuantizedTensor]) -> list[str]:
    """The quantization methods present, sorted."""
    return sorted({q.method for q in found.values()})


def dequantized_nbytes(base: TensorSource, found: dict[str, QuantizedTensor]) -> int:
    """Tensor bytes of a merge of ``base`` written with ``--dtype auto``: each quantized weight in its
    :attr:`~QuantizedTensor.merge_dtype`, its auxiliary tensors left out, every other tensor as stored."""
    skip = aux_keys(found)
    total = 0
    for name, (_, info) in base.tensors.items():
        if name in found:
            total += found[name].numel * DTYPE_INFO[found[name].merge_dtype][0]
        elif name not in skip:
            total += info.nbytes
    return total


def dequantized_config(config: dict[str, Any], found: dict[str, QuantizedTensor], dtype: str | None) -> dict[str, Any]:
    """``config.json`` for a copy whose quantized weights are written dense: no ``quantization_config``
    (transformers would load the dense weights as quantized ones); for FP8 bases also ``dtype`` set to
    the written dtype (``dtype``, else the weights' :attr:`~QuantizedTensor.merge_dtype`), as
    transformers' own ``save_pretrained`` of a dequantized FP8 model writes it."""
    from . import fp8, quant

    fp8s = [q for q in found.values() if q.method != quant.METHOD]
    if not fp8s:
        return quant.dequantized_config(config)
    return fp8.dequantized_config(config, dtype or fp8s[0].merge_dtype)
