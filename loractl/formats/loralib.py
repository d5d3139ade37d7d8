"""loralib (microsoft/LoRA, the LoRA paper's own code) state dicts, as ``lora.lora_state_dict(model)`` gives them.

Keys: ``<module>.lora_A`` [r, in] and ``<module>.lora_B`` [out, r], no ``.weight`` (``loralib/layers.py``:
``Linear``, ``Embedding``, ``MergedLinear``), plus ``<module>.bias`` when saved with ``bias='all'`` or
``'lora_only'`` (trained biases: full replacements of the base's). r and alpha are not in the file.

Scale (``LoRALayer``): ``scaling = lora_alpha / r``. r comes from the shapes (``options.rank``, if given,
must agree). alpha comes from ``options.alpha``; without it loractl takes **alpha = r (scale 1)**, not
loralib's constructor default ``lora_alpha=1``: the training alpha is simply not in the file (the
repository's own examples use 16 with r=8, and 32 with r=4), so no default is reliably right; alpha = r
reads the factors as the update itself (ΔW = B·A), is the rule every other format uses for a missing
alpha, and is the convention loractl's loralib writer folds the scale into (see :func:`write`). The
adapter's ``config`` records ``alpha_assumed``.

Updates (``train(False)`` merges): ``Linear``: ``W += T(B @ A) * scaling`` with ``T`` the transpose when
``fan_in_fan_out`` (GPT-2 ``Conv1D`` weights, stored [in, out]); ``Embedding``: ``W += (B @ A)ᵀ * scaling``;
``MergedLinear`` (GPT-2 ``c_attn`` with ``enable_lora=[True, False, True]``): ``lora_A`` is [r·k, in] and
``lora_B`` [out/n·k, r] for k enabled of n slices, and ``merge_AB`` is ``zero_pad(conv1d(A, B, groups=k))``:
enabled slice g gets ``B_g @ A_g``. loractl keeps one module per base weight, so a MergedLinear becomes one
LoRA of rank r·k with ``up`` = B spread block-diagonally into [out, r·k] (slice g's rows of B in column
block g, zero rows for disabled slices) and ``down`` = A: ``up @ down`` is exactly ``zero_pad(...)``. Its
alpha is ``k · alpha``, so that ``alpha / rank`` is loralib's ``alpha / r``.

What the file does not say, and how loractl decides it:

- ``fan_in_fan_out``: ``ReadOptions.fan_in_fan_out`` when set; else True for GPT-2's ``Conv1D`` module
  names (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``) unless the base's config names a model type that
  uses ``nn.Linear`` for them.
- ``enable_lora`` of a MergedLinear: ``ReadOptions.enable_lora`` (a list of bools for every merged module,
  or a dict by module name) when set; else ``[True, False, True]`` for k = 2 (q and v, the only
  MergedLinear configuration in the LoRA repository's examples) and all slices for k > 2. A wrong guess
  of the slice count shows up as a shape mismatch with the base; the order of two of three slices cannot
  be checked, so pass ``enable_lora`` when the adapter is not a q,v one.
- Embedding modules are told by name (``wte``, ``embed_tokens``, ...), as their factors have the same shapes.
- ``ConvLoRA`` (``<module>.conv.weight`` in the base) reshapes B·A in a way that is not a LoRA of the
  conv weight: refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from . import ReadOptions, WriteOptions

PARTS = (".lora_A", ".lora_B")
#: last module-name components of embedding layers (loralib ``Embedding``)
EMBEDDING_NAMES = {
    "wte",
    "wpe",
    "embed_tokens",
    "embed_positions",
    "embed_in",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "tok_embeddings",
    "shared",
}
#: GPT-2's ``Conv1D`` modules, whose weights are stored [in, out] (loralib ``fan_in_fan_out=True``)
CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
#: model types whose c_attn/c_proj/c_fc are plain ``nn.Linear`` ([out, in]) despite the GPT-2 names
LINEAR_MODEL_TYPES = {"gpt_bigcode", "qwen", "starcoder2", "codegen"}
#: loralib's MergedLinear default when the file cannot say: GPT-2 ``c_attn`` adapted on q and v
DEFAULT_ENABLE_LORA = [True, False, True]
CONVENTION = "scale folded into lora_B; read with alpha = r (scale 1)"


def detect(keys: list[str], metadata: dict[str, str]) -> bool:
    """``<module>.lora_A`` / ``<module>.lora_B`` without ``.weight`` (and maybe ``<module>.bias``), nothing else."""
    lora = [k for k in keys if k.endswith(PARTS)]
    return bool(lora) and all(k.endswith(PARTS) or k.endswith(".bias") for k in keys)


def _fan_in_fan_out(name: str, options: ReadOptions) -> bool:
    forced = getattr(options, "fan_in_fan_out", None)
    if forced is not None:
        return bool(forced)
    model_type = str(options.base_config.get("model_type") or "")
    return name.rsplit(".", 1)[-1] in CONV1D_NAMES and model_type not in LINEAR_MODEL_TYPES


def _enable_lora(name: str, k: int, options: ReadOptions, source: Path) -> tuple[list[bool], bool]:
    """(enable_lora of a MergedLinear with k enabled slices, whether it was assumed)."""
    given: Any = getattr(options, "enable_lora", None)
    if isinstance(given, dict):
        given = given.get(name, given.get(name.rsplit(".", 1)[-1]))
    if given is None:
        return (list(DEFAULT_ENABLE_LORA) if k == 2 else [True] * k), True
    enable = [bool(x) for x in given]
    if sum(enable) != k:
        raise FormatError(
            f"{source}: module {name!r}: lora_A holds {k} rank blocks but enable_lora {enable} enables {sum(enable)}",
            hint="give the enable_lora the model was built with",
        )
    return enable, False


def _merged_up(b: torch.Tensor, enable: list[bool], r: int) -> torch.Tensor:
    """loralib's ``zero_pad(conv1d(A, B, groups=k))`` as one factor: B spread block-diagonally to [out, r·k]."""
    import torch

    k = sum(enable)
    rows = b.shape[0] // k
    up = torch.zeros(rows * len(enable), r * k, dtype=b.dtype)
    g = 0
    for pos, on in enumerate(enable):
        if on:
            up[pos * rows : (pos + 1) * rows, g * r : (g + 1) * r] = b[g * rows : (g + 1) * rows]
            g += 1
    return up


