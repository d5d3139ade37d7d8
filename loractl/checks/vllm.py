"""What vLLM accepts, read from its source (vllm-project/vllm): ``vllm/config/lora.py``
(``MaxLoRARanks``, ``LoRAConfig``), ``vllm/lora/peft_helper.py`` (``PEFTHelper``),
``vllm/lora/lora_model.py`` (``LoRAModel.from_local_checkpoint``), ``vllm/lora/lora_weights.py``
(``LoRALayerWeights.from_config``), ``vllm/lora/utils.py`` (``get_supported_lora_modules``,
``parse_fine_tuned_lora_name``), ``vllm/lora/worker_manager.py`` (``WorkerLoRAManager``),
``vllm/lora/model_manager.py`` and ``vllm/lora/layers/fused_moe.py`` (MoE experts; vLLM 0.34) and the
model classes' ``packed_modules_mapping`` / ``embedding_modules``.

Rules, in order (each function's docstring cites its source):

- ``vllm-layout`` (error): :data:`LAYOUT`, :func:`config_keys`;
- ``vllm-modules-to-save`` (error): :func:`modules_to_save`;
- ``vllm-dora`` (error): :func:`dora`;
- ``vllm-lora-bias``, ``vllm-bias`` (errors): :func:`lora_bias`, :func:`bias`;
- ``vllm-max-lora-rank`` (info; error above 512): :func:`rank`;
- ``vllm-patterns-ignored`` (info): :data:`PATTERNS`;
- ``vllm-unknown-module`` (error), ``vllm-modules-unchecked`` (info): :data:`UNKNOWN`;
- ``vllm-expert-lora`` (error; warning without a base), ``vllm-expert-lora-partial`` (error): :func:`experts`.
"""

from __future__ import annotations

from .findings import Context, Finding, few
from .runtime import (
    QKV_GATE_UP,
    expert_loras,
    layout,
    patterns_ignored,
    peft_folder,
    per_expert_fix,
    saved_modules,
    unknown_modules,
)

#: ``--max-lora-rank`` values vLLM accepts: ``MaxLoRARanks`` in vllm/config/lora.py
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ``LoRAConfig.max_lora_rank``'s default (vllm/config/lora.py)
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: module names vLLM expects in an adapter, per ``config.json`` architecture: the model's linear
#: layers (``get_supported_lora_modules``) expanded by its ``packed_modules_mapping`` (qkv_proj ->
#: q/k/v_proj, gate_up_proj -> gate/up_proj), plus its ``embedding_modules`` (as
#: ``WorkerLoRAManager._load_adapter`` builds ``expected_lora_modules``). Llama:
#: ``LlamaForCausalLM`` in vllm/model_executor/models/llama.py (embedding_modules embed_tokens,
#: lm_head); Mistral is served by it (``"MistralForCausalLM": ("llama", "LlamaForCausalLM")`` in
#: models/registry.py); Qwen2 (qwen2.py), Gemma (gemma.py), Gemma 2 (gemma2.py): no
#: embedding_modules; Phi-3 (phi3.py): packed ``{"qkv_proj": ["qkv_proj"], "gate_up_proj":
#: ["gate_up_proj"]}`` over ``LlamaForCausalLM``.
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": frozenset(QKV_GATE_UP + ("embed_tokens", "lm_head")),
    "MistralForCausalLM": frozenset(QKV_GATE_UP + ("embed_tokens", "lm_head")),
    "Qwen2ForCausalLM": frozenset(QKV_GATE_UP),
    "GemmaForCausalLM": frozenset(QKV_GATE_UP),
    "Gemma2ForCausalLM": frozenset(QKV_GATE_UP),
    "Phi3ForCausalLM": frozenset(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")),
}
LOAD_TIME = (
    "vLLM checks this only when a worker loads the adapter (WorkerLoRAManager._load_adapter): for an "
    "adapter passed with a request or loaded at runtime that is the first request using it, not server start-up"
)
REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")

