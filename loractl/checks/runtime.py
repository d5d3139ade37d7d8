"""Questions several serving runtimes ask of an adapter: is it a PEFT folder, which config will they
read, which scale will they apply, what is saved in full, which module names do they know."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from .findings import Context, Finding, leaf

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter, LoraModule

#: the projections of Llama-like models that runtimes take LoRAs on
QKV_GATE_UP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def peft_folder(a: Adapter) -> str | None:
    """Why ``a`` is not a PEFT adapter folder (adapter_config.json + adapter_model.*) a runtime can load, or None."""
    if a.format != "peft":
        return f"is a {a.format} adapter"
    if not a.path.is_dir():
        return "is a single file, not a PEFT folder"
    if not (a.path / "adapter_config.json").exists():
        return "has no adapter_config.json"
    if not any((a.path / w).exists() for w in PEFT_WEIGHTS):
        return "has no adapter_model.safetensors"
    return None


def layout(code: str, runtime: str, reads: str) -> Callable[[Context], list[Finding]]:
    """The rule ``code`` (error): ``runtime`` reads only PEFT folders (``reads`` says what it reads)."""

    def rule(ctx: Context) -> list[Finding]:
        why = peft_folder(ctx.adapter)
        if why is None:
            return []
        return [
            Finding(
                code,
                "error",
                None,
                f"{ctx.adapter.path} {why}; {runtime} reads only PEFT folders ({reads})",
                ctx.cmd("convert", "-o", "OUT", "--to", "peft"),
            )
        ]

    return rule


def served_config(a: Adapter) -> dict[str, Any] | None:
    """The adapter_config.json a runtime reads: the file's, or the one ``convert --to peft`` would write."""
    if a.format == "peft" and a.config.get("r") is not None:
        return a.config
    from ..formats.peft import peft_config

    try:
        return peft_config(a)
    except FormatError:
        return None


def config_scale(cfg: dict[str, Any]) -> float | None:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) from a config: one scale for every module."""
    try:
        r, alpha = float(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        return None
    if r <= 0:
        return None
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def scale_mismatches(a: Adapter, served: float) -> list[LoraModule]:
    """Modules whose own scale is not ``served``."""
    return [m for m in a.modules.values() if not math.isclose(m.scale, served, rel_tol=1e-6, abs_tol=0.0)]


def patterns_ignored(
    code: str, rule_text: str, severity: str = "warning"
) -> Callable[[Context], list[Finding]]:
    """The rule ``code`` (``severity``): modules whose scale differs from the config's lora_alpha/r, for a
    runtime that applies that one scale to every module (``rule_text`` is formatted with ``served``)."""

    def rule(ctx: Context) -> list[Finding]:
        cfg = served_config(ctx.adapter)
        served = config_scale(cfg) if cfg else None
        if served is None:
            return []
        return [
            Finding(
                code,
                severity,
                m.name,
                f"module {m.name!r} has rank {m.rank}, alpha {m.alpha:g} (scale {m.scale:g}), but "
                + rule_text.format(served=served),
                ctx.cmd("convert", "-o", "OUT", "--to", "peft", "--normalize"),
            )
            for m in scale_mismatches(ctx.adapter, served)
        ]

    return rule


def saved_modules(a: Adapter) -> list[str]:
    """Modules replaced whole (PEFT ``modules_to_save``): from the config and from the saved tensors.

    ``<m>.base_layer.weight`` keys are PEFT's saved embedding layers (``save_embedding_layers``), not
    modules_to_save; ``<m>.bias`` keys are trained biases (:func:`saved_biases`).
    """
    names = [str(n) for n in (a.config.get("modules_to_save") or [])] if a.format == "peft" else []
    for key in a.modules_to_save:
        if ".base_layer." not in key and not key.endswith(".bias"):
            names.append(key.rsplit(".", 1)[0])
    return list(dict.fromkeys(names))


def saved_biases(a: Adapter) -> list[str]:
    """Base biases trained and saved in the adapter (PEFT ``bias="all"`` / ``"lora_only"``), by module."""
    return [k.rsplit(".", 1)[0] for k in a.modules_to_save if k.endswith(".bias") and ".base_layer." not in k]


def unknown_modules(
    table: dict[str, frozenset[str]],
    code: str,
    unchecked_code: str,
    runtime: str,
    message: Callable[[str, str, frozenset[str]], str],
) -> Callable[[Context], list[Finding]]:
    """The rule ``code`` (error): a module whose last name component is not among those ``runtime``
    takes LoRA on for the base's architecture (``table``); ``unchecked_code`` (info) when the
    architecture is unknown."""

    def rule(ctx: Context) -> list[Finding]:
        arch = ctx.arch
        if arch is None or arch not in table:
            why = (
                "no --base given (the architecture comes from its config.json)"
                if ctx.base is None
                else f"architecture {arch!r} is not in loractl's table for {runtime}"
            )
            return [Finding(unchecked_code, "info", None, f"module names not checked against {runtime}: {why}")]
        known = table[arch]
        return [
            Finding(code, "error", name, message(name, arch, known))
            for name in ctx.adapter.modules
            if leaf(name) not in known
        ]

    return rule


def expert_loras(a: Adapter) -> dict[str, list[LoraModule]]:
    """LoRAs on MoE experts' parameters (PEFT ``target_parameters``) by experts module, the module PEFT's keys
    name (``<module>.base_layer.lora_*`` / ``<module>.lora_*``): parameter LoRAs of several experts, and 2-D
    ones on an experts module (GPT-OSS's biases). A router's ``weight`` is left out: it is saved under its own
    module's name, as a module LoRA would be."""
    out: dict[str, list[LoraModule]] = {}
    for m in a.modules.values():
        module = m.name.rpartition(".")[0]
        if m.experts > 1 or (m.experts and re.search(r"(^|\.)experts(\.mlp)?$", module)):
            out.setdefault(module, []).append(m)
    return out


def per_expert_fix(ctx: Context) -> str | None:
    """``loractl convert --experts per-expert`` when the base's checkpoints hold one tensor per expert (or no
    base is given: the command then names BASE), else None."""
    from ..formats.experts import ARCHS, model_type_of

    if ctx.base is not None:
        arch = ARCHS.get(model_type_of(ctx.base.config) or "")
        if arch is None or "gate_up_proj" not in arch.split:
            return None
    return ctx.cmd("convert", "-o", "OUT", "--to", "peft", "--experts", "per-expert", "--base", ctx.base_for_cmd)