def _factors(
    weights: Path, name: str, p: dict[str, torch.Tensor], base_keys: set[str], options: ReadOptions
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A loralib module's lora_A, lora_B and rank, checked (see :func:`read`'s ``Raises``)."""
    for part in ("lora_A", "lora_B"):
        if part not in p:
            raise FormatError(
                f"{weights}: module {name!r} has no {part} tensor", hint="the state dict is incomplete"
            )
    a, b = p["lora_A"], p["lora_B"]
    if a.dim() != 2 or b.dim() != 2:
        raise FormatError(
            f"{weights}: module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not matrices"
        )
    for part, t in (("lora_A", a), ("lora_B", b)):
        if t.numel() == 0:
            raise FormatError(f"{weights}: tensor {name + '.' + part!r} {list(t.shape)} is empty")
    if f"{name}.conv.weight" in base_keys and f"{name}.weight" not in base_keys:
        raise FormatError(
            f"{weights}: module {name!r} is a loralib ConvLoRA (base tensor {name + '.conv.weight'!r}); "
            "its update (B·A reshaped to the kernel) is not a LoRA loractl can represent",
            hint="merge it with loralib itself (model.eval())",
        )
    r = int(b.shape[1])
    if r == 0 or a.shape[0] % r:
        raise FormatError(
            f"{weights}: module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have the same rank"
        )
    if options.rank is not None and options.rank != r:
        raise FormatError(
            f"{weights}: module {name!r}: tensor {name + '.lora_B'!r} {list(b.shape)} has rank {r}, "
            f"but the rank given is {options.rank}",
            hint="pass the r the model was trained with, or leave --rank out to take it from the shapes",
        )
    return a, b, r


def read(
    path: Path,
    weights: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    options: ReadOptions,
) -> Adapter:
    """A loralib state dict; r from the shapes (checked against ``options.rank``), alpha from
    ``options.alpha`` or alpha = r.

    Raises:
        FormatError: a missing factor, factors whose ranks do not agree (with each other or with
            ``options.rank``), a key that is not loralib's, a ConvLoRA module.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(PARTS):
            parts.setdefault(key[: -len(".lora_A")], {})[key[-6:]] = t
        elif key.endswith(".bias"):
            biases[key] = t
        else:
            raise FormatError(
                f"{weights}: tensor {key!r} is not a key of a loralib state dict (lora_A, lora_B, bias)"
            )
    base_keys = set(options.base_keys or ())
    modules: dict[str, LoraModule] = {}
    enables: dict[str, list[bool]] = {}
    assumed_enable: list[str] = []
    fifo: list[str] = []
    for name, p in sorted(parts.items()):
        a, b, r = _factors(weights, name, p, base_keys, options)
        alpha = float(options.alpha) if options.alpha is not None else float(r)
        k = int(a.shape[0]) // r
        leaf = name.rsplit(".", 1)[-1]
        if k == 1 and leaf in EMBEDDING_NAMES:
            modules[name] = LoraModule(name=name, kind="embedding", down=a, up=b, alpha=alpha)
            continue
        ff = _fan_in_fan_out(name, options)
        if ff:
            fifo.append(name)
        if k == 1:
            modules[name] = LoraModule(name=name, kind="linear", down=a, up=b, alpha=alpha, fan_in_fan_out=ff)
            continue
        enable, assumed = _enable_lora(name, k, options, weights)
        if b.shape[0] % k:
            raise FormatError(
                f"{weights}: module {name!r}: lora_B {list(b.shape)} cannot be split into {k} enabled slices"
            )
        enables[name] = enable
        if assumed:
            assumed_enable.append(name)
        up = _merged_up(b, enable, r)
        modules[name] = LoraModule(
            name=name, kind="linear", down=a, up=up, alpha=alpha * k, fan_in_fan_out=ff
        )
    config: dict[str, Any] = {
        "rank": options.rank,
        "alpha": options.alpha,
        "alpha_assumed": options.alpha is None,
        "fan_in_fan_out": fifo,
        "enable_lora": enables,
        "enable_lora_assumed": assumed_enable,
    }
    return Adapter(
        path=path,
        format="loralib",
        modules=modules,
        modules_to_save=biases,
        config=config,
        metadata=metadata,
        files=[weights],
    )


