"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a lone safetensors file).

Keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (the prefix is optional, and an
adapter name may sit before ``.weight`` as in memory), ``lora_embedding_A`` / ``lora_embedding_B``,
``lora_B.bias`` (``lora_bias``), ``lora_magnitude_vector`` (DoRA), ``<module>.base_layer.weight``
(saved embedding layers) and plain ``<module>.weight`` copies (``modules_to_save``).

Scale rules (PEFT's ``LoraModel._create_and_replace`` and ``LoraLayer.update_layer``):
``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a key matches
(:func:`pattern_key`, PEFT's ``get_pattern_key``), else from ``r`` and ``lora_alpha``;
``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

LoRAs on parameters (``target_parameters``: MoE experts, routers) are saved under their module's name,
several parameters of one module nested as ``<module>.base_layer.lora_*`` (the first) and
``<module>.lora_*`` (the next); they are read as one module per parameter, named by the parameter, with
``experts`` = E (:mod:`loractl.formats.experts` decides which parameter a key holds).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError, InputError, UsageError
from ..io.files import loads_json, read_json
from . import experts as experts_fmt
from .patterns import PatternError, matches

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from . import ReadOptions, WriteOptions

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors")
# init_lora_weights values that change the base weights during training: merging such an adapter
# into the original base is wrong (PEFT's docs: convert with path_initial_model_for_weight_conversion).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_PART = re.compile(
    r"^(?P<mod>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.(?P<leaf>weight|bias))?$"
)


def pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern k with ``re.match(rf"(.*\\.)?({k})$", module)``,
    decided without exponential backtracking (:func:`loractl.formats.patterns.matches`).

    Raises:
        PatternError: a key that is not a regular expression, or one that could take forever.
    """
    for k in patterns:
        if matches(k, module):
            return k
    return None


def strip_prefix(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def detect(keys: list[str], metadata: dict[str, str]) -> bool:
    """PEFT keys: ``<module>.lora_A.weight`` and friends, with or without ``base_model.model.``."""
    return any(_PART.match(strip_prefix(k)) for k in keys)


def read(
    path: Path,
    weights: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    options: ReadOptions,
) -> Adapter:
    """A PEFT adapter; its config from ``adapter_config.json`` beside the weights, or from the header.

    Without either, the scale alpha/r is unknown (PEFT itself cannot load such a folder): the
    adapter is refused unless ``options.alpha`` states alpha, or only one factor is read
    (``options.only_factor``, for analyses that need no scale).

    Raises:
        InputError: no config and no ``options.alpha``.
        UsageError: ``options.alpha`` given for an adapter whose config states its alpha.
        FormatError: see :func:`read_config` and :func:`build_adapter`.
    """
    cfg_path, _ = find_files(path)
    config = read_config(cfg_path, metadata)
    if config and options.alpha is not None:
        stated = cfg_path if cfg_path is not None else f"the header of {weights}"
        raise UsageError(
            f"{path}: states its own lora_alpha in {stated}; --alpha is for adapters that do not",
            hint="leave out --alpha, or edit lora_alpha in the config",
        )
    if options.alpha is not None and (isinstance(options.alpha, bool) or not math.isfinite(options.alpha)):
        raise UsageError(f"--alpha {options.alpha} is not a finite number")
    files = [weights] + ([cfg_path] if cfg_path else [])
    model_type = experts_fmt.model_type_of(options.base_config) if options.base_config else None
    adapter = build_adapter(path, tensors, config, metadata, files, weights, alpha=options.alpha, model_type=model_type)
    if not config and options.alpha is None and options.only_factor is None:
        raise InputError(
            f"{path}: a PEFT adapter without {CONFIG} (and no config in the header of {weights.name}): "
            "its lora_alpha, and so its scale alpha/r, is unknown",
            hint=f"put its {CONFIG} beside it, or pass --alpha A (the lora_alpha it was trained with; "
            "--alpha equal to the rank means scale 1)",
        )
    return adapter


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
        from ..io.base import looks_like_base

        if looks_like_base(path):
            raise InputError(
                f"{path}: is a base model folder (model weights, no adapter files), not an adapter",
                hint="were the arguments swapped? the model comes first, then the adapters (loractl merge BASE ADAPTER -o OUT)",
            )
        raise InputError(
            f"{path}: no adapter weights found (expected {' or '.join(WEIGHTS)})",
            hint="point at a PEFT adapter folder or at the adapter's .safetensors file",
        )
    if path.suffix == ".json":
        raise InputError(
            f"{path}: is a JSON file, not the adapter's weights",
            hint=f"pass the folder that holds it ({path.parent}), or the adapter's .safetensors file",
        )
    cfg = path.parent / CONFIG
    return (cfg if cfg.exists() else None), path


def read_config(cfg_path: Path | None, metadata: dict[str, str]) -> dict[str, Any]:
    """adapter_config.json, or the PEFT config some writers put in the header (diffusers), checked
    by :func:`check_config`; ``{}`` when there is neither.

    Raises:
        InputError: the config file is not a readable regular file.
        FormatError: not a JSON object, or a value of the wrong type or range.
    """
    if cfg_path is not None:
        cfg = read_json(cfg_path, CONFIG)
        if not isinstance(cfg, dict):
            raise FormatError(f"{cfg_path}: not a JSON object")
        return check_config(cfg, cfg_path)
    for key in ("lora_adapter_metadata", "peft_config"):
        if key in metadata:
            where = f"header entry {key}"
            cfg = loads_json(metadata[key], where)
            if not isinstance(cfg, dict):
                raise FormatError(f"{where}: not a JSON object")
            return check_config(cfg, where)
    return {}


#: config keys PEFT reads as booleans (``null`` is read as false, as PEFT's truth tests do)
BOOL_KEYS = ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "inference_mode")
#: config keys that name modules: a list of strings or null (``target_modules`` and
#: ``exclude_modules`` may also be one string, a regular expression)
NAME_LIST_KEYS = {
    "modules_to_save": False,
    "target_modules": True,
    "exclude_modules": True,
    "target_parameters": False,
}


def _bad(source: Path | str, key: str, value: Any, want: str) -> FormatError:
    """``<source>: <key> is <value as JSON>, not <want>``."""
    shown = json.dumps(value, default=repr)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if isinstance(value, str):
        shown += " (a string)"
    return FormatError(f"{source}: {key} is {shown}, not {want}", hint="fix the adapter config")


def check_number(value: Any, key: str, source: Path | str, *, positive: bool) -> float:
    """A finite JSON number (not a boolean, not a string), positive if asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(source, key, value, "a finite number")
    if positive and value <= 0:
        raise _bad(source, key, value, "a positive number")
    return float(value)


def check_rank(value: Any, key: str, source: Path | str) -> int:
    """A positive JSON integer (PEFT's ``update_layer`` refuses r <= 0; a float is no layer width)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(source, key, value, "a positive integer")
    return value


def check_config(cfg: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """Every value loractl reads from a PEFT config, typed and in range as PEFT's ``LoraConfig`` needs
    it: ``r`` and ``rank_pattern`` values positive integers, ``lora_alpha`` and ``alpha_pattern``
    values finite numbers, the flags booleans, module lists lists of strings, pattern keys regular
    expressions that cannot take forever (:mod:`loractl.formats.patterns`).

    Returns:
        ``cfg`` itself.

    Raises:
        FormatError: naming the key and its value.
    """
    if "r" in cfg:
        check_rank(cfg["r"], "r", source)
    if "lora_alpha" in cfg:
        check_number(cfg["lora_alpha"], "lora_alpha", source, positive=False)
    for name in ("rank_pattern", "alpha_pattern"):
        pats = cfg.get(name)
        if pats is None:
            continue
        if not isinstance(pats, dict):
            raise _bad(source, name, pats, "an object of patterns")
        for k, v in pats.items():
            if name == "rank_pattern":
                check_rank(v, f"{name}[{k!r}]", source)
            else:
                check_number(v, f"{name}[{k!r}]", source, positive=False)
            try:
                matches(k, "")
            except PatternError as e:
                raise FormatError(f"{source}: {name} key {k!r}: {e}", hint="fix the adapter config") from None
    for name in BOOL_KEYS:
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            raise _bad(source, name, cfg[name], "true or false")
    for name, may_be_regex in NAME_LIST_KEYS.items():
        v = cfg.get(name)
        if v is None or (may_be_regex and isinstance(v, str)):
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            want = (
                "a list of module names, a regular expression or null"
                if may_be_regex
                else "a list of module names or null"
            )
            raise _bad(source, name, v, want)
    init = cfg.get("init_lora_weights", True)
    if init is not None and not isinstance(init, (bool, str)):
        raise _bad(source, "init_lora_weights", init, "true, false or the name of an initialisation")
    return cfg


def module_alpha_rank(
    config: dict[str, Any], module: str, rank: int, source: Path | str = "adapter_config.json"
) -> tuple[float, int]:
    """(alpha, r) of a module under a config checked by :func:`check_config`; r defaults to the
    tensors' rank and alpha to PEFT's default 8."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    try:
        rk = pattern_key(list(rank_pattern), module)
        ak = pattern_key(list(alpha_pattern), module)
    except PatternError as e:
        raise FormatError(f"{source}: a rank_pattern/alpha_pattern key, on module {module!r}: {e}") from None
    r = int(rank_pattern[rk]) if rk is not None else int(config.get("r", rank))
    alpha = float(alpha_pattern[ak]) if ak is not None else float(config.get("lora_alpha", 8))
    return alpha, r


def build_adapter(
    path: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str],
    files: list[Path],
    source: Path,
    fmt: str = "peft",
    alpha: float | None = None,
    model_type: str | None = None,
) -> Adapter:
    """Group PEFT keys into modules and apply the config's scale rules (a config checked by
    :func:`check_config`). Without a config, every module's alpha is ``alpha`` (given by the
    user), or r when ``alpha`` is None (diffusers' convention; a PEFT reader refuses that case).
    Keys of targeted parameters (``target_parameters``) become one module per parameter
    (:func:`parameter_module`); ``model_type`` (the base's, when known) says which parameters an
    experts module has."""
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
            extra[k] = t  # ".base_layer." keys are saved embedding layers
        else:
            raise FormatError(f"{source}: tensor {key!r} is not a key of a PEFT LoRA adapter")
    params: dict[str, str | None] = {}
    if config.get("target_parameters"):
        prefixes = [n for n, p in parts.items() if "lora_A.weight" in p or "lora_B.weight" in p]
        params = experts_fmt.parameters_of(prefixes, config["target_parameters"], model_type, source=str(source))
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    cfg_source = files[-1] if len(files) > 1 else source
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        param = params.get(name)
        if param is not None:
            modules[param] = parameter_module(param, name, p, config, rslora, source, cfg_source)
            continue
        if "lora_embedding_A" in p or "lora_embedding_B" in p:
            kind, a, b = "embedding", p.get("lora_embedding_A"), p.get("lora_embedding_B")
            a_key, b_key = "lora_embedding_A", "lora_embedding_B"
        else:
            a, b = p.get("lora_A.weight"), p.get("lora_B.weight")
            a_key, b_key = "lora_A.weight", "lora_B.weight"
            kind = "conv" if a is not None and a.dim() > 2 else "linear"
        a, b = _factor_pair(name, a, b, a_key, b_key, source)
        rank = int(a.shape[0])
        if config:
            m_alpha, r_cfg = module_alpha_rank(config, name, rank, cfg_source)
        else:
            m_alpha, r_cfg = (float(alpha) if alpha is not None else float(rank)), rank
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
            alpha=m_alpha,
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