#: ``vllm-layout`` (error): vLLM loads a folder: ``PEFTHelper.from_local_dir`` reads
#: adapter_config.json; ``LoRAModel.from_local_checkpoint`` reads adapter_model.safetensors (or .bin/.pt).
LAYOUT = layout(
    "vllm-layout", "vLLM", "adapter_config.json with r, lora_alpha, target_modules + adapter_model.safetensors"
)


def config_keys(ctx: Context) -> list[Finding]:
    """``vllm-layout`` (error): ``PEFTHelper.from_dict`` requires ``r``, ``lora_alpha`` and ``target_modules``."""
    a = ctx.adapter
    missing = [k for k in REQUIRED_KEYS if k not in a.config]
    if peft_folder(a) is not None or not missing:
        return []
    return [
        Finding(
            "vllm-layout",
            "error",
            None,
            f"{a.path}/adapter_config.json lacks {', '.join(missing)}, which vLLM's PEFTHelper requires",
            ctx.cmd("convert", "-o", "OUT", "--to", "peft"),
        )
    ]


def modules_to_save(ctx: Context) -> list[Finding]:
    """``vllm-modules-to-save`` (error): ``PEFTHelper._validate_features``: "vLLM only supports
    modules_to_save being None"; the saved full tensors are also no LoRA weight
    (``parse_fine_tuned_lora_name`` raises "is unsupported LoRA weight")."""
    return [
        Finding(
            "vllm-modules-to-save",
            "error",
            name,
            f"module {name!r} is saved whole (modules_to_save); vLLM refuses adapters with modules_to_save "
            f'("vLLM only supports modules_to_save being None"). {LOAD_TIME}',
        )
        for name in saved_modules(ctx.adapter)
    ]


def dora(ctx: Context) -> list[Finding]:
    """``vllm-dora`` (error): ``_validate_features``: "vLLM does not yet support DoRA"."""
    a = ctx.adapter
    names = [m.name for m in a.modules.values() if m.is_dora]
    if not names and not (a.format == "peft" and a.config.get("use_dora")):
        return []
    what = (
        f"DoRA adapter ({len(names)} modules with lora_magnitude_vector, e.g. {few(names)})"
        if names
        else "DoRA adapter (use_dora in adapter_config.json)"
    )
    return [
        Finding(
            "vllm-dora",
            "error",
            names[0] if names else None,
            f'{what}; vLLM refuses it ("vLLM does not yet support DoRA"). {LOAD_TIME}',
        )
    ]


def lora_bias(ctx: Context) -> list[Finding]:
    """``vllm-lora-bias`` (error): ``lora_B.bias`` is no name ``parse_fine_tuned_lora_name`` accepts."""
    return [
        Finding(
            "vllm-lora-bias",
            "error",
            m.name,
            f"module {m.name!r} has lora_B.bias (lora_bias), which vLLM cannot load "
            f"(parse_fine_tuned_lora_name: unsupported LoRA weight). {LOAD_TIME}",
        )
        for m in ctx.adapter.modules.values()
        if m.bias is not None
    ]