def write(adapter: Adapter, out: Path, options: WriteOptions) -> None:
    """One safetensors file at ``out`` in loralib's plain ``lora.Linear`` layout (``<module>.lora_A``,
    ``<module>.lora_B``), right for alpha = r: each module's scale is folded into ``lora_B``
    (``lora_B = s · B``, computed in float32 for half-precision factors), so a loralib model built with
    ``lora_alpha = r`` (or loractl reading it without ``--alpha``) has the same update s·B·A.

    Embedding modules are written as loralib's ``Embedding`` holds them; ``modules_to_save`` biases as
    ``<module>.bias``.

    Raises:
        FormatError: naming the first module loralib cannot hold: DoRA, ``lora_bias``, conv, or a
            ``modules_to_save`` tensor that is not a bias.
    """
    import torch

    from ..io.safetensors import write_file

    out_t: dict[str, torch.Tensor] = {}
    for name, m in sorted(adapter.modules.items()):
        why = None
        if m.is_dora:
            why = "is DoRA (lora_magnitude_vector)"
        elif m.bias is not None:
            why = "has a LoRA bias (lora_B.bias)"
        elif m.kind == "conv":
            why = "is a conv LoRA (loralib's ConvLoRA factors differently)"
        if why:
            raise FormatError(
                f"{adapter.path}: module {name!r} {why}, which a loralib state dict cannot hold",
                hint="write it as a PEFT adapter (--to peft), or merge it",
            )
        up = m.up
        if m.scale != 1.0:
            up = (
                (up.float() * m.scale).to(up.dtype)
                if up.dtype in (torch.float16, torch.bfloat16)
                else up * m.scale
            )
        out_t[f"{name}.lora_A"] = m.down.contiguous()
        out_t[f"{name}.lora_B"] = up.contiguous()
    for key, t in sorted(adapter.modules_to_save.items()):
        if not key.endswith(".bias") or ".base_layer." in key:
            raise FormatError(
                f"{adapter.path}: tensor {key!r} is a full module copy (modules_to_save); a loralib state dict "
                "holds only LoRA factors and biases",
                hint="write it as a PEFT adapter (--to peft)",
            )
        out_t[key] = t.contiguous()
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith("loractl.")}
    meta.update(options.metadata)
    meta["format"] = "pt"
    meta["loractl.loralib"] = CONVENTION
    write_file(out, out_t, meta)