def _factor_pair(
    name: str, a: torch.Tensor | None, b: torch.Tensor | None, a_key: str, b_key: str, source: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's two factors, both present and of one rank (``A.shape[0] == B.shape[1]``).

    Raises:
        FormatError: naming the module and the tensor.
    """
    if a is None or b is None:
        missing = a_key if a is None else b_key
        raise FormatError(f"{source}: module {name!r} has no {missing} tensor", hint="the adapter is incomplete")
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
        raise FormatError(
            f"{source}: module {name!r}: {a_key} {list(a.shape)} and {b_key} {list(b.shape)} "
            "do not have the same rank"
        )
    return a, b


#: what PEFT's ``ParamWrapper`` never saves (it refuses ``lora_bias``, DoRA and embeddings)
_NOT_PARAMETER = ("lora_B.bias", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def parameter_module(
    param: str,
    prefix: str,
    p: dict[str, torch.Tensor],
    config: dict[str, Any],
    rslora: bool,
    source: Path,
    cfg_source: Path,
) -> LoraModule:
    """The LoRA of one targeted parameter (PEFT ``lora.ParamWrapper``): ``lora_A`` [r·E, in] and ``lora_B``
    [out, r·E] as stored, r and alpha from the config matched against the parameter's name (PEFT's
    ``LoraModel._create_and_replace`` uses the parameter's full name as the key for ``rank_pattern`` /
    ``alpha_pattern``), E = ``lora_A.shape[0] // r``.

    Raises:
        FormatError: missing or 3-D factors, factors of other ranks, rows that are no multiple of r, a
            bias or magnitude PEFT never saves for a parameter.
    """
    where = f"{source}: parameter {param!r} (tensors {PREFIX}{prefix}.lora_*)"
    a, b = _factor_pair(param, p.get("lora_A.weight"), p.get("lora_B.weight"), "lora_A.weight", "lora_B.weight", source)
    odd = [k for k in p if k in _NOT_PARAMETER]
    if odd:
        raise FormatError(f"{where}: has a {odd[0]} tensor, which PEFT's ParamWrapper never saves")
    if a.dim() != 2 or b.dim() != 2:
        raise FormatError(f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not 2-D")
    alpha, r = module_alpha_rank(config, param, 8, cfg_source)  # LoraConfig's default r is 8
    if a.shape[0] % r:
        raise FormatError(
            f"{where}: lora_A has {a.shape[0]} rows, not a multiple of r={r} (the config's rank per expert)",
            hint="the config does not belong to these weights",
        )
    return LoraModule(
        name=param, kind="linear", down=a, up=b, alpha=alpha, rslora=rslora, experts=int(a.shape[0]) // r
    )


def _most_common(values: list[Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """An ``adapter_config.json`` under which PEFT gives every module the scale it has here.

    ``r`` and ``lora_alpha`` are the most common values; other modules get exact-name entries in
    ``rank_pattern`` / ``alpha_pattern`` (``re.escape`` of the full module name, which PEFT's
    ``get_pattern_key`` matches only for that module). Modules whose rsLoRA flag differs from the
    adapter's get the alpha that gives the same scale under it.
    """
    mods = list(adapter.modules.values())
    if any(m.fan_in_fan_out for m in mods) and not all(m.fan_in_fan_out for m in mods if m.kind == "linear"):
        raise FormatError(
            f"{adapter.path}: mixes fan_in_fan_out and ordinary linear modules; a PEFT config has one flag"
        )
    rslora = bool(mods) and _most_common([m.rslora for m in mods])
    alphas: dict[str, float] = {}
    for m in mods:
        if m.rslora == rslora:
            alphas[m.name] = m.alpha
        else:  # same scale under the adapter-wide rule
            alphas[m.name] = m.scale * (math.sqrt(m.rank) if rslora else m.rank)
    r = _most_common([m.rank for m in mods]) if mods else 8
    alpha = _most_common(list(alphas.values())) if mods else 8
    cfg: dict[str, Any] = {k: v for k, v in adapter.config.items()} if adapter.format == "peft" else {}
    cfg.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {re.escape(m.name): m.rank for m in mods if m.rank != r},
            "alpha_pattern": {re.escape(m.name): alphas[m.name] for m in mods if alphas[m.name] != alpha},
            "target_modules": sorted(m.name for m in mods if not m.experts),
            "use_rslora": rslora,
            "use_dora": any(m.is_dora for m in mods),
            "fan_in_fan_out": any(m.fan_in_fan_out for m in mods),
            "lora_bias": any(m.bias is not None for m in mods),
            "modules_to_save": sorted(
                {k.rsplit(".", 1)[0] for k in adapter.modules_to_save if ".base_layer." not in k}
            )
            or None,
        }
    )
    params = sorted(m.name for m in mods if m.experts)
    if params or cfg.get("target_parameters"):  # parameters are named in full: PEFT matches them exactly
        cfg["target_parameters"] = params or None
    cfg.setdefault("bias", "none")
    cfg.setdefault("inference_mode", True)
    cfg.setdefault("init_lora_weights", True)
    cfg.setdefault("task_type", None)
    cfg.setdefault("base_model_name_or_path", None)
    return cfg


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names (a parameter's LoRA under its module's name, nested
    as PEFT nests its wrappers: :func:`loractl.formats.experts.saved_prefixes`)."""
    out: dict[str, torch.Tensor] = {}
    nested = experts_fmt.saved_prefixes([m.name for m in adapter.modules.values() if m.experts])
    for name, m in sorted(adapter.modules.items()):
        p = PREFIX + nested.get(name, name)
        if m.kind == "embedding":
            out[f"{p}.lora_embedding_A"] = m.down
            out[f"{p}.lora_embedding_B"] = m.up
        else:
            out[f"{p}.lora_A.weight"] = m.down
            out[f"{p}.lora_B.weight"] = m.up
        if m.bias is not None:
            out[f"{p}.lora_B.bias"] = m.bias
        if m.magnitude is not None:
            out[f"{p}.lora_magnitude_vector"] = m.magnitude
    for key, t in sorted(adapter.modules_to_save.items()):
        out[PREFIX + key] = t
    return {k: v.contiguous() for k, v in out.items()}


def write(adapter: Adapter, out: Path, options: WriteOptions) -> None:
    """A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) at ``out``; or, when
    ``out`` ends in ``.safetensors``, one file with the config in its header (``lora_adapter_metadata``)."""
    from ..io.safetensors import write_file

    cfg = peft_config(adapter)
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith("loractl.")}
    meta.update(options.metadata)
    meta.setdefault("format", "pt")
    if (options.target or out).suffix == ".safetensors":
        meta["lora_adapter_metadata"] = json.dumps(cfg)
        write_file(out, peft_tensors(adapter), meta)
        return
    out.mkdir()
    write_file(out / WEIGHTS[0], peft_tensors(adapter), meta)
    (out / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
