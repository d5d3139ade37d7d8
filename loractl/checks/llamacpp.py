"""What llama.cpp accepts: a GGUF LoRA written by its ``convert_lora_to_gguf.py`` (with the model classes
of ``convert_hf_to_gguf.py``, now ``conversion/*.py``) or by loractl, applied by ``src/llama-graph.cpp``
(``build_lora_mm``) with the scale of ``src/llama-adapter.h`` (``llama_adapter_lora_weight::get_scale``).
The facts about llama.cpp itself (which architectures convert, which permute q/k) live with the GGUF
writer in :mod:`loractl.formats.gguf`.

Rules, in order: ``llamacpp-arch`` (:func:`arch`), ``llamacpp-dora`` (:func:`dora`),
``llamacpp-lora-bias`` (:func:`lora_bias`), ``llamacpp-modules-to-save`` (:func:`saved`),
``llamacpp-layout`` (:func:`layout`), ``llamacpp-permute`` (:func:`permute`),
``llamacpp-fold-scale`` (:func:`fold_scale`), ``llamacpp-expert-lora`` (:func:`experts`).
"""

from __future__ import annotations

import math

from ..formats.gguf import CONVERTIBLE_ARCHITECTURES, HF_ARCHITECTURES, PERMUTED_ARCHITECTURES
from .findings import Context, Finding, few, leaf
from .runtime import expert_loras, per_expert_fix, saved_biases, saved_modules, served_config


def _gguf_fix(ctx: Context) -> str:
    return ctx.cmd("convert", "-o", "OUT.gguf", "--to", "gguf", "--base", ctx.base_for_cmd)


def _writer_handles(ctx: Context) -> bool:
    """Does loractl's GGUF writer handle the base's architecture (so its fix command works)?"""
    return ctx.arch is not None and ctx.arch in HF_ARCHITECTURES


def arch(ctx: Context) -> list[Finding]:
    """``llamacpp-arch`` (error; info without a base): ``convert_lora_to_gguf.py`` builds on
    ``ModelBase.from_model_architecture(hparams["architectures"][0])`` and exits with "Model X is not
    supported" for others (``formats.gguf.CONVERTIBLE_ARCHITECTURES``)."""
    if ctx.adapter.format == "gguf":
        return []
    if ctx.base is None:
        return [
            Finding(
                "llamacpp-arch",
                "info",
                None,
                "base architecture not checked: give --base (convert_lora_to_gguf.py needs the base's "
                "config.json to pick the model class)",
            )
        ]
    if ctx.arch in CONVERTIBLE_ARCHITECTURES:
        return []
    return [
        Finding(
            "llamacpp-arch",
            "error",
            None,
            f"base {ctx.base.path} is {ctx.arch or 'of unknown architecture (config.json has no architectures)'}"
            f"; convert_lora_to_gguf.py converts only architectures convert_hf_to_gguf.py registers "
            f"(loractl knows {', '.join(sorted(CONVERTIBLE_ARCHITECTURES))})",
        )
    ]


def dora(ctx: Context) -> list[Finding]:
    """``llamacpp-dora`` (error): ``LoraModel.get_tensors`` accepts only ``lora_A``/``lora_B`` (and
    embedding) tensors; a ``lora_magnitude_vector`` is "Unexpected name ...: Not a lora_A or lora_B
    tensor" and the script exits. llama.cpp applies plain LoRA only."""
    names = [m.name for m in ctx.adapter.modules.values() if m.is_dora]
    if not names:
        return []
    return [
        Finding(
            "llamacpp-dora",
            "error",
            names[0],
            f"DoRA adapter ({len(names)} modules with lora_magnitude_vector, e.g. {few(names)}); llama.cpp "
            "applies plain LoRA only and convert_lora_to_gguf.py stops at the magnitude vectors",
        )
    ]


def lora_bias(ctx: Context) -> list[Finding]:
    """``llamacpp-lora-bias`` (error): ``lora_B.bias`` is not a ``lora_A``/``lora_B`` tensor; a GGUF
    LoRA has nowhere to put it."""
    return [
        Finding(
            "llamacpp-lora-bias",
            "error",
            m.name,
            f"module {m.name!r} has lora_B.bias (lora_bias); a GGUF LoRA holds only lora_a/lora_b",
        )
        for m in ctx.adapter.modules.values()
        if m.bias is not None
    ]


def saved(ctx: Context) -> list[Finding]:
    """``llamacpp-modules-to-save`` (error): a saved full weight or trained bias is "Unexpected name"
    to ``LoraModel.get_tensors`` (which skips ``.base_layer.weight`` and keeps norm weights)."""
    a = ctx.adapter
    out = [
        Finding(
            "llamacpp-modules-to-save",
            "error",
            name,
            f"module {name!r} is saved whole (modules_to_save); a GGUF LoRA holds only lora_a/lora_b pairs",
        )
        for name in saved_modules(a)
        if "norm" not in leaf(name)  # convert_lora_to_gguf.py keeps norm weights (mergekit-extract-lora)
    ]
    out += [
        Finding(
            "llamacpp-modules-to-save",
            "error",
            name,
            f"module {name!r} has a trained bias saved in the adapter (PEFT bias='all'/'lora_only'); "
            "a GGUF LoRA holds only lora_a/lora_b pairs",
        )
        for name in saved_biases(a)
    ]
    return out


