"""On-disk adapter formats and their detection. Key names and metadata only: no math here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, InputError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..adapter import Adapter

FORMATS = ("peft",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (small) weights file and its header metadata.

    Pickle files are refused unless ``allow_pickle``, and then read with ``torch.load(weights_only=True)``.
    """
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(
                f"{path}: is a pickle file; pickles can run code when loaded, so loractl refuses them",
                hint="convert it to safetensors, or pass --allow-pickle if you trust it "
                "(it is then read with torch.load(weights_only=True))",
            )
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise FormatError(
                f"{path}: cannot be read as a weights-only pickle ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FormatError(f"{path}: the pickle does not hold a flat dict of tensors")
        return dict(obj), {}
    from ..io.safetensors import SafetensorsFile

    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}, dict(f.metadata)


def load_adapter(path: str | Path, format: str | None = None, allow_pickle: bool = False) -> Adapter:
    """Read an adapter in any supported layout.

    Args:
        path: a PEFT folder, or a single weights file.
        format: force a format instead of detecting it.
        allow_pickle: accept ``.bin``/``.pt``/``.ckpt`` files (read weights-only).

    Returns:
        The adapter, with module names as PEFT's (no ``base_model.model.`` prefix).

    Raises:
        InputError: missing or unreadable path, pickle without ``allow_pickle``.
        FormatError: corrupt file, unknown layout.
    """
    from . import peft

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder", hint="check the adapter path")
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    cfg_path, weights = peft.find_files(path)
    if weights.suffix not in PICKLE_SUFFIXES and weights.suffix != ".safetensors" and format is None:
        # a file with another suffix: still try safetensors, the header check names the problem
        pass
    tensors, metadata = read_tensors(weights, allow_pickle)
    keys = list(tensors)
    if not keys:
        raise FormatError(f"{weights}: holds no tensors")
    fmt = format or detect(keys, metadata, weights)
    config = peft.read_config(cfg_path, metadata)
    files = [weights] + ([cfg_path] if cfg_path else [])
    return peft.build_adapter(path, tensors, config, metadata, files, weights, fmt)


def detect(keys: list[str], metadata: dict[str, str], source: Path) -> str:
    """The format of a weights file from its keys (and metadata)."""
    from . import peft

    lycoris = [
        k for k in keys if any(t in k for t in (".hada_w1", ".lokr_w1", ".oft_blocks", ".diff", ".a1.weight"))
    ]
    if lycoris:
        raise FormatError(
            f"{source}: a LyCORIS adapter that is not LoRA (tensor {lycoris[0]!r}); "
            "LoHa, LoKr, OFT, GLoRA and full-diff adapters are not LoRA and cannot be handled",
        )
    if any(".lora_down." in k or k.endswith(".alpha") for k in keys):
        raise FormatError(
            f"{source}: a kohya/sd-scripts layout (e.g. {keys[0]!r}); this version reads PEFT adapters only",
            hint="kohya, diffusers, loralib and GGUF support comes in a later release",
        )
    if peft.looks_like_peft(keys):
        return "peft"
    shown = ", ".join(repr(k) for k in keys[:3])
    raise FormatError(
        f"{source}: unknown adapter layout (keys such as {shown})",
        hint="pass --format if you know the format",
    )
