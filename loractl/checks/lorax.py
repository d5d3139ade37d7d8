"""What LoRAX accepts, read from its source (predibase/lorax): ``server/lorax_server/adapters/lora.py``
(``LoraConfig``, ``LoraWeights.load``), ``server/lorax_server/utils/punica.py`` (``pad_rank``, rank
limits), ``server/lorax_server/models/model.py`` (``Model.load_adapter``) and the ``flash_*.py``
models' ``ADAPTER_LAYERS``.

Rules, in order: ``lorax-layout`` (:data:`LAYOUT`), ``lorax-rank-padding`` and ``lorax-rank-max``
(:func:`rank`), ``lorax-mixed-ranks`` and ``lorax-partial-layers`` (:func:`layers`),
``lorax-patterns-ignored`` (:data:`PATTERNS`), ``lorax-dora``, ``lorax-lora-bias`` and
``lorax-modules-to-save`` (:func:`ignored`), ``lorax-unknown-module`` and ``lorax-modules-unchecked``
(:data:`UNKNOWN`), ``lorax-expert-lora`` (:func:`experts`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..formats.gguf import MAX_LAYERS, config_count
from .findings import Context, Finding, few
from .runtime import (
    QKV_GATE_UP,
    expert_loras,
    layout,
    patterns_ignored,
    saved_biases,
    saved_modules,
    unknown_modules,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import LoraModule

#: server/lorax_server/utils/punica.py
LORAX_MIN_SGMV_RANK = 8
LORAX_SGMV_BLOCK_SIZE = 16
LORAX_MAX_RANK_CUSTOM = 128
_LLAMA_LORAX = frozenset(QKV_GATE_UP + ("lm_head",))
#: ``ADAPTER_LAYERS`` of LoRAX's models (server/lorax_server/models/flash_llama.py,
#: flash_mistral.py, flash_qwen2.py, flash_gemma.py, flash_gemma2.py, flash_phi3.py): the only
#: modules ``LoraConfig.map_weights_for_model`` picks up
LORAX_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LORAX,
    "MistralForCausalLM": _LLAMA_LORAX,
    "Qwen2ForCausalLM": _LLAMA_LORAX,
    "GemmaForCausalLM": frozenset(QKV_GATE_UP),
    "Gemma2ForCausalLM": frozenset(QKV_GATE_UP),
    "Phi3ForCausalLM": frozenset(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}
_LAYER = re.compile(r"^(?P<pre>.*?\.(?:layers|h|layer|blocks)\.)(?P<idx>\d+)(?P<post>\..+)$")
IGNORED = "LoRAX ignores it silently (only a log warning), so it serves a different model than was trained"

#: ``lorax-layout`` (error): ``LoraConfig.load`` reads adapter_config.json with PEFT's
#: ``LoraConfig.from_pretrained``; weights are the folder's ``.safetensors`` files.
LAYOUT = layout("lorax-layout", "LoRAX", "adapter_config.json + .safetensors weights")


def lorax_padded_rank(rank: int, world_size: int = 1) -> int:
    """The rank LoRAX pads a module to (``pad_to_min_rank`` in server/lorax_server/utils/punica.py):
    ``MIN_SGMV_RANK·world_size`` when at or below it, else the next multiple of ``SGMV_BLOCK_SIZE`` (16)."""
    min_rank = LORAX_MIN_SGMV_RANK * world_size
    if rank <= min_rank:
        return min_rank
    return -(-rank // LORAX_SGMV_BLOCK_SIZE) * LORAX_SGMV_BLOCK_SIZE


def rank(ctx: Context) -> list[Finding]:
    """``lorax-rank-padding`` (warning): with its SGMV kernels LoRAX zero-pads every module's A and B
    (``LoraWeights.load`` → ``pad_rank``) to ``MIN_SGMV_RANK`` (8) or the next multiple of
    ``SGMV_BLOCK_SIZE`` (16); the update is unchanged but memory and compute are spent on the padding,
    and the padded rank is what counts against LoRAX's limits. ``lorax-rank-max`` (warning): above
    ``MAX_RANK_CUSTOM`` = ``BGMV_MAX_RANK`` = 128 ``BatchLoraWeights.can_vectorize`` is False and
    LoRAX leaves its batched kernels for a per-adapter loop (slower, not an error)."""
    mods = list(ctx.adapter.modules.values())
    if not mods:
        return []
    top = max(mods, key=lambda m: m.rank)
    need = lorax_padded_rank(top.rank)
    out = [
        Finding(
            "lorax-rank-padding",
            "warning",
            m.name,
            f"module {m.name!r} has rank {m.rank}; LoRAX's SGMV kernels pad it with zeros to "
            f"{lorax_padded_rank(m.rank)} (ranks at most {LORAX_MIN_SGMV_RANK} go to {LORAX_MIN_SGMV_RANK}, "
            f"larger ones to a multiple of {LORAX_SGMV_BLOCK_SIZE})",
            ctx.cmd("convert", "-o", "OUT", "--to", "peft", "--pad-rank", str(need))
            if need <= LORAX_MAX_RANK_CUSTOM
            else None,
        )
        for m in mods
        if lorax_padded_rank(m.rank) != m.rank
    ]
    if need > LORAX_MAX_RANK_CUSTOM:
        out.append(
            Finding(
                "lorax-rank-max",
                "warning",
                top.name,
                f"module {top.name!r} has rank {top.rank} (padded {need}); LoRAX's batched kernels go up to "
                f"rank {LORAX_MAX_RANK_CUSTOM} (MAX_RANK_CUSTOM), above it LoRAX falls back to a slower path",
                ctx.cmd("truncate", "-o", "OUT", "--rank", str(LORAX_MAX_RANK_CUSTOM)),
            )
        )
    return out


def _layer_count(ctx: Context) -> int | None:
    if ctx.base is None:
        return None
    cfg = ctx.base.config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        for c in (cfg, text):
            if c.get(key) is not None:
                return config_count(cfg, key, c[key], MAX_LAYERS)
    return None


def _by_layer_type(ctx: Context) -> dict[str, dict[int, LoraModule]]:
    """Modules grouped by layer type (``model.layers.*.self_attn.q_proj``), then by layer number."""
    groups: dict[str, dict[int, LoraModule]] = {}
    for m in ctx.adapter.modules.values():
        hit = _LAYER.match(m.name)
        if hit is not None:
            groups.setdefault(hit["pre"] + "*" + hit["post"], {})[int(hit["idx"])] = m
    return groups


def layers(ctx: Context) -> list[Finding]:
    """``lorax-mixed-ranks`` (error): one layer type's modules are stacked across layers
    (``torch.stack`` in ``LoraWeights.__init__``), which fails when their padded ranks differ.
    ``lorax-partial-layers`` (error): ``LoraWeights.load`` returns None for a layer type as soon as
    one layer lacks it, so a module type adapted on only some layers is dropped everywhere
    (``Model.load_adapter`` only logs "unused adapter weights"). The layer count comes from the base's
    config.json for the architectures of :data:`LORAX_MODULES`; otherwise only layers that other
    modules of the adapter cover are compared."""
    groups = _by_layer_type(ctx)
    # every layer has every adapter layer type only in the homogeneous models of LORAX_MODULES
    n_layers = _layer_count(ctx) if ctx.arch in LORAX_MODULES else None
    all_layers = set(range(n_layers)) if n_layers else {i for g in groups.values() for i in g}
    out: list[Finding] = []
    for pattern, by_layer in groups.items():
        first = by_layer[min(by_layer)]
        padded = {lorax_padded_rank(m.rank) for m in by_layer.values()}
        if len(padded) > 1:
            out.append(
                Finding(
                    "lorax-mixed-ranks",
                    "error",
                    first.name,
                    f"modules {pattern!r} (e.g. {first.name!r}) have ranks "
                    f"{sorted({m.rank for m in by_layer.values()})} across layers "
                    f"(padded {sorted(padded)}); LoRAX stacks one layer type into one tensor and cannot load them",
                    ctx.cmd("convert", "-o", "OUT", "--to", "peft", "--pad-rank", str(max(padded))),
                )
            )
        missing = sorted(all_layers - set(by_layer))
        if missing:
            out.append(
                Finding(
                    "lorax-partial-layers",
                    "error",
                    first.name,
                    f"modules {pattern!r} ({few([m.name for m in by_layer.values()])}) are adapted on "
                    f"{len(by_layer)} layers but not on layers "
                    f"{', '.join(map(str, missing[:8]))}{'...' if len(missing) > 8 else ''}; LoRAX loads a layer "
                    "type only when every layer has it and silently drops all of these",
                )
            )
    return out


#: ``lorax-patterns-ignored`` (warning): the scale is ``get_scaling_factor(config.lora_alpha,
#: config.r)`` for every module; ``rank_pattern``/``alpha_pattern`` are not read.
PATTERNS = patterns_ignored(
    "lorax-patterns-ignored",
    "LoRAX scales every module by the config's lora_alpha/r = {served:g} (rank_pattern/alpha_pattern not read)",
)


def ignored(ctx: Context) -> list[Finding]:
    """``lorax-dora``, ``lorax-lora-bias``, ``lorax-modules-to-save`` (errors):
    ``LoraConfig.map_weights_for_model`` takes only ``lora_A.weight``/``lora_B.weight`` of the model's
    ``ADAPTER_LAYERS``; magnitude vectors, biases, saved full tensors are silently ignored (a log
    warning), so the served model is not the trained one."""
    out: list[Finding] = []
    for m in ctx.adapter.modules.values():
        if m.is_dora:
            out.append(Finding("lorax-dora", "error", m.name, f"module {m.name!r} is DoRA; {IGNORED}"))
        if m.bias is not None:
            out.append(Finding("lorax-lora-bias", "error", m.name, f"module {m.name!r} has lora_B.bias; {IGNORED}"))
    out += [
        Finding("lorax-modules-to-save", "error", name, f"module {name!r} is saved whole (modules_to_save); {IGNORED}")
        for name in saved_modules(ctx.adapter)
    ]
    out += [
        Finding(
            "lorax-modules-to-save",
            "error",
            name,
            f"module {name!r} has a trained bias saved in the adapter (PEFT bias='all'/'lora_only'); {IGNORED}",
        )
        for name in saved_biases(ctx.adapter)
    ]
    return out


#: ``lorax-unknown-module`` (error): modules outside the model's ``ADAPTER_LAYERS`` (and embedding
#: LoRAs) are silently ignored; ``lorax-modules-unchecked`` (info) when the architecture is unknown.
UNKNOWN = unknown_modules(
    LORAX_MODULES,
    "lorax-unknown-module",
    "lorax-modules-unchecked",
    "LoRAX",
    lambda m, arch, known: f"module {m!r}: LoRAX's {arch} takes LoRA only on {', '.join(sorted(known))}; {IGNORED}",
)

#: the MoE models LoRAX has (server/lorax_server/models/__init__.py ``get_model``); any other MoE model type
#: is "Unsupported model type"
LORAX_MOE = ("mixtral", "dbrx")


def experts(ctx: Context) -> list[Finding]:
    """``lorax-expert-lora`` (warning; error when the adapter holds nothing else, or the model is none LoRAX
    has): LoRAX's only MoE models are Mixtral and DBRX (``get_model`` raises "Unsupported model type" for
    Qwen2/3-MoE, DeepSeek, GPT-OSS...), and there it applies LoRA to attention only:
    ``FlashMixtral``'s ``ADAPTER_LAYERS`` are q/k/v/o_proj and its experts entry in
    ``adapter_target_to_layer`` is commented out ("TODO(travis): requires implementing this for block sparse
    MoE", flash_mixtral.py), DBRX's are wqkv, out_proj and lm_head (flash_dbrx.py).
    ``LoraConfig.map_weights_for_model`` (adapters/lora.py) looks up only those modules, so expert LoRAs are
    never read and never reported. No fix in LoRAX: merge the adapter into the base (``loractl merge``) and
    serve the merged model."""
    from ..formats.experts import model_type_of

    groups = expert_loras(ctx.adapter)
    if not groups:
        return []
    names = [m.name for ms in groups.values() for m in ms]
    model_type = model_type_of(ctx.base.config) if ctx.base is not None else None
    merge = f"merge them instead (loractl merge {ctx.base_for_cmd} {ctx.path} -o MERGED) and serve the merged model"
    if model_type is not None and model_type not in LORAX_MOE:
        return [
            Finding(
                "lorax-expert-lora",
                "error",
                names[0],
                f"LoRAX has no model for {model_type} (get_model: 'Unsupported model type'), so it serves none of "
                f"this adapter's {len(names)} expert LoRAs (e.g. {few(names)}); {merge}",
            )
        ]
    only = len(names) == len(ctx.adapter.modules)
    return [
        Finding(
            "lorax-expert-lora",
            "error" if only else "warning",
            names[0],
            f"{len(names)} LoRAs on MoE expert parameters (e.g. {few(names)}): LoRAX's Mixtral and DBRX take LoRA "
            f"on attention only (ADAPTER_LAYERS) and drop these without a warning; {merge}",
        )
    ]


RULES = [LAYOUT, rank, layers, PATTERNS, ignored, UNKNOWN, experts]
