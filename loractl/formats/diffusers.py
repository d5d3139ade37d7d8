"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` writes them.

Keys (diffusers 0.42, ``loaders/lora_base.py`` ``_save_lora_weights`` / ``_pack_dict_with_prefix``):
``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` where ``<component>`` is the pipeline
component the module lives in (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2`` ...),
plus PEFT's other parts (``lora_B.bias``, ``lora_magnitude_vector``, ``lora_embedding_A/B``).

Older layouts that diffusers' loaders still convert (``utils/state_dict_utils.py``):
``...attn1.processor.to_q_lora.down.weight`` (attention processors; ``KEYS_TO_ALWAYS_REPLACE`` drops
``.processor.``, ``UNET_TO_DIFFUSERS`` maps ``to_q_lora`` to ``to_q`` and ``to_out_lora`` to ``to_out.0``,
``DIFFUSERS_OLD_TO_DIFFUSERS`` maps them to ``q_proj`` ... ``out_proj`` in text encoders),
``<module>.lora.down.weight`` (``LoRACompatibleLinear``) and ``<module>.lora_linear_layer.down.weight``
(text encoders); ``down`` is A, ``up`` is B.

Scale (``utils/peft_utils.py`` ``_create_lora_config`` / ``get_peft_kwargs``): the component's PEFT
config from the header's ``lora_adapter_metadata`` (JSON; the pipeline writer prefixes every config key
with the component, ``{"unet.r": 4, "unet.lora_alpha": 8, ...}``; a model's ``save_lora_adapter``
writes one unprefixed config); else ``<component>.<module>.alpha`` tensors (Flux-style network alphas:
modules without one get the most common alpha, as ``get_peft_kwargs`` does); else alpha = r (scale 1).

Module names keep the component (``unet.down_blocks.0...``); :class:`~loractl.formats.names.NameResolver`
drops it when the base is the component's own folder. :func:`component_adapters` gives the per-component
adapters with PEFT's (component-relative) names.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError
from ..io.files import loads_json
from . import alpha_value, peft

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from . import ReadOptions, WriteOptions

#: pipeline components diffusers' LoRA loaders load (``_lora_loadable_modules`` in ``lora_pipeline.py``)
COMPONENTS = (
    "unet",
    "transformer",
    "transformer_2",
    "transformer_ref",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "text_conditioner",
    "connectors",
)
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# top-level module names that tell which component a prefix-less module belongs to (for the writer)
_UNET_TOP = {
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
    "encoder_hid_proj",
    "class_embedding",
}
_TEXT_TOP = {"text_model", "encoder", "shared"}
_TRANSFORMER_TOP = {
    "transformer_blocks",
    "single_transformer_blocks",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "pos_embed",
    "proj_out",
    "norm_out",
    "blocks",
}

# attention-processor layout: ``<attn>.processor.to_q_lora.down.weight``
_ATTN_PROC = re.compile(
    r"^(?P<attn>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$"
)
# LoRACompatibleLinear / LoRALinearLayer layouts: ``<module>.lora.down.weight``, ``<module>.lora_linear_layer.up.weight``
_OLD_LINEAR = re.compile(r"^(?P<mod>.+?)\.(?:lora|lora_linear_layer)\.(?P<ud>down|up)\.weight$")
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_SLOT = {"down": "lora_A.weight", "up": "lora_B.weight"}


def _component(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS and "." in key else None


def canonical_key(key: str) -> tuple[str | None, str, bool] | None:
    """``(component, PEFT-style key relative to the component, is_old_layout)`` of a diffusers key, or None.

    ``.processor.`` is dropped first (diffusers' ``KEYS_TO_ALWAYS_REPLACE``); the old layouts are then
    mapped as ``UNET_TO_DIFFUSERS`` (UNets, transformers) and ``DIFFUSERS_OLD_TO_DIFFUSERS`` plus
    ``DIFFUSERS_TO_PEFT`` (text encoders) map them. ``.alpha`` keys keep their name.
    """
    comp = _component(key)
    rel = key[len(comp) + 1 :] if comp else key
    if rel.endswith(".alpha"):
        return comp, rel, False
    m = _ATTN_PROC.match(rel)
    if m:
        table = _TEXT_PROJ if (comp or "").startswith("text_encoder") else _UNET_PROJ
        return comp, f"{m['attn']}.{table[m['proj']]}.{_SLOT[m['ud']]}", True
    rel = rel.replace(".processor.", ".")
    m = _OLD_LINEAR.match(rel)
    if m:
        return comp, f"{m['mod']}.{_SLOT[m['ud']]}", True
    m = peft._PART.match(rel)
    if m and not (m["part"] in ("lora_A", "lora_B") and m["leaf"] is None):
        return comp, rel, False
    return None


def detect(keys: list[str], metadata: dict[str, str]) -> bool:
    """Every LoRA key names its pipeline component (``unet.``, ``transformer.`` ...), or uses one of the
    old layouts only diffusers wrote (``to_q_lora.down``, ``.lora.down``, ``.lora_linear_layer.``).

    PEFT's ``base_model.model.<module>`` keys and prefix-less PEFT keys are left to the PEFT reader.
    """
    if any(k.startswith(peft.PREFIX) for k in keys):
        return False
    seen = False
    for k in keys:
        c = canonical_key(k)
        if c is None:
            continue
        comp, rel, old = c
        if comp is None and not old:
            return False
        seen = seen or not rel.endswith(".alpha")
    return seen


def component_configs(
    metadata: dict[str, str], components: set[str | None], source: Path
) -> dict[str | None, dict[str, Any]]:
    """The PEFT config of each component from the header's ``lora_adapter_metadata``.

    diffusers' pipeline writer prefixes each config key with the component (``unet.r``); its loaders
    take the keys under ``<component>.`` (``load_lora_adapter``: ``metadata = {k.removeprefix(prefix + ".")
    ...}``). An unprefixed config (a model's ``save_lora_adapter``) applies to every component.
    """
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    data = loads_json(raw, f"{source}: header entry {METADATA_KEY!r}")
    if not isinstance(data, dict):
        raise FormatError(f"{source}: header entry {METADATA_KEY!r} is not a JSON object")
    out: dict[str | None, dict[str, Any]] = {}
    for comp in components:
        if comp is None:
            continue
        sub = {k[len(comp) + 1 :]: v for k, v in data.items() if k.startswith(comp + ".")}
        if sub:
            out[comp] = sub
    if not out and ("r" in data or "lora_alpha" in data or "peft_type" in data):
        out = {comp: data for comp in components}
    for comp, cfg in out.items():
        peft.check_config(cfg, f"{source}: header entry {METADATA_KEY!r}" + (f" ({comp}.*)" if comp else ""))
    return out


def read(
    path: Path,
    weights: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    options: ReadOptions,
) -> Adapter:
    """A diffusers LoRA file: modules named ``<component>.<module>``, scales from the header config,
    else ``.alpha`` tensors, else alpha = r.

    A file beside an ``adapter_config.json`` is a PEFT adapter whatever its keys look like (transformers'
    PEFT integration saves prefix-less keys such as ``transformer.h.0...``): it is read as PEFT.
    """
    cfg_path, _ = peft.find_files(path)
    if cfg_path is not None:
        return peft.read(path, weights, tensors, metadata, options)
    groups: dict[str | None, dict[str, torch.Tensor]] = {}
    alphas: dict[str | None, dict[str, torch.Tensor]] = {}
    origin: dict[tuple[str | None, str], str] = {}
    for key, t in tensors.items():
        c = canonical_key(key)
        if c is None:
            raise FormatError(
                f"{weights}: tensor {key!r} is not a LoRA tensor of a diffusers adapter",
                hint="diffusers LoRA files hold only <component>.<module>.lora_A/lora_B tensors",
            )
        comp, rel, _ = c
        if rel.endswith(".alpha"):
            alphas.setdefault(comp, {})[rel[: -len(".alpha")]] = t
            continue
        if (comp, rel) in origin:
            raise FormatError(f"{weights}: tensors {origin[comp, rel]!r} and {key!r} are the same LoRA part")
        origin[comp, rel] = key
        groups.setdefault(comp, {})[rel] = t
    configs = component_configs(metadata, set(groups), weights)
    modules: dict[str, LoraModule] = {}
    init: str | None = None
    for comp, sub in sorted(groups.items(), key=lambda kv: kv[0] or ""):
        config = configs.get(comp, {})
        part = peft.build_adapter(path, sub, config, metadata, [weights], weights, fmt="diffusers")
        values: dict[str, float] = {}
        for rel, t in alphas.get(comp, {}).items():
            if rel not in part.modules:
                raise FormatError(
                    f"{weights}: tensor {_full(comp, rel + '.alpha')!r} belongs to no LoRA module"
                )
            if t.numel() != 1:
                raise FormatError(
                    f"{weights}: tensor {_full(comp, rel + '.alpha')!r} has shape {list(t.shape)}, not a scalar"
                )
            values[rel] = alpha_value(t, _full(comp, rel + ".alpha"), weights)
        if values and config:  # the header wins; alpha tensors that disagree with it are an error
            for rel, alpha in values.items():
                if alpha != part.modules[rel].alpha:
                    raise FormatError(
                        f"{weights}: tensor {_full(comp, rel + '.alpha')!r} says alpha={alpha:g} but the "
                        f"header's {METADATA_KEY} gives {part.modules[rel].alpha:g}",
                        hint="the header config does not belong to these weights",
                    )
        elif values:  # get_peft_kwargs: modules without an alpha tensor get the most common alpha
            common = Counter(values.values()).most_common(1)[0][0]
            for rel, m in part.modules.items():
                m.alpha = values.get(rel, common)
        init = init or part.init
        for rel, m in part.modules.items():
            name = _full(comp, rel)
            modules[name] = replace(m, name=name)
    return Adapter(
        path=path,
        format="diffusers",
        modules=modules,
        config={comp or "": cfg for comp, cfg in configs.items()},
        metadata=metadata,
        files=[weights],
        init=init,
    )


def _full(comp: str | None, rel: str) -> str:
    return f"{comp}.{rel}" if comp else rel


def _guess_component(name: str, options: WriteOptions | None) -> str | None:
    """The component a module without a component prefix belongs to: from the base's config
    (diffusers ``_class_name``, transformers ``architectures``), else from its top-level module name."""
    cfg = options.base_config if options is not None else {}
    cls = str(cfg.get("_class_name") or "")
    listed = cfg.get("architectures")
    archs = " ".join(str(a) for a in listed) if isinstance(listed, list) else ""
    if cls.startswith("UNet"):
        return "unet"
    if "Transformer" in cls:
        return "transformer"
    if "TextModel" in archs or "EncoderModel" in archs or "CLIPText" in archs or "T5Encoder" in archs:
        return "text_encoder"
    top = name.split(".", 1)[0]
    if top in _UNET_TOP:
        return "unet"
    if top in _TEXT_TOP:
        return "text_encoder"
    if top in _TRANSFORMER_TOP:
        return "transformer"
    return None


def component_adapters(adapter: Adapter, options: WriteOptions | None = None) -> dict[str, Adapter]:
    """One adapter per pipeline component, its modules named as PEFT names them in that component's model.

    Module names that start with a component (``unet.down_blocks...``) go to it with the prefix dropped;
    names without one go to the component the base's config or their top-level name shows.

    Raises:
        FormatError: a module whose component cannot be told (pass the base so its config shows it).
    """
    out: dict[str, dict[str, LoraModule]] = {}
    for name, m in adapter.modules.items():
        comp = _component(name)
        rel = name[len(comp) + 1 :] if comp else name
        if comp is None:
            comp = _guess_component(name, options)
        if comp is None:
            raise FormatError(
                f"{adapter.path}: module {name!r}: cannot tell which pipeline component "
                f"({', '.join(COMPONENTS[:4])} ...) it belongs to",
                hint="prefix the module names with the component (unet., text_encoder. ...)"
                if options is not None and options.base_config
                else "give the base model (--base) so its config names the component, or prefix the module names",
            )
        if rel in out.setdefault(comp, {}):
            raise FormatError(f"{adapter.path}: module {name!r} appears twice in component {comp!r}")
        out[comp][rel] = replace(m, name=rel)
    return {
        comp: Adapter(
            path=adapter.path,
            format="diffusers",
            modules=mods,
            metadata=adapter.metadata,
            files=adapter.files,
            init=adapter.init,
        )
        for comp, mods in sorted(out.items())
    }


def _config_names(comp: str, sub: Adapter) -> Adapter:
    """``sub`` with the names its config should use: a text encoder's leading ``text_model.`` dropped.

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model``); diffusers then strips ``text_model.``
    from the tensor keys but not from the config, so exact names with it match nothing. Without it they
    match both layouts (PEFT: a target matches a module name that ends with ``.<target>``; patterns are
    ``(.*\\.)?(k)$``), while the tensor keys keep the names the adapter had.
    """
    if not comp.startswith("text_encoder"):
        return sub
    mods = {
        n.removeprefix("text_model."): replace(m, name=n.removeprefix("text_model."))
        for n, m in sub.modules.items()
    }
    if len(mods) != len(sub.modules):
        return sub
    return replace(sub, modules=mods)


def write(adapter: Adapter, out: Path, options: WriteOptions) -> None:
    """One ``pytorch_lora_weights.safetensors``-style file at ``out``, as diffusers' ``save_lora_weights``
    writes it: ``<component>.<module>.lora_A.weight`` ... and, in the header, ``lora_adapter_metadata``
    with each component's PEFT config under ``<component>.`` keys (``json.dumps(indent=2, sort_keys=True)``).

    Each component's config is :func:`loractl.formats.peft.peft_config` of its sub-adapter: per-module
    ``rank_pattern`` / ``alpha_pattern`` entries make diffusers' ``load_lora_weights`` give every module
    the scale it has here. No ``.alpha`` tensors are written: diffusers' Stable Diffusion loaders refuse
    keys without ``lora`` in them.

    Raises:
        FormatError: ``modules_to_save`` tensors (diffusers' loaders accept only LoRA tensors), or a
            module whose component cannot be told.
    """
    from ..io.safetensors import write_file

    if adapter.modules_to_save:
        key = sorted(adapter.modules_to_save)[0]
        raise FormatError(
            f"{adapter.path}: tensor {key!r} is a full module copy (modules_to_save); diffusers LoRA files "
            "hold only LoRA tensors",
            hint="write it as a PEFT adapter (--to peft), or merge it",
        )
    if init := adapter.init:
        raise FormatError(
            f"{adapter.path}: trained with init_lora_weights={init!r}, which changes the base weights; "
            "a diffusers LoRA file cannot say so"
        )
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for comp, sub in component_adapters(adapter, options).items():
        cfg = peft.peft_config(_config_names(comp, sub))
        for key, value in cfg.items():
            config[f"{comp}.{key}"] = value
        for key, t in peft.peft_tensors(sub).items():
            tensors[f"{comp}.{key[len(peft.PREFIX) :]}"] = t
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith("loractl.") and k != METADATA_KEY}
    meta.update(options.metadata)
    meta["format"] = "pt"
    meta[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    write_file(out, dict(sorted(tensors.items())), meta)
