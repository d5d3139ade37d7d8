"""On-disk adapter formats, their detection, reading and writing. Key names and metadata only: no math.

Each format is a module of this package with the same three functions:

- ``detect(keys: list[str], metadata: dict[str, str]) -> bool``: do these safetensors keys look like it?
- ``read(path: Path, weights: Path, tensors: dict[str, Tensor], metadata: dict[str, str],
  options: ReadOptions) -> Adapter``: build the in-memory adapter (module names as PEFT's, without
  ``base_model.model.``; alpha and scale rule exactly as the format defines them).
- ``write(adapter: Adapter, out: Path, options: WriteOptions) -> None``: write it at ``out`` (a path
  that does not exist yet; the caller makes it atomic), so that every module's update s·B·A is unchanged.

GGUF files are not safetensors: ``gguf.read_file(path, options)`` reads them whole.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, InputError, LoractlError, UnsupportedAdapterError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..adapter import Adapter

#: every format name, in the order detection tries them (most specific first)
FORMATS = ("peft", "kohya", "diffusers", "loralib", "gguf")
DETECT_ORDER = ("kohya", "diffusers", "loralib", "peft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

#: LyCORIS algorithms that are not LoRA, by a key fragment that identifies them
LYCORIS_NOT_LORA = {
    ".hada_w1_a": "LoHa",
    ".hada_w2_a": "LoHa",
    ".lokr_w1": "LoKr",
    ".lokr_w2": "LoKr",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".oft_R": "BOFT",
    ".a1.weight": "GLoRA",
    ".b1.weight": "GLoRA",
    ".diff": "full (diff)",
    ".diff_b": "full (diff)",
    ".weight_ia3": "IA3",
    ".on_input": "IA3",
    ".dora_scale": "DoRA (LyCORIS dora_scale)",
}


@dataclass
class ReadOptions:
    """What a reader may need beyond the file.

    Attributes:
        allow_pickle: accept pickle files (read with ``torch.load(weights_only=True)``).
        base_keys: every tensor name of the base model, to resolve ambiguous module names
            (kohya's underscores) and to know the architecture's layout; None without ``--base``.
        base_config: the base's ``config.json`` (architecture, layer count) when known.
        rank: r for formats that do not store it (loralib); None: from the shapes.
        alpha: lora_alpha for adapters that do not state it: loralib (None: alpha = r), a PEFT adapter
            without adapter_config.json (None: refused, unless only_factor is set).
        enable_lora: loralib ``MergedLinear``'s enabled slices, for all packed modules or by module.
        fan_in_fan_out: force loralib's layout flag instead of guessing it from module names.
        subfolder: for a Hub reference, the folder inside the repo that holds the adapter.
        progress: show huggingface_hub's download bars.
        only_factor: ``"down"`` or ``"up"``: read only that factor's values; the other factor's
            tensors are placeholders with their shapes and dtypes but no data (``device="meta"``),
            for analyses of one factor (``similarity``) that need not read the rest.
    """

    allow_pickle: bool = False
    base_keys: Collection[str] | None = None
    base_config: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    alpha: float | None = None
    enable_lora: list[bool] | dict[str, list[bool]] | None = None
    fan_in_fan_out: bool | None = None
    subfolder: str | None = None
    progress: bool = False
    only_factor: str | None = None


#: key fragments of the up (B) and down (A) factors in every safetensors layout loractl reads
FACTOR_KEYS = {
    "up": ("lora_B.", "lora_embedding_B", "lora_up.", ".lora.up.", "lora_B_"),
    "down": ("lora_A.", "lora_embedding_A", "lora_down.", ".lora.down.", "lora_A_"),
}


@dataclass
class WriteOptions:
    """What a writer may need beyond the adapter.

    Attributes:
        base_keys: the base's tensor names (GGUF needs the architecture; kohya names from the base).
        base_config: the base's ``config.json``.
        metadata: extra ``__metadata__`` entries (loractl's provenance) to add to what the adapter had.
        target: the final output path (writers are handed a temporary path; its name tells nothing).
    """

    base_keys: Collection[str] | None = None
    base_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    target: Path | None = None


def format_module(name: str):
    """The module implementing format ``name``."""
    if name not in FORMATS:
        raise UsageError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise UsageError(f"format {name!r} is not yet available in this version") from None
        raise


def read_tensors(
    path: Path, allow_pickle: bool, only_factor: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (small) weights file and its header metadata.

    Pickle files are refused unless ``allow_pickle``, and then read with ``torch.load(weights_only=True)``.
    With ``only_factor`` (``"down"``/``"up"``), the other factor's tensors of a safetensors file are
    not read: they come back as meta tensors of the right shape and dtype; the factor kept is mapped
    copy-on-write from the file rather than copied (an analysis only reads it).
    """
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(
                f"{path}: is a pickle file; pickles can run code when loaded, so loractl refuses them",
                hint="convert it to safetensors, or pass --allow-pickle if you trust it "
                "(it is then read with torch.load(weights_only=True))",
            )
        import torch

        from ..io.files import open_regular

        try:
            with os.fdopen(open_regular(path, "pickle file"), "rb") as fh:
                obj = torch.load(fh, map_location="cpu", weights_only=True)
        except LoractlError:
            raise
        except Exception as e:  # torch raises many types for a bad pickle
            raise FormatError(
                f"{path}: cannot be read as a weights-only pickle ({type(e).__name__}: {e})"
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FormatError(f"{path}: the pickle does not hold a flat dict of tensors")
        return dict(obj), {}
    from ..io.safetensors import SafetensorsFile

    with SafetensorsFile(path) as f:
        if only_factor is None:
            return {k: f.read(k) for k in f.keys()}, dict(f.metadata)
        import torch

        from ..io.safetensors import torch_dtype

        skip = FACTOR_KEYS["up" if only_factor == "down" else "down"]
        out: dict[str, torch.Tensor] = {}
        for k in f.keys():
            if any(frag in k for frag in skip):
                info = f.readable_info(k)
                out[k] = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
            else:
                out[k] = f.mapped(k)
        return out, dict(f.metadata)


def alpha_value(t: torch.Tensor, key: str, source: Path) -> float:
    """The alpha stored in tensor ``key`` (kohya's and diffusers' ``.alpha``): one finite number.

    Raises:
        FormatError: not one element, not a number (a boolean), or NaN/Inf.
    """
    if t.numel() != 1:
        raise FormatError(f"{source}: tensor {key!r} has shape {list(t.shape)}, not a scalar alpha")
    if t.dtype.is_complex or str(t.dtype) == "torch.bool" or t.is_meta:
        raise FormatError(f"{source}: tensor {key!r} is {str(t.dtype).replace('torch.', '')}, not a number")
    value = float(t.reshape(()).double().item())
    if not math.isfinite(value):
        raise FormatError(f"{source}: tensor {key!r} holds alpha {value}, not a finite number")
    return value


def refuse_lycoris(keys: list[str], source: Path) -> None:
    """LyCORIS algorithms that are not LoRA are recognised and refused by name, never skipped."""
    for k in keys:
        for frag, algo in LYCORIS_NOT_LORA.items():
            if k.endswith(frag) or f"{frag}." in k:
                raise FormatError(
                    f"{source}: a LyCORIS {algo} adapter (tensor {k!r}), not LoRA; loractl handles LoRA/LoCon only",
                    hint="merge it with LyCORIS itself",
                )


def detect(keys: list[str], metadata: dict[str, str], source: Path) -> str:
    """The format of a weights file from its keys and metadata."""
    refuse_lycoris(keys, source)
    for name in DETECT_ORDER:
        try:
            mod = format_module(name)
        except UsageError:
            continue
        if mod.detect(keys, metadata):
            return name
    shown = ", ".join(repr(k) for k in keys[:3])
    hint = f"pass --format ({', '.join(FORMATS)}) if you know the format"
    if not any(frag in k for k in keys for frags in FACTOR_KEYS.values() for frag in frags):
        hint = "no key is a LoRA factor: is this a base model? were the arguments swapped (loractl merge BASE ADAPTER)?"
    raise FormatError(f"{source}: unknown adapter layout (keys such as {shown})", hint=hint)


def weights_file(path: Path) -> Path:
    """The weights file of an adapter given as a folder or a file."""
    from . import peft

    return peft.find_files(path)[1]


def load_adapter(path: str | Path, format: str | None = None, options: ReadOptions | None = None) -> Adapter:
    """Read an adapter in any supported layout.

    Args:
        path: a PEFT folder, a single weights file (``.safetensors``, ``.gguf``, a pickle), or a Hub
            reference ``org/name[@revision]``.
        format: force a format instead of detecting it.
        options: see :class:`ReadOptions`.

    Returns:
        The adapter, with module names as PEFT's (no ``base_model.model.`` prefix).

    Raises:
        InputError: missing or unreadable path, pickle without ``allow_pickle``.
        FormatError: corrupt file, unknown layout, a LyCORIS algorithm that is not LoRA.
    """
    options = options or ReadOptions()
    from ..io.hub import is_hub_ref, resolve_adapter

    if is_hub_ref(path):
        path = resolve_adapter(str(path), subfolder=options.subfolder, progress=options.progress)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder", hint="check the adapter path")
    if format is not None:
        format_module(format)  # a clear error for an unknown name
    if format == "gguf" or (format is None and path.suffix == ".gguf"):
        adapter = format_module("gguf").read_file(path, options)
        check_modules(adapter, path)
        return adapter
    weights = weights_file(path)
    tensors, metadata = read_tensors(weights, options.allow_pickle, options.only_factor)
    keys = list(tensors)
    if not keys:
        raise FormatError(f"{weights}: holds no tensors")
    fmt = format or detect(keys, metadata, weights)
    adapter = format_module(fmt).read(path, weights, tensors, metadata, options)
    check_modules(adapter, weights)
    return adapter


def check_modules(adapter: Adapter, source: Path) -> None:
    """What every format's modules must be, whatever the file said: factors (and DoRA magnitudes,
    ``lora_B`` biases) of a floating-point dtype and not empty, a rank of at least 1, a finite alpha.

    Raises:
        FormatError: naming the module and the tensor or value.
    """
    for m in adapter.modules.values():
        for label, t in (
            ("lora_A", m.down),
            ("lora_B", m.up),
            ("lora_B.bias", m.bias),
            ("magnitude", m.magnitude),
        ):
            if t is not None and not t.is_floating_point():
                raise FormatError(
                    f"{source}: module {m.name!r}: {label} is {str(t.dtype).replace('torch.', '')}, "
                    "not a floating-point tensor",
                    hint="LoRA factors are float tensors; the file is damaged or not a LoRA",
                )
            if t is not None and t.numel() == 0:
                raise FormatError(f"{source}: module {m.name!r}: {label} {list(t.shape)} is empty")
        if m.rank < 1:
            raise FormatError(f"{source}: module {m.name!r} has rank 0 (lora_A {list(m.down.shape)})")
        if m.down.dim() != m.up.dim():
            raise FormatError(  # a linear pair is [r, in] and [out, r]; a convolution's [r, in, k...] and [out, r, 1...]
                f"{source}: module {m.name!r}: lora_A {list(m.down.shape)} and lora_B {list(m.up.shape)} "
                "do not make a low-rank pair",
                hint="the file is damaged or not a LoRA",
            )
        if m.magnitude is not None and m.magnitude.numel() != m.up.shape[0]:
            raise FormatError(
                f"{source}: module {m.name!r}: lora_magnitude_vector {list(m.magnitude.shape)} does not hold one "
                f"value per output ({m.up.shape[0]}, lora_B {list(m.up.shape)})",
                hint="the file is damaged or not a DoRA adapter",
            )
        if isinstance(m.alpha, bool) or not isinstance(m.alpha, (int, float)) or not math.isfinite(m.alpha):
            raise FormatError(f"{source}: module {m.name!r} has alpha {m.alpha!r}, not a finite number")



def writable(fmt: str) -> str:
    """The format to write an adapter read as ``fmt`` back in: itself when loractl writes it, else PEFT."""
    try:
        mod = format_module(fmt)
    except UsageError:
        return "peft"
    return fmt if hasattr(mod, "write") else "peft"


def write_adapter(
    adapter: Adapter,
    output: Path,
    to: str,
    options: WriteOptions,
    *,
    force: bool = False,
    inputs: Collection[Path] = (),
) -> Path:
    """Write ``adapter`` in format ``to`` at ``output``, atomically (a temporary path renamed into
    place), refusing an output that is one of ``inputs`` or exists without ``force``.

    A diffusers adapter written as PEFT must be for one pipeline component (a PEFT adapter is for one
    model); its module names become relative to that component.

    Only PEFT holds LoRAs on parameters (``target_parameters``: MoE experts, routers); writing one in another
    format is refused by name.

    Raises:
        UsageError: a diffusers adapter for several components written as PEFT.
        UnsupportedAdapterError: a parameter LoRA written in a format other than PEFT.
        OutputError: see :func:`loractl.io.atomic.atomic_output`.
    """
    from ..io.atomic import atomic_output

    mod = format_module(to)
    params = [m for m in adapter.modules.values() if m.experts]
    if params and to != "peft":
        first = params[0]
        raise UnsupportedAdapterError(
            f"{adapter.path}: parameter {first.name!r} holds a LoRA on a parameter (PEFT target_parameters, "
            f"{first.experts} expert{'s' if first.experts > 1 else ''}; {len(params)} such in all), which the "
            f"{to} format cannot hold",
            hint="write it --to peft",
        )
    options.target = output
    if to == "peft" and adapter.format == "diffusers":
        from .diffusers import component_adapters

        parts = component_adapters(adapter)
        if len(parts) != 1:
            raise UsageError(
                f"{adapter.path}: holds LoRAs for {len(parts)} components ({', '.join(sorted(parts))}); "
                "a PEFT adapter is for one model",
                hint="write --to diffusers to keep them together",
            )
        adapter = next(iter(parts.values()))
    with atomic_output(output, is_dir=False, inputs=list(inputs), force=force) as tmp:
        mod.write(adapter, tmp, options)
    return output
