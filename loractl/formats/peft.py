"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a lone safetensors file).

Keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (the prefix is optional, and an
adapter name may sit before ``.weight`` as in memory), ``lora_embedding_A`` / ``lora_embedding_B``,
``lora_B.bias`` (``lora_bias``), ``lora_magnitude_vector`` (DoRA), ``<module>.base_layer.weight``
(saved embedding layers) and plain ``<module>.weight`` copies (``modules_to_save``).

Scale rules (PEFT's ``LoraModel._create_and_replace`` and ``LoraLayer.update_layer``):
``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a key matches
(:func:`pattern_key`, PEFT's ``get_pattern_key``), else from ``r`` and ``lora_alpha``;
``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# init_lora_weights values that change the base weights during training: merging such an adapter
# into the original base is wrong (PEFT's docs: convert with path_initial_model_for_weight_conversion).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_PART = re.compile(
    r"^(?P<mod>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.(?P<leaf>weight|bias))?$"
)


def pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern k with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return None


def strip_prefix(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def looks_like_peft(keys: list[str]) -> bool:
    return any(_PART.match(strip_prefix(k)) for k in keys)


def base_changing_init(config: dict[str, Any]) -> str | None:
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        low = init.lower()
        for name in BASE_CHANGING_INITS:
            if low.startswith(name):
                return init
    if config.get("loftq_config"):
        return "loftq"
    if config.get("lora_ga_config"):
        return "lora_ga"
    return None


def find_files(path: Path) -> tuple[Path | None, Path]:
    """The config (if any) and the weights file of a PEFT adapter given as a folder or a file."""
    if path.is_dir():
        cfg = path / CONFIG
        for name in WEIGHTS:
            if (path / name).exists():
                return (cfg if cfg.exists() else None), path / name
        raise InputError(
            f"{path}: no adapter weights found (expected {' or '.join(WEIGHTS)})",
            hint="point at a PEFT adapter folder or at the adapter's .safetensors file",
        )
    cfg = path.parent / CONFIG
    return (cfg if cfg.exists() else None), path


def read_config(cfg_path: Path | None, metadata: dict[str, str]) -> dict[str, Any]:
    """adapter_config.json, or the PEFT config some writers put in the header (diffusers)."""
    if cfg_path is not None:
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{cfg_path}: not a readable JSON adapter config ({e})") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{cfg_path}: not a JSON object")
        return cfg
    for key in ("lora_adapter_metadata", "peft_config"):
        if key in metadata:
            try:
                cfg = json.loads(metadata[key])
            except json.JSONDecodeError:
                continue
            if isinstance(cfg, dict):
                return cfg
    return {}


def module_alpha_rank(config: dict[str, Any], module: str, rank: int) -> tuple[float, int]:
    """(alpha, r) of a module under the config's patterns; r defaults to the tensors' rank."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = pattern_key(list(rank_pattern), module)
    r = int(rank_pattern[rk]) if rk is not None else int(config.get("r", rank) or rank)
    ak = pattern_key(list(alpha_pattern), module)
    if ak is not None:
        alpha = alpha_pattern[ak]
    else:
        alpha = config.get("lora_alpha", r if config else rank)
    return float(alpha), r


def build_adapter(
    path: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str],
    files: list[Path],
    source: Path,
    fmt: str = "peft",
) -> Adapter:
    """Group PEFT keys into modules and apply the config's scale rules."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = strip_prefix(key)
        m = _PART.match(k)
        if m:
            part = m["part"]
            if part in ("lora_A", "lora_B") and m["leaf"] is None:
                raise FormatError(
                    f"{source}: tensor {key!r} is not a LoRA weight (expected .weight or .bias)"
                )
            slot = f"{part}.{m['leaf']}" if m["leaf"] else part
            parts.setdefault(m["mod"], {})[slot] = t
        elif k.endswith((".weight", ".bias")):
            extra[k.replace(".base_layer.", ".")] = t
        else:
            raise FormatError(f"{source}: tensor {key!r} is not a key of a PEFT LoRA adapter")
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if "lora_embedding_A" in p or "lora_embedding_B" in p:
            kind, a, b = "embedding", p.get("lora_embedding_A"), p.get("lora_embedding_B")
            a_key, b_key = "lora_embedding_A", "lora_embedding_B"
        else:
            a, b = p.get("lora_A.weight"), p.get("lora_B.weight")
            a_key, b_key = "lora_A.weight", "lora_B.weight"
            kind = "conv" if a is not None and a.dim() > 2 else "linear"
        if a is None or b is None:
            missing = a_key if a is None else b_key
            raise FormatError(
                f"{source}: module {name!r} has no {missing} tensor", hint="the adapter is incomplete"
            )
        if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
            raise FormatError(
                f"{source}: module {name!r}: {a_key} {list(a.shape)} and {b_key} {list(b.shape)} "
                "do not have the same rank"
            )
        rank = int(a.shape[0])
        alpha, r_cfg = module_alpha_rank(config, name, rank)
        if config and r_cfg != rank:
            raise FormatError(
                f"{source}: module {name!r} has rank {rank} but the config says r={r_cfg}",
                hint="the config does not belong to these weights",
            )
        modules[name] = LoraModule(
            name=name,
            kind=kind,
            down=a,
            up=b,
            alpha=alpha,
            rslora=rslora,
            fan_in_fan_out=fifo and kind == "linear",
            bias=p.get("lora_B.bias"),
            magnitude=p.get("lora_magnitude_vector"),
        )
    init = base_changing_init(config)
    return Adapter(
        path=path,
        format=fmt,
        modules=modules,
        modules_to_save=extra,
        config=config,
        metadata=metadata,
        files=files,
        init=init,
    )
