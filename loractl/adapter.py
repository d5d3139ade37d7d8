"""The in-memory model of an adapter: named LoRA modules with their factors and scale rule.

For a module with base weight W ([out, in]) the update is ``ΔW = s · B · A`` with A = ``down``
([r, in]), B = ``up`` ([out, r]) and s the scale: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA
(PEFT's ``LoraLayer.update_layer``). Embedding modules store PEFT's ``lora_embedding_A`` [r, vocab]
and ``lora_embedding_B`` [dim, r]; their update is ``s · (B · A)ᵀ``. Conv modules keep their 4-D
factors. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) stores the weight transposed, so the update is too.

A LoRA on a parameter (PEFT ``target_parameters``: MoE experts, a router's ``weight``) is one module named by
the parameter (``model.layers.0.mlp.experts.gate_up_proj``) with ``experts`` = E: ``down`` is PEFT's stacked
``lora_A`` [r·E, in] (expert-major: expert e's A is rows ``e·r … (e+1)·r``) and ``up`` its ``lora_B``
[out, r·E] (rank-major: expert e's B is columns ``e, e+E, e+2E, …``); each expert's own update is
``s · B_e · A_e`` with r the rank per expert (:meth:`LoraModule.expert`, :func:`stack_experts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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
        experts: 0 for a module LoRA; for a parameter LoRA (PEFT ``target_parameters``) the number of
            experts E its stacked factors hold (1 for a 2-D parameter such as a router's weight).
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
    experts: int = 0

    @property
    def rank(self) -> int:
        """r; for a parameter LoRA the rank per expert (its ``lora_A`` has r·E rows)."""
        rows = int(self.down.shape[0])
        return rows // self.experts if self.experts > 1 else rows

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
        if self.experts > 1:  # every expert's update [out, in], stacked (PEFT's orientation)
            return (self.experts, out, inp)
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

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B [out, r] and A [r, n] as 2-D matrices whose product (times the scale) is the update in
        PEFT's [out, in] orientation (conv kernels flattened; embeddings as PEFT stores them).

        Raises:
            ValueError: a parameter LoRA of several experts: its stacked factors are no one product
                (take each expert's, :meth:`expert`).
        """
        if self.experts > 1:
            raise ValueError(f"module {self.name!r} holds {self.experts} experts' LoRAs: use .expert(e)")
        r = self.rank
        return self.up.reshape(self.up.shape[0], r), self.down.reshape(r, -1)

    def with_factors(self, b: torch.Tensor, a: torch.Tensor, alpha: float, rslora: bool = False) -> LoraModule:
        """A copy with new 2-D factors (reshaped back to conv kernels) in this module's dtypes."""
        k = int(a.shape[0])
        down = a.reshape(k, *self.down.shape[1:]).to(self.down.dtype).contiguous()
        up = b.reshape(self.up.shape[0], k, *self.up.shape[2:]).to(self.up.dtype).contiguous()
        return replace(self, down=down, up=up, alpha=alpha, rslora=rslora)

    def normalized(self) -> LoraModule:
        """The same update with alpha = r (scale 1): the scale folded into B (and the bias), in float64."""
        s = self.scale
        up = (self.up.double() * s).to(self.up.dtype)
        bias = (self.bias.double() * s).to(self.bias.dtype) if self.bias is not None else None
        return replace(self, up=up, bias=bias, alpha=float(self.rank), rslora=False)

    def padded(self, rank: int) -> LoraModule:
        """Zero-padded to ``rank``, B·A unchanged; alpha' = alpha·r'/r (rsLoRA: alpha·√(r'/r)) keeps the scale
        (a parameter LoRA: every expert padded)."""
        import torch

        r = self.rank
        if rank == r:
            return self
        if self.experts > 1:
            return stack_experts(self, [e.padded(rank) for e in self.split_experts()])
        down = torch.cat([self.down, self.down.new_zeros(rank - r, *self.down.shape[1:])], 0)
        up = torch.cat([self.up, self.up.new_zeros(self.up.shape[0], rank - r, *self.up.shape[2:])], 1)
        alpha = self.alpha * (math.sqrt(rank / r) if self.rslora else rank / r)
        return replace(self, down=down, up=up, alpha=alpha)

    def cast(self, dtype: torch.dtype) -> LoraModule:
        """Every tensor in ``dtype``."""
        return replace(
            self,
            down=self.down.to(dtype),
            up=self.up.to(dtype),
            bias=self.bias.to(dtype) if self.bias is not None else None,
            magnitude=self.magnitude.to(dtype) if self.magnitude is not None else None,
        )

    def expert(self, e: int) -> LoraModule:
        """Expert e of a parameter LoRA as a module LoRA of its own: ``A_e = down[e·r:(e+1)·r]`` [r, in]
        and ``B_e = up[:, e::E]`` [out, r] (views; PEFT's ``ParamWrapper.get_delta_weight`` layout), the
        same alpha and rsLoRA; the module itself for a module LoRA or a 2-D parameter."""
        if self.experts <= 1:
            return self
        r, n = self.rank, self.experts
        return replace(self, down=self.down[e * r : (e + 1) * r], up=self.up[:, e::n], experts=0)

    def split_experts(self) -> list[LoraModule]:
        """Every expert's module (:meth:`expert`), in order; ``[self]`` for a module LoRA."""
        return [self.expert(e) for e in range(max(1, self.experts))] if self.experts > 1 else [self]

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        """The module's tensors under PEFT's names: lora_A, lora_B, and lora_B.bias and
        lora_magnitude_vector where present."""
        named = [
            ("lora_A", self.down),
            ("lora_B", self.up),
            ("lora_B.bias", self.bias),
            ("lora_magnitude_vector", self.magnitude),
        ]
        return [(label, t) for label, t in named if t is not None]


