"""The in-memory model of an adapter: named LoRA modules with their factors and scale rule.

For a module with base weight W ([out, in]) the update is ``ΔW = s · B · A`` with A = ``down``
([r, in]), B = ``up`` ([out, r]) and s the scale: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA
(PEFT's ``LoraLayer.update_layer``). Embedding modules store PEFT's ``lora_embedding_A`` [r, vocab]
and ``lora_embedding_B`` [dim, r]; their update is ``s · (B · A)ᵀ``. Conv modules keep their 4-D
factors. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) stores the weight transposed, so the update is too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

KINDS = ("linear", "embedding", "conv")


@dataclass
class LoraModule:
    """One adapted module.

    Attributes:
        name: PEFT's module name without the ``base_model.model.`` prefix.
        kind: ``linear``, ``embedding`` or ``conv``.
        down: A, [r, in] (conv: [r, in, kh, kw]; embedding: [r, num_embeddings]).
        up: B, [out, r] (conv: [out, r, 1, 1]; embedding: [dim, r]).
        alpha: the module's alpha.
        rslora: scale is alpha / sqrt(r) instead of alpha / r.
        fan_in_fan_out: the base weight is stored [in, out] (GPT-2 Conv1D).
        bias: ``lora_B.bias`` when PEFT's ``lora_bias`` is on.
        magnitude: DoRA's ``lora_magnitude_vector`` [out].
    """

    name: str
    kind: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """PEFT's scaling: ``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)`` (a Python float, as PEFT)."""
        if self.rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module updates, as stored in the checkpoint."""
        if self.kind == "embedding":
            return (int(self.down.shape[1]), int(self.up.shape[0]))
        if self.kind == "conv":
            return (int(self.up.shape[0]), int(self.down.shape[1]), *self.down.shape[2:])
        out, inp = int(self.up.shape[0]), int(self.down.shape[1])
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    @property
    def parameters(self) -> int:
        n = self.down.numel() + self.up.numel()
        n += self.bias.numel() if self.bias is not None else 0
        n += self.magnitude.numel() if self.magnitude is not None else 0
        return n

    @property
    def nbytes(self) -> int:
        tensors = [self.down, self.up, self.bias, self.magnitude]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Adapter:
    """A LoRA adapter read from disk, whatever its format.

    Attributes:
        path: where it was read from.
        format: ``peft``, ``kohya``, ...
        modules: LoRA modules by PEFT module name.
        modules_to_save: full replacement tensors by base tensor name (PEFT ``modules_to_save``; a
            ``.base_layer.`` key is a saved embedding layer, replacing the tensor without it).
        config: the format's configuration (PEFT's adapter_config.json as a dict).
        metadata: the safetensors header metadata of the weights file.
        files: the files that hold it (hashed for receipts).
        init: how the adapter was initialised (``pissa``, ``olora``, ``corda`` change the base).
    """

    path: Path
    format: str
    modules: dict[str, LoraModule]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    init: str | None = None

    @property
    def rslora(self) -> bool:
        return any(m.rslora for m in self.modules.values())

    @property
    def kind(self) -> str:
        if any(m.is_dora for m in self.modules.values()):
            return "DoRA"
        if self.metadata.get("ss_network_module", "").endswith("dylora"):
            return "DyLoRA"
        return "rsLoRA" if self.rslora else "LoRA"

    @property
    def parameters(self) -> int:
        return sum(m.parameters for m in self.modules.values()) + sum(
            t.numel() for t in self.modules_to_save.values()
        )

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values()) + sum(
            t.numel() * t.element_size() for t in self.modules_to_save.values()
        )