def layout(ctx: Context) -> list[Finding]:
    """``llamacpp-layout`` (info): the script reads only PEFT folders; loractl converts any format."""
    a = ctx.adapter
    if a.format in ("gguf", "peft"):
        return []
    return [
        Finding(
            "llamacpp-layout",
            "info",
            None,
            f"{a.path} is a {a.format} adapter; llama.cpp's convert_lora_to_gguf.py reads PEFT folders only, "
            "loractl writes the GGUF directly",
            _gguf_fix(ctx) if _writer_handles(ctx) or ctx.base is None else None,
        )
    ]


def permute(ctx: Context) -> list[Finding]:
    """``llamacpp-permute`` (info): for Llama-family bases ``LlamaModel.modify_tensors`` permutes q/k
    rows (``LlamaModel.permute``) and the LoRA B factor must follow; loractl's GGUF writer does."""
    if ctx.adapter.format == "gguf" or ctx.arch not in PERMUTED_ARCHITECTURES:
        return []
    qk = [n for n in ctx.adapter.modules if leaf(n) in ("q_proj", "k_proj")]
    if not qk:
        return []
    return [
        Finding(
            "llamacpp-permute",
            "info",
            qk[0],
            f"{len(qk)} q/k modules (e.g. {few(qk)}): llama.cpp permutes {ctx.arch}'s q/k rows "
            "(LlamaModel.permute), so their B factors must be permuted too; loractl's GGUF writer and "
            "convert_lora_to_gguf.py do, a hand-written converter must",
            _gguf_fix(ctx) if _writer_handles(ctx) else None,
        )
    ]


def fold_scale(ctx: Context) -> list[Finding]:
    """``llamacpp-fold-scale`` (info): llama.cpp scales a module by ``alpha / r`` with one alpha per
    file (``adapter.lora.alpha``) and r from each ``lora_b`` (``get_scale``: ``alpha ? adapter_scale *
    alpha / rank : adapter_scale``, used by ``build_lora_mm``); the script writes ``lora_alpha`` and
    ignores ``use_rslora`` and ``alpha_pattern``. Modules whose scale differs need it folded into B,
    which ``loractl convert --to gguf`` does."""
    a = ctx.adapter
    if a.format == "gguf":
        return []
    try:
        file_alpha = float((served_config(a) or {}).get("lora_alpha"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []
    off = [
        m
        for m in a.modules.values()
        if not math.isclose(m.scale, file_alpha / m.rank if file_alpha else 1.0, rel_tol=1e-6)
    ]
    if not off:
        return []
    why = "rsLoRA" if any(m.rslora for m in off) else "per-module alpha (alpha_pattern)"
    fixable = _writer_handles(ctx) or ctx.base is None
    return [
        Finding(
            "llamacpp-fold-scale",
            "info",
            off[0].name,
            f"{len(off)} modules (e.g. {few([m.name for m in off])}) use {why}: llama.cpp scales every "
            f"module by one alpha / rank ({file_alpha:g} / r), so their scale must be folded into B; "
            "convert_lora_to_gguf.py does not, loractl's GGUF writer does"
            + ("" if fixable else f" (but not for {ctx.arch})"),
            _gguf_fix(ctx) if fixable else None,
        )
    ]


def experts(ctx: Context) -> list[Finding]:
    """``llamacpp-expert-lora`` (error): ``convert_lora_to_gguf.py`` names each pair by its key without
    ``.lora_A``/``.lora_B`` (``get_base_tensor_name``), so PEFT's stacked expert LoRAs
    (``experts.base_layer.lora_*``, ``experts.lora_*``) become ``...experts.base_layer.weight`` /
    ``...experts.weight``: the MoE converters (``Qwen2MoeModel.modify_tensors`` and the Mixtral, DeepSeek...
    ones) buffer every ``experts`` tensor to stack ``n_experts * 3`` per-expert ones, never get them, and the
    conversion ends with "Unprocessed experts: [...]" (``prepare_tensors``); converters without that buffer
    stop at "Can not map tensor". Per-expert LoRAs (``experts.{e}.gate_proj`` ...) do convert: stacked into
    ``ffn_{gate,up,down}_exps`` lora_a/lora_b and applied per selected expert (``build_lora_mm_id``,
    src/llama-graph.cpp); ``loractl convert --experts per-expert`` writes them."""
    groups = expert_loras(ctx.adapter)
    if not groups:
        return []
    names = [m.name for ms in groups.values() for m in ms]
    fix = per_expert_fix(ctx)
    return [
        Finding(
            "llamacpp-expert-lora",
            "error",
            names[0],
            f"{len(names)} LoRAs on MoE expert parameters (PEFT target_parameters, e.g. {few(names)}): "
            "convert_lora_to_gguf.py converts per-expert LoRAs only and stops at these with "
            "'Unprocessed experts: [...experts.base_layer.weight...]'"
            + (
                "; rewrite them per expert first, then convert"
                if fix
                else f"; {ctx.arch or 'this model'} stores its experts fused, so they have no per-expert form"
            ),
            fix,
        )
    ]


RULES = [arch, dora, lora_bias, saved, layout, permute, fold_scale, experts]