def stack_experts(template: LoraModule, experts: list[LoraModule]) -> LoraModule:
    """The parameter LoRA of ``template`` (its name and kind) holding ``experts`` (one module LoRA each, in
    order), stacked in PEFT's layout: A expert-major ``[A_0; A_1; …]``, B rank-major (column ``k·E + e`` is
    expert e's column k). PEFT has one rank and one scale per parameter: experts whose ranks or scales
    differ are first given scale 1 (the scale folded into B, :meth:`LoraModule.normalized`) and zero-padded
    to the largest rank."""
    import torch

    if len(experts) == 1 and template.experts <= 1:
        return replace(experts[0], name=template.name, experts=template.experts)
    first = experts[0]
    if any((m.rank, m.alpha, m.rslora) != (first.rank, first.alpha, first.rslora) for m in experts):
        top = max(m.rank for m in experts)
        experts = [m.normalized().padded(top) for m in experts]
        first = experts[0]
    down = torch.cat([m.down for m in experts], 0).contiguous()
    up = torch.stack([m.up for m in experts], 2).reshape(first.up.shape[0], -1).contiguous()
    return replace(first, name=template.name, down=down, up=up, experts=len(experts), bias=None, magnitude=None)


@dataclass
class NonFinite:
    """A tensor of an adapter holding NaN or Inf values.

    Attributes:
        module: the module (for a saved tensor: the module it belongs to).
        tensor: ``lora_A``, ``lora_B``, ``lora_B.bias``, ``lora_magnitude_vector``, or the saved tensor's key.
        nan: how many values are NaN.
        inf: how many are ±Inf.
        numel: how many values it has.
    """

    module: str
    tensor: str
    nan: int
    inf: int
    numel: int


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

    def derived(self, modules: dict[str, LoraModule]) -> Adapter:
        """This adapter with other modules (truncated, combined, converted): its saved tensors, config
        and files kept, its metadata without what described the old tensors (``sshs_*`` hashes,
        ``loractl.*`` provenance)."""
        return Adapter(
            path=self.path,
            format=self.format,
            modules=modules,
            modules_to_save=dict(self.modules_to_save),
            config=dict(self.config),
            metadata={k: v for k, v in self.metadata.items() if not k.startswith(("sshs_", "loractl."))},
            files=list(self.files),
            init=self.init,
        )

    def nonfinite(self) -> list[NonFinite]:
        """Every float tensor holding NaN or Inf (factors of diverged training), in module order:
        the one scan that ``load_adapter`` refuses on and ``check`` reports."""
        import torch

        found: list[NonFinite] = []

        def scan(module: str, label: str, t: torch.Tensor) -> None:
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                nan = int(torch.isnan(t).sum())
                found.append(NonFinite(module, label, nan, int(torch.isinf(t).sum()), t.numel()))

        for m in self.modules.values():
            for label, t in m.parts():
                scan(m.name, label, t)
        for key, t in self.modules_to_save.items():
            scan(key.rsplit(".", 1)[0], key, t)
        return found

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values()) + sum(
            t.numel() * t.element_size() for t in self.modules_to_save.values()
        )