def bias(ctx: Context) -> list[Finding]:
    """``vllm-bias`` (error): a config ``bias`` other than ``"none"`` fails ``validate_legal``."""
    a = ctx.adapter
    if a.format != "peft" or str(a.config.get("bias", "none")) == "none":
        return []
    return [
        Finding(
            "vllm-bias",
            "error",
            None,
            f"{a.path}: adapter_config.json has bias={a.config['bias']!r} (trained base biases); vLLM serves "
            f"adapters with bias='none' only (PEFTHelper.validate_legal). {LOAD_TIME}",
        )
    ]


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (``MaxLoRARanks``), or None above 512."""
    for r in VLLM_MAX_LORA_RANKS:
        if rank <= r:
            return r
    return None


def rank(ctx: Context) -> list[Finding]:
    """``vllm-max-lora-rank`` (info; error above 512): vLLM allocates every LoRA slot at
    ``--max-lora-rank`` (default 16, one of ``MaxLoRARanks`` = 1, 8, 16, 32, 64, 128, 256, 320, 512)
    and refuses "LoRA rank R is greater than max_lora_rank" (``validate_legal`` /
    ``WorkerLoRAManager._load_adapter``); the value needed is the largest rank rounded up."""
    a = ctx.adapter
    if not a.modules:
        return []
    top = max(a.modules.values(), key=lambda m: m.rank)
    r = top.rank
    cfg_r = a.config.get("r") if a.format == "peft" else None
    if isinstance(cfg_r, int) and cfg_r > r:
        r = cfg_r  # validate_legal compares the config's r
    need = vllm_max_lora_rank(r)
    if need is None:
        return [
            Finding(
                "vllm-max-lora-rank",
                "error",
                top.name,
                f"module {top.name!r} has rank {r}; vLLM's --max-lora-rank allows at most "
                f"{VLLM_MAX_LORA_RANKS[-1]} (allowed: {', '.join(map(str, VLLM_MAX_LORA_RANKS))})",
                ctx.cmd("truncate", "-o", "OUT", "--rank", str(VLLM_MAX_LORA_RANKS[-1])),
            )
        ]
    extra = f"; vLLM's default ({VLLM_DEFAULT_MAX_LORA_RANK}) is too small" if need > VLLM_DEFAULT_MAX_LORA_RANK else ""
    return [
        Finding(
            "vllm-max-lora-rank",
            "info",
            top.name,
            f"serve with --max-lora-rank {need} (largest rank {r}, module {top.name!r}, rounded up to the "
            f"values vLLM allows){extra}",
        )
    ]


#: ``vllm-patterns-ignored`` (info): vLLM 0.34 applies ``rank_pattern``/``alpha_pattern`` as PEFT does
#: (``PEFTHelper.get_rank_and_scaling`` in vllm/lora/peft_helper.py: "Return the rank and scaling PEFT uses
#: for `module_name`, taking `rank_pattern` and `alpha_pattern` into account", PEFT's ``get_pattern_key``
#: rule), so the adapter is served as trained; older vLLM releases kept only PEFTHelper's own fields
#: (``from_dict``) and scaled every module by the config's ``lora_alpha / r``.
PATTERNS = patterns_ignored(
    "vllm-patterns-ignored",
    "vLLM 0.34 and later apply rank_pattern/alpha_pattern (PEFTHelper.get_rank_and_scaling); older releases "
    "drop them and scale every module by lora_alpha/r = {served:g}",
    severity="info",
)

#: ``vllm-unknown-module`` (error): ``from_local_checkpoint`` raises "expected target modules in
#: [...] but received [...]" for a module whose last name component is not among the model's
#: supported modules (:data:`VLLM_LORA_MODULES`); ``vllm-modules-unchecked`` (info) when the
#: architecture is unknown (no base, or one not in the table).
UNKNOWN = unknown_modules(
    VLLM_LORA_MODULES,
    "vllm-unknown-module",
    "vllm-modules-unchecked",
    "vLLM",
    lambda m, arch, known: (
        f"module {m!r}: vLLM's {arch} takes LoRA only on {', '.join(sorted(known))}; loading the adapter "
        f'fails with "expected target modules in [...] but received [...]". {LOAD_TIME}'
    ),
)

#: vLLM models whose MoE LoRA weights are 3-D (``is_3d_moe_weight = True``: gpt_oss.py, qwen3_5.py,
#: qwen3_vl_moe.py, qwen3_omni_moe_thinker.py, interns1_pro.py in vllm/model_executor/models); every other MoE
#: model (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GraniteMoE...) keeps the default False of
#: ``SupportsLoRA`` (interfaces.py) and takes per-expert (2-D) LoRAs
VLLM_3D_MOE = frozenset(
    {
        "GptOssForCausalLM",
        "Qwen3_5MoeForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3OmniMoeThinkerForConditionalGeneration",
        "InternS1ProForConditionalGeneration",
    }
)
_MIXED = (
    "serve with --enable-mixed-moe-lora-format and pass the adapter as --lora-modules "
    """'{"name": "NAME", "path": "DIR", "is_3d_lora_weight": true}' (vllm/config/lora.py)"""
)


def experts(ctx: Context) -> list[Finding]:
    """``vllm-expert-lora-partial`` (error): vLLM takes an experts module's LoRA only as the pair PEFT saves for
    ``gate_up_proj`` + ``down_proj``: ``PEFTHelper.get_rank_and_scaling`` and
    ``LoRAModel.from_local_checkpoint`` (``check_unexpected_modules``) read ``experts.base_layer`` as
    gate_up_proj and ``experts`` as down_proj, and ``LoRAModelManager._stack_moe_lora_weights`` asserts both
    ("FIXME Edge case where LoRA is not added to gate_up_proj or down_proj"): one of them alone, or more
    parameters (GPT-OSS's biases shift PEFT's nesting), is not served as trained.
    ``vllm-expert-lora`` (error; warning without a base): on a model whose vLLM class takes per-expert LoRA
    weights (not :data:`VLLM_3D_MOE`) the stacked LoRAs pass the load check, but activating the adapter fails
    in ``FusedMoEWithLoRA.set_lora`` (``assert isinstance(lora_a, list)``, vllm/lora/layers/fused_moe.py)
    unless the server runs with ``--enable-mixed-moe-lora-format`` and the adapter is marked
    ``is_3d_lora_weight`` (then ``_convert_3d_to_2d_moe_lora`` splits it), or the adapter is rewritten per
    expert (``loractl convert --experts per-expert``, which ``PackedLoRALayerWeights.pack_moe`` loads)."""
    groups = expert_loras(ctx.adapter)
    if not groups:
        return []
    out: list[Finding] = []
    leaves = {m: sorted(x.name.rpartition(".")[2] for x in ms) for m, ms in groups.items()}
    odd = {m: ls for m, ls in leaves.items() if ls != ["down_proj", "gate_up_proj"]}
    if odd:
        first = next(iter(odd))
        out.append(
            Finding(
                "vllm-expert-lora-partial",
                "error",
                f"{first}.{odd[first][0]}",
                f"{len(odd)} experts modules (e.g. {first!r}: {', '.join(odd[first])}) have LoRAs on other "
                "parameters than exactly gate_up_proj and down_proj; vLLM reads experts.base_layer as gate_up_proj "
                "and experts as down_proj and asserts both (LoRAModelManager._stack_moe_lora_weights), so it cannot "
                f"serve them as trained. {LOAD_TIME}",
            )
        )
    if ctx.arch in VLLM_3D_MOE:
        return out
    names = [m.name for ms in groups.values() for m in ms]
    where = f"vLLM's {ctx.arch}" if ctx.base is not None else "a model whose vLLM class takes per-expert LoRAs"
    out.append(
        Finding(
            "vllm-expert-lora",
            "error" if ctx.base is not None else "warning",
            names[0],
            f"{len(names)} LoRAs on MoE expert parameters (PEFT target_parameters, e.g. {few(names)}): {where} "
            "loads them, then fails when the adapter is activated (FusedMoEWithLoRA.set_lora: assert "
            f"isinstance(lora_a, list)); {_MIXED}, or rewrite them per expert"
            + ("" if ctx.base is not None else f" (served as they are on {', '.join(sorted(VLLM_3D_MOE))})"),
            per_expert_fix(ctx),
        )
    )
    return out


RULES = [LAYOUT, config_keys, modules_to_save, dora, lora_bias, bias, rank, PATTERNS, UNKNOWN, experts]
