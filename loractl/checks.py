"""``check``: a CI gate for an adapter: integrity, values, fit to a base, and what a serving runtime accepts.

Every rule returns :class:`Finding` objects (a stable ``code``, a ``severity``, the module it is
about, a message and, where one exists, the ``loractl`` command line that fixes it); ``check``
lists all of them, never only the first. The result is ``ok`` when no finding is an error.
Nothing here prints or writes; an unreadable adapter becomes an ``integrity`` finding, not an
exception.

The runtime rules are read from the runtimes' own sources (cited in each rule's docstring):

- vLLM (vllm-project/vllm): ``vllm/config/lora.py`` (``MaxLoRARanks``, ``LoRAConfig``),
  ``vllm/lora/peft_helper.py`` (``PEFTHelper``), ``vllm/lora/lora_model.py``
  (``LoRAModel.from_local_checkpoint``), ``vllm/lora/lora_weights.py``
  (``LoRALayerWeights.from_config``), ``vllm/lora/utils.py`` (``get_supported_lora_modules``,
  ``parse_fine_tuned_lora_name``), ``vllm/lora/worker_manager.py`` (``WorkerLoRAManager``) and the
  model classes' ``packed_modules_mapping`` / ``embedding_modules``;
- llama.cpp (ggml-org/llama.cpp): ``convert_lora_to_gguf.py``, the model classes of
  ``convert_hf_to_gguf.py`` (now ``conversion/*.py``), ``src/llama-graph.cpp``
  (``build_lora_mm``) and ``src/llama-adapter.h`` (``llama_adapter_lora_weight::get_scale``);
- LoRAX (predibase/lorax): ``server/lorax_server/adapters/lora.py`` (``LoraConfig``,
  ``LoraWeights.load``), ``server/lorax_server/utils/punica.py`` (``pad_rank``, rank limits),
  ``server/lorax_server/models/model.py`` (``Model.load_adapter``) and the ``flash_*.py`` models'
  ``ADAPTER_LAYERS``;
- PEFT (huggingface/peft): ``PeftConfigMixin.from_peft_type`` and ``LoraConfig``.
"""

from __future__ import annotations

import math
import re
import shlex
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FormatError, InputError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .adapter import Adapter, LoraModule
    from .io.base import BaseModel

SEVERITIES = ("error", "warning", "info")
TARGETS = ("peft", "vllm", "llama.cpp", "lorax")
_TARGET_ALIASES = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp"}

# --- vLLM -----------------------------------------------------------------------------------
#: ``--max-lora-rank`` values vLLM accepts: ``MaxLoRARanks`` in vllm/config/lora.py
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ``LoRAConfig.max_lora_rank``'s default (vllm/config/lora.py)
VLLM_DEFAULT_MAX_LORA_RANK = 16
_QKV_GATE_UP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
    "LlamaForCausalLM": frozenset(_QKV_GATE_UP + ("embed_tokens", "lm_head")),
    "MistralForCausalLM": frozenset(_QKV_GATE_UP + ("embed_tokens", "lm_head")),
    "Qwen2ForCausalLM": frozenset(_QKV_GATE_UP),
    "GemmaForCausalLM": frozenset(_QKV_GATE_UP),
    "Gemma2ForCausalLM": frozenset(_QKV_GATE_UP),
    "Phi3ForCausalLM": frozenset(
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")
    ),
}
_VLLM_LOAD_TIME = (
    "vLLM checks this only when a worker loads the adapter (WorkerLoRAManager._load_adapter): for an "
    "adapter passed with a request or loaded at runtime that is the first request using it, not server start-up"
)

# --- llama.cpp ------------------------------------------------------------------------------
#: ``config.json`` architectures that ``convert_lora_to_gguf.py`` can convert: it builds its
#: ``LoraModel`` on ``ModelBase.from_model_architecture(hparams["architectures"][0])`` and exits
#: with "Model ... is not supported" otherwise. The common text models registered with
#: ``@ModelBase.register(...)`` in convert_hf_to_gguf.py / conversion/*.py (llama.py, qwen.py,
#: gemma.py, phi.py, gpt2.py, gpt_neox.py, starcoder.py). Not exhaustive: llama.cpp registers many
#: more architectures; extend this set when a user's base is missing.
LLAMACPP_ARCHITECTURES = frozenset(
    {
        "LLaMAForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "Starcoder2ForCausalLM",
    }
)
#: architectures converted by ``LlamaModel`` (``undo_permute = True``), which permutes q/k rows
#: (``LlamaModel.permute``) in ``modify_tensors`` (conversion/llama.py)
LLAMACPP_PERMUTED = frozenset(
    {"LLaMAForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"}
)

# --- LoRAX ----------------------------------------------------------------------------------
#: server/lorax_server/utils/punica.py
LORAX_MIN_SGMV_RANK = 8
LORAX_SGMV_BLOCK_SIZE = 16
LORAX_MAX_RANK_CUSTOM = 128
_LLAMA_LORAX = frozenset(_QKV_GATE_UP + ("lm_head",))
#: ``ADAPTER_LAYERS`` of LoRAX's models (server/lorax_server/models/flash_llama.py,
#: flash_mistral.py, flash_qwen2.py, flash_gemma.py, flash_gemma2.py, flash_phi3.py): the only
#: modules ``LoraConfig.map_weights_for_model`` picks up
LORAX_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LORAX,
    "MistralForCausalLM": _LLAMA_LORAX,
    "Qwen2ForCausalLM": _LLAMA_LORAX,
    "GemmaForCausalLM": frozenset(_QKV_GATE_UP),
    "Gemma2ForCausalLM": frozenset(_QKV_GATE_UP),
    "Phi3ForCausalLM": frozenset(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}

_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LAYER = re.compile(r"^(?P<pre>.*?\.(?:layers|h|layer|blocks)\.)(?P<idx>\d+)(?P<post>\..+)$")


@dataclass
class Finding:
    """One thing ``check`` found.

    Attributes:
        code: a stable identifier (``nan-inf``, ``vllm-dora``, ...), for pipelines to match on.
        severity: ``error`` (fails the check), ``warning`` or ``info``.
        module: the adapter module it is about (PEFT name without ``base_model.model.``), if any.
        message: what is wrong, for people; names the file or module.
        fix: a ``loractl`` command line that fixes it (``ADAPTER`` filled in, ``OUT`` to choose), if any.
    """

    code: str
    severity: str
    module: str | None
    message: str
    fix: str | None = None


@dataclass
class CheckResult:
    """What ``check`` found.

    Attributes:
        ok: no finding is an error (with ``strict``: no error and no warning).
        adapter: the adapter path given.
        target: the runtime checked for (``peft``, ``vllm``, ``llama.cpp``, ``lorax``), or None.
        findings: every finding, errors first, in the order the rules ran.
        strict: warnings fail the check too.
    """

    ok: bool
    adapter: str
    target: str | None
    findings: list[Finding] = field(default_factory=list)
    strict: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def failures(self) -> list[Finding]:
        """The findings that make ``ok`` False: errors, and with ``strict`` warnings too."""
        failing = ("error", "warning") if self.strict else ("error",)
        return [f for f in self.findings if f.severity in failing]


@dataclass
class _Ctx:
    """What the rules share."""

    path: str  # as given (for fix command lines)
    adapter: Adapter
    base: BaseModel | None
    base_arg: str | None
    alpha: float | None = None  # --alpha given, repeated in fix command lines

    @property
    def arch(self) -> str | None:
        """``config.json``'s ``architectures[0]`` of the base, or None."""
        if self.base is None:
            return None
        archs = self.base.config.get("architectures") or []
        return str(archs[0]) if archs else None

    def cmd(self, *args: str) -> str:
        """A ``loractl`` command line on this adapter: ``loractl VERB ADAPTER args...``."""
        verb, *rest = args
        alpha = ["--alpha", repr(self.alpha)] if self.alpha is not None else []
        return " ".join(["loractl", verb, shlex.quote(self.path), *alpha, *rest])

    @property
    def base_for_cmd(self) -> str:
        return shlex.quote(self.base_arg) if self.base_arg is not None else "BASE"


def check(
    adapter_path: str | Path,
    *,
    base: str | Path | None = None,
    target: str | None = None,
    max_rank: int | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
    strict: bool = False,
    alpha: float | None = None,
) -> CheckResult:
    """Check an adapter and list every problem found.

    Rules, in order: the adapter reads (``integrity``, ``not-lora``); finite, non-zero factors
    (``nan-inf``, ``untrained-module``, ``all-zero``); ``max_rank`` (``rank-too-large``); with ``base``, each module's
    update fits the weight it resolves to (``shape-mismatch``, ``unmatched-module``); an init that
    changed the base (``base-changing-init``); then what ``target`` accepts (``peft-*``, ``vllm-*``,
    ``llamacpp-*``, ``lorax-*``).

    Args:
        adapter_path: a PEFT folder, an adapter file, or a Hub reference ``org/name[@revision]``.
        base: a base model folder or file, or a Hub reference (shapes, coverage, and the
            architecture runtimes need).
        target: ``peft``, ``vllm``, ``llama.cpp`` or ``lorax``.
        max_rank: the largest rank allowed.
        format: force the adapter's format instead of detecting it.
        allow_pickle: accept pickle files.
        strict: warnings fail the check too (``ok`` is False when any finding is an error or a
            warning).
        alpha: lora_alpha of an adapter that does not state it (a PEFT adapter without its config);
            repeated in the fix command lines.

    Returns:
        The findings; ``ok`` is False when any is an error (or, with ``strict``, a warning).

    Raises:
        UsageError: an unknown target or format, ``max_rank`` below 1.
        InputError: the adapter path does not exist, the Hub reference cannot be resolved, or the
            base cannot be opened (these are input errors, not findings: there is nothing to check).
    """
    from .io.base import open_base
    from .io.hub import is_hub_ref, resolve_adapter

    tgt = _target(target)
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank {max_rank} must be at least 1")
    local = resolve_adapter(adapter_path) if is_hub_ref(adapter_path) else Path(adapter_path)
    if not local.exists():
        raise InputError(f"{adapter_path}: no such file or folder", hint="check the adapter path")
    findings: list[Finding] = []
    b = open_base(base) if base is not None else None
    try:
        adapter = _load(local, format, allow_pickle, b, findings, alpha)
        if adapter is not None:
            ctx = _Ctx(str(adapter_path), adapter, b, str(base) if base is not None else None, alpha)
            rules: list[Callable[[_Ctx], Iterable[Finding]]] = [_values]
            if max_rank is not None:
                rules.append(lambda c: _max_rank(c, max_rank))
            if b is not None:
                rules.append(_against_base)
            rules.append(_init)
            if tgt is not None:
                rules.append(_RUNTIMES[tgt])
            for rule in rules:
                findings.extend(rule(ctx))
    finally:
        if b is not None:
            b.close()
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: order[f.severity])  # stable: rule order kept within a severity
    result = CheckResult(ok=True, adapter=str(adapter_path), target=tgt, findings=findings, strict=strict)
    result.ok = not result.failures
    return result


def _target(target: str | None) -> str | None:
    if target is None:
        return None
    t = _TARGET_ALIASES.get(target.lower(), target.lower())
    if t not in TARGETS:
        raise UsageError(f"unknown --target {target!r}; one of {', '.join(TARGETS)}")
    return t


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _load(
    path: Path,
    format: str | None,
    allow_pickle: bool,
    base: BaseModel | None,
    out: list[Finding],
    alpha: float | None = None,
) -> Adapter | None:
    """Read the adapter; a file that cannot be read becomes a finding.

    ``integrity`` (error): loractl's reader refused it: a safetensors header inconsistent with the
    file (``SafetensorsFile`` validates lengths, offsets, dtypes and overlaps before reading), a
    truncated file, a config that does not belong to the weights, an unknown layout, a pickle
    without ``allow_pickle``. ``not-lora`` (error): a LyCORIS algorithm that is not LoRA (LoHa,
    LoKr, OFT, ...), recognised by its keys (``formats.refuse_lycoris``).
    """
    from .formats import ReadOptions, load_adapter, refuse_lycoris, weights_file
    from .io.safetensors import SafetensorsFile

    opts = ReadOptions(allow_pickle=allow_pickle, alpha=alpha)
    if base is not None:
        opts.base_keys = list(base.tensors)
        opts.base_config = base.config
    try:
        if format is None and path.suffix != ".gguf":
            weights = weights_file(path)
            if weights.suffix == ".safetensors":
                with SafetensorsFile(weights) as f:
                    keys = f.keys()
                try:
                    refuse_lycoris(keys, weights)
                except FormatError as e:
                    out.append(Finding("not-lora", "error", None, _text(e)))
                    return None
        return load_adapter(path, format=format, options=opts)
    except InputError as e:
        out.append(Finding("integrity", "error", None, _text(e)))
        return None


def _text(e: InputError) -> str:
    return f"{e.message} ({e.hint})" if e.hint else e.message


def _source(a: Adapter) -> str:
    return str(a.files[0]) if a.files else str(a.path)


# --------------------------------------------------------------------------------------------
# target-independent rules
# --------------------------------------------------------------------------------------------
def _parts(m: LoraModule) -> list[tuple[str, torch.Tensor | None]]:
    return [
        ("lora_A", m.down),
        ("lora_B", m.up),
        ("lora_B.bias", m.bias),
        ("lora_magnitude_vector", m.magnitude),
    ]


def _values(ctx: _Ctx) -> list[Finding]:
    """``nan-inf`` (error, per module), ``untrained-module`` (warning, per module) and ``all-zero``
    (error, the whole adapter).

    NaN/Inf in any factor makes the update NaN/Inf (a diverged training); counts are given per
    tensor. A module whose B (or A) is all zero has update ``s·B·A = 0``: PEFT initialises B to
    zero (``LoraLayer.reset_lora_parameters``), and B stays zero in a module that gets no gradient
    (MiniLM's ``pooler.dense`` when the loss uses the token embeddings): one such module is a
    warning, the rest of the adapter is trained. When every module's update is zero (and nothing
    is saved in full) the adapter changes nothing: saved before training, or never updated; that
    is one ``all-zero`` error instead of a warning per module.
    """
    import torch

    out: list[Finding] = []
    zero: list[Finding] = []
    src = _source(ctx.adapter)
    for name, m in ctx.adapter.modules.items():
        bad = []
        for label, t in _parts(m):
            if t is None or not t.is_floating_point():
                continue
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                bad.append(f"{label} holds {nan} NaN and {inf} Inf of {t.numel()} values")
        if bad:
            out.append(
                Finding(
                    "nan-inf",
                    "error",
                    name,
                    f"{src}: module {name!r}: {'; '.join(bad)}; its update is not finite (diverged training?)",
                )
            )
            continue
        for label, t in (("lora_B", m.up), ("lora_A", m.down)):
            if t.is_floating_point() and not bool(t.any()):
                zero.append(
                    Finding(
                        "untrained-module",
                        "warning",
                        name,
                        f"{src}: module {name!r}: {label} is all zero, so its update s·B·A is zero: the "
                        "module was never trained (it got no gradient, e.g. a pooler the loss does not "
                        "use) and changes nothing",
                    )
                )
                break
    modules = len(ctx.adapter.modules)
    if modules and len(zero) == modules and not ctx.adapter.modules_to_save:
        out.append(
            Finding(
                "all-zero",
                "error",
                None,
                f"{src}: every update is zero: lora_B (or lora_A) is all zero in all {modules} modules, "
                "as PEFT initialises them; the adapter was saved before training, or training never "
                "updated it",
            )
        )
    else:
        out.extend(zero)
    for key, t in ctx.adapter.modules_to_save.items():
        if t.is_floating_point():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                out.append(
                    Finding(
                        "nan-inf",
                        "error",
                        key.rsplit(".", 1)[0],
                        f"{src}: saved tensor {key!r} holds {nan} NaN and {inf} Inf of {t.numel()} values",
                    )
                )
    return out


def _max_rank(ctx: _Ctx, max_rank: int) -> list[Finding]:
    """``rank-too-large`` (error): a module's rank above ``max_rank``; fixed by an optimal SVD truncation."""
    fix = ctx.cmd("truncate", "-o", "OUT", "--rank", str(max_rank))
    return [
        Finding(
            "rank-too-large",
            "error",
            name,
            f"module {name!r} has rank {m.rank}, above --max-rank {max_rank}",
            fix,
        )
        for name, m in ctx.adapter.modules.items()
        if m.rank > max_rank
    ]


def _against_base(ctx: _Ctx) -> list[Finding]:
    """``unmatched-module`` and ``shape-mismatch`` (errors), against the base's tensors.

    As ``api.plan_merge`` does: each module resolves to a base weight by :class:`NameResolver`
    (tied output heads to the input embedding), and its update shape (``LoraModule.weight_shape``)
    must equal that weight's; ``lora_B.bias`` needs a base bias; ``modules_to_save`` tensors must
    match the tensors they replace. ``merge`` refuses all of these.
    """
    from .formats.names import NameResolver, ties_word_embeddings
    from .io.quant import find_quantized

    b = ctx.base
    assert b is not None
    a = ctx.adapter
    resolver = NameResolver(b.tensors, tie_word_embeddings=ties_word_embeddings(b.config))
    quantized = find_quantized(b)  # 4-bit weights: their real shape, not the packed one

    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(quantized[key].shape) if key in quantized else tuple(b.info(key).shape)

    out: list[Finding] = []

    def resolve(name: str, leaf: str = "weight") -> tuple[str | None, str | None]:
        try:
            return resolver.resolve(name, leaf), None
        except InputError as e:
            return None, e.message

    for name, m in a.modules.items():
        key, why = resolve(name)
        if key is None:
            out.append(
                Finding(
                    "unmatched-module",
                    "error",
                    name,
                    f"module {name!r} matches no weight of the base {b.path}"
                    + (f": {why}" if why else "; is the adapter for this base model?"),
                )
            )
            continue
        shape = shape_of(key)
        if shape != tuple(m.weight_shape):
            out.append(
                Finding(
                    "shape-mismatch",
                    "error",
                    name,
                    f"module {name!r}: adapter update is {list(m.weight_shape)} but base weight {key!r} "
                    f"is {list(shape)}; is this adapter for another base model?",
                )
            )
        if m.bias is not None:
            bkey, _ = resolve(name, "bias")
            if bkey is None:
                out.append(
                    Finding(
                        "shape-mismatch",
                        "error",
                        name,
                        f"module {name!r} has lora_B.bias but the base layer has no bias "
                        "(PEFT cannot merge it either)",
                    )
                )
    for key, t in a.modules_to_save.items():
        module = key.rsplit(".", 1)[0]
        try:
            bkey = resolver.resolve_tensor(key.replace(".base_layer.", "."))
        except InputError as e:
            bkey, why = None, e.message
        else:
            why = None
        if bkey is None:
            out.append(
                Finding(
                    "unmatched-module",
                    "error",
                    module,
                    f"saved tensor {key!r} (modules_to_save) of module {module!r} matches no tensor of the "
                    f"base {b.path}" + (f": {why}" if why else ""),
                )
            )
        elif shape_of(bkey) != tuple(t.shape):
            out.append(
                Finding(
                    "shape-mismatch",
                    "error",
                    module,
                    f"saved tensor {key!r} of module {module!r} is {list(t.shape)} but base tensor {bkey!r} is "
                    f"{list(shape_of(bkey))}",
                )
            )
    return out


def _init(ctx: _Ctx) -> list[Finding]:
    """``base-changing-init`` (warning): ``init_lora_weights`` of pissa/olora/corda/loftq/lora_ga.

    PEFT's docs: such an adapter was trained against a modified base (the residual after taking
    the init's components out); applied to the original base it computes something else unless it
    is first converted with ``save_pretrained(path_initial_model_for_weight_conversion=...)``.
    """
    a = ctx.adapter
    if not a.init:
        return []
    return [
        Finding(
            "base-changing-init",
            "warning",
            None,
            f"{_source(a)}: trained with init_lora_weights={a.init!r}, which changes the base weights; on the "
            "original base it gives different outputs unless converted to a plain LoRA first "
            "(PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))",
        )
    ]


# --------------------------------------------------------------------------------------------
# helpers shared by the runtime rules
# --------------------------------------------------------------------------------------------
def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _peft_folder(a: Adapter) -> str | None:
    """Why ``a`` is not a PEFT adapter folder (adapter_config.json + adapter_model.*) a runtime can load, or None."""
    if a.format != "peft":
        return f"is a {a.format} adapter"
    if not a.path.is_dir():
        return "is a single file, not a PEFT folder"
    if not (a.path / "adapter_config.json").exists():
        return "has no adapter_config.json"
    if not any((a.path / w).exists() for w in _PEFT_WEIGHTS):
        return "has no adapter_model.safetensors"
    return None


def _served_config(a: Adapter) -> dict[str, Any] | None:
    """The adapter_config.json a runtime reads: the file's, or the one ``convert --to peft`` would write."""
    if a.format == "peft" and a.config.get("r") is not None:
        return a.config
    from .formats.peft import peft_config

    try:
        return peft_config(a)
    except FormatError:
        return None


def _config_scale(cfg: dict[str, Any]) -> float | None:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) from a config: one scale for every module."""
    try:
        r, alpha = float(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        return None
    if r <= 0:
        return None
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _patterns_ignored(ctx: _Ctx, code: str, rule: str) -> list[Finding]:
    """Modules whose scale differs from the config's lora_alpha/r, for a runtime that applies that one
    scale to every module (``rule`` is formatted with ``served``)."""
    cfg = _served_config(ctx.adapter)
    served = _config_scale(cfg) if cfg else None
    if served is None:
        return []
    return [
        Finding(
            code,
            "warning",
            m.name,
            f"module {m.name!r} has rank {m.rank}, alpha {m.alpha:g} (scale {m.scale:g}), but "
            + rule.format(served=served),
            ctx.cmd("convert", "-o", "OUT", "--to", "peft", "--normalize"),
        )
        for m in _scale_mismatches(ctx.adapter, served)
    ]


def _scale_mismatches(a: Adapter, served: float) -> list[LoraModule]:
    return [m for m in a.modules.values() if not math.isclose(m.scale, served, rel_tol=1e-6, abs_tol=0.0)]


def _saved_modules(a: Adapter) -> list[str]:
    """Modules replaced whole (PEFT ``modules_to_save``): from the config and from the saved tensors.

    ``<m>.base_layer.weight`` keys are PEFT's saved embedding layers (``save_embedding_layers``), not
    modules_to_save; ``<m>.bias`` keys are trained biases (:func:`_saved_biases`).
    """
    names = [str(n) for n in (a.config.get("modules_to_save") or [])] if a.format == "peft" else []
    for key in a.modules_to_save:
        if ".base_layer." not in key and not key.endswith(".bias"):
            names.append(key.rsplit(".", 1)[0])
    return list(dict.fromkeys(names))


def _saved_biases(a: Adapter) -> list[str]:
    """Base biases trained and saved in the adapter (PEFT ``bias="all"`` / ``"lora_only"``), by module."""
    return [k.rsplit(".", 1)[0] for k in a.modules_to_save if k.endswith(".bias") and ".base_layer." not in k]


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _layout(ctx: _Ctx, code: str, runtime: str, reads: str) -> list[Finding]:
    why = _peft_folder(ctx.adapter)
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


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------
def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (``MaxLoRARanks``), or None above 512."""
    for r in VLLM_MAX_LORA_RANKS:
        if rank <= r:
            return r
    return None


def _vllm(ctx: _Ctx) -> list[Finding]:
    """What vLLM accepts.

    - ``vllm-layout`` (error): vLLM loads a folder: ``PEFTHelper.from_local_dir`` reads
      adapter_config.json and ``PEFTHelper.from_dict`` requires ``r``, ``lora_alpha`` and
      ``target_modules``; ``LoRAModel.from_local_checkpoint`` reads adapter_model.safetensors
      (or .bin/.pt).
    - ``vllm-modules-to-save`` (error): ``PEFTHelper._validate_features``: "vLLM only supports
      modules_to_save being None"; the saved full tensors are also no LoRA weight
      (``parse_fine_tuned_lora_name`` raises "is unsupported LoRA weight").
    - ``vllm-dora`` (error): ``_validate_features``: "vLLM does not yet support DoRA".
    - ``vllm-lora-bias`` (error): ``lora_B.bias`` is no name ``parse_fine_tuned_lora_name`` accepts;
      ``vllm-bias`` (error): a config ``bias`` other than ``"none"`` fails ``validate_legal``.
    - ``vllm-max-lora-rank`` (info; error above 512): vLLM allocates every LoRA slot at
      ``--max-lora-rank`` (default 16, one of ``MaxLoRARanks`` = 1, 8, 16, 32, 64, 128, 256, 320, 512)
      and refuses "LoRA rank R is greater than max_lora_rank" (``validate_legal`` /
      ``WorkerLoRAManager._load_adapter``); the value needed is the largest rank rounded up.
    - ``vllm-patterns-ignored`` (warning): ``PEFTHelper.from_dict`` keeps only its own fields, so
      ``rank_pattern``/``alpha_pattern`` are dropped, and ``LoRALayerWeights.from_config`` gives
      every module the config's ``lora_alpha / r`` (``vllm_lora_scaling_factor``): a module whose
      own scale differs is served with the wrong scale. (A later PEFTHelper revision reads the
      patterns; vllm-project/vllm's lora_weights.py as stored here does not.)
    - ``vllm-unknown-module`` (error): ``from_local_checkpoint`` raises "expected target modules in
      [...] but received [...]" for a module whose last name component is not among the model's
      supported modules (see :data:`VLLM_LORA_MODULES`); ``vllm-modules-unchecked`` (info) when the
      architecture is unknown (no base, or one not in the table).
    """
    a = ctx.adapter
    out = _layout(
        ctx,
        "vllm-layout",
        "vLLM",
        "adapter_config.json with r, lora_alpha, target_modules + adapter_model.safetensors",
    )
    if not out and not all(k in a.config for k in ("r", "lora_alpha", "target_modules")):
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in a.config]
        out.append(
            Finding(
                "vllm-layout",
                "error",
                None,
                f"{a.path}/adapter_config.json lacks {', '.join(missing)}, which vLLM's PEFTHelper requires",
                ctx.cmd("convert", "-o", "OUT", "--to", "peft"),
            )
        )
    for name in _saved_modules(a):
        out.append(
            Finding(
                "vllm-modules-to-save",
                "error",
                name,
                f"module {name!r} is saved whole (modules_to_save); vLLM refuses adapters with modules_to_save "
                f'("vLLM only supports modules_to_save being None"). {_VLLM_LOAD_TIME}',
            )
        )
    dora = [m.name for m in a.modules.values() if m.is_dora]
    if dora or (a.format == "peft" and a.config.get("use_dora")):
        out.append(
            Finding(
                "vllm-dora",
                "error",
                dora[0] if dora else None,
                (
                    f"DoRA adapter ({len(dora)} modules with lora_magnitude_vector, e.g. {_few(dora)})"
                    if dora
                    else "DoRA adapter (use_dora in adapter_config.json)"
                )
                + f'; vLLM refuses it ("vLLM does not yet support DoRA"). {_VLLM_LOAD_TIME}',
            )
        )
    for m in a.modules.values():
        if m.bias is not None:
            out.append(
                Finding(
                    "vllm-lora-bias",
                    "error",
                    m.name,
                    f"module {m.name!r} has lora_B.bias (lora_bias), which vLLM cannot load "
                    f"(parse_fine_tuned_lora_name: unsupported LoRA weight). {_VLLM_LOAD_TIME}",
                )
            )
    if a.format == "peft" and str(a.config.get("bias", "none")) != "none":
        out.append(
            Finding(
                "vllm-bias",
                "error",
                None,
                f"{a.path}: adapter_config.json has bias={a.config['bias']!r} (trained base biases); vLLM serves "
                f"adapters with bias='none' only (PEFTHelper.validate_legal). {_VLLM_LOAD_TIME}",
            )
        )
    out.extend(_vllm_rank(ctx))
    out.extend(
        _patterns_ignored(
            ctx,
            "vllm-patterns-ignored",
            "vLLM drops rank_pattern/alpha_pattern and scales every module by lora_alpha/r = {served:g}",
        )
    )
    out.extend(
        _unknown_modules(
            ctx,
            VLLM_LORA_MODULES,
            "vllm-unknown-module",
            "vllm-modules-unchecked",
            "vLLM",
            lambda m, arch, known: (
                f"module {m!r}: vLLM's {arch} takes LoRA only on {', '.join(sorted(known))}; loading the adapter "
                f'fails with "expected target modules in [...] but received [...]". {_VLLM_LOAD_TIME}'
            ),
        )
    )
    return out


def _vllm_rank(ctx: _Ctx) -> list[Finding]:
    a = ctx.adapter
    if not a.modules:
        return []
    top = max(a.modules.values(), key=lambda m: m.rank)
    rank = top.rank
    cfg_r = a.config.get("r") if a.format == "peft" else None
    if isinstance(cfg_r, int) and cfg_r > rank:
        rank = cfg_r  # validate_legal compares the config's r
    need = vllm_max_lora_rank(rank)
    if need is None:
        return [
            Finding(
                "vllm-max-lora-rank",
                "error",
                top.name,
                f"module {top.name!r} has rank {rank}; vLLM's --max-lora-rank allows at most "
                f"{VLLM_MAX_LORA_RANKS[-1]} (allowed: {', '.join(map(str, VLLM_MAX_LORA_RANKS))})",
                ctx.cmd("truncate", "-o", "OUT", "--rank", str(VLLM_MAX_LORA_RANKS[-1])),
            )
        ]
    extra = (
        f"; vLLM's default ({VLLM_DEFAULT_MAX_LORA_RANK}) is too small"
        if need > VLLM_DEFAULT_MAX_LORA_RANK
        else ""
    )
    return [
        Finding(
            "vllm-max-lora-rank",
            "info",
            top.name,
            f"serve with --max-lora-rank {need} (largest rank {rank}, module {top.name!r}, rounded up to the "
            f"values vLLM allows){extra}",
        )
    ]


def _unknown_modules(
    ctx: _Ctx,
    table: dict[str, frozenset[str]],
    code: str,
    unchecked_code: str,
    runtime: str,
    message: Callable[[str, str, frozenset[str]], str],
) -> list[Finding]:
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
        if _leaf(name) not in known
    ]


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------
def _loractl_gguf_archs() -> frozenset[str]:
    """Base architectures loractl's GGUF writer handles (``formats.gguf.HF_ARCHITECTURES``)."""
    try:
        from .formats import gguf
    except ImportError:  # pragma: no cover - the writer is optional
        return frozenset()
    return frozenset(getattr(gguf, "HF_ARCHITECTURES", {}))


def _llamacpp(ctx: _Ctx) -> list[Finding]:
    """What llama.cpp accepts (a GGUF LoRA written by ``convert_lora_to_gguf.py`` or loractl).

    - ``llamacpp-arch`` (error; info without a base): ``convert_lora_to_gguf.py`` builds on
      ``ModelBase.from_model_architecture(hparams["architectures"][0])`` and exits with "Model X is
      not supported" for others (:data:`LLAMACPP_ARCHITECTURES`).
    - ``llamacpp-dora``, ``llamacpp-lora-bias``, ``llamacpp-modules-to-save`` (errors): its
      ``LoraModel.get_tensors`` accepts only ``lora_A``/``lora_B`` (and embedding) tensors, skips
      ``.base_layer.weight`` and keeps norms; any other tensor (``lora_magnitude_vector``,
      ``lora_B.bias``, a saved full weight) is "Unexpected name ...: Not a lora_A or lora_B tensor"
      and the script exits. A GGUF LoRA has nowhere to put them.
    - ``llamacpp-permute`` (info): for Llama-family bases ``LlamaModel.modify_tensors`` permutes q/k
      rows (``LlamaModel.permute``) and the LoRA B factor must follow; loractl's GGUF writer does.
    - ``llamacpp-fold-scale`` (info): llama.cpp scales a module by ``alpha / r`` with one alpha per
      file (``adapter.lora.alpha``) and r from each ``lora_b`` (``llama_adapter_lora_weight::get_scale``,
      used by ``build_lora_mm``); the script writes ``lora_alpha`` and ignores ``use_rslora`` and
      ``alpha_pattern``. Modules whose scale differs need it folded into B, which
      ``loractl convert --to gguf`` does.
    - ``llamacpp-layout`` (info): the script reads only PEFT folders; loractl converts any format.
    """
    a = ctx.adapter
    out: list[Finding] = []
    arch = ctx.arch
    gguf_fix = ctx.cmd("convert", "-o", "OUT.gguf", "--to", "gguf", "--base", ctx.base_for_cmd)
    writer_archs = _loractl_gguf_archs()
    if a.format != "gguf":
        if ctx.base is None:
            out.append(
                Finding(
                    "llamacpp-arch",
                    "info",
                    None,
                    "base architecture not checked: give --base (convert_lora_to_gguf.py needs the base's "
                    "config.json to pick the model class)",
                )
            )
        elif arch not in LLAMACPP_ARCHITECTURES:
            out.append(
                Finding(
                    "llamacpp-arch",
                    "error",
                    None,
                    f"base {ctx.base.path} is {arch or 'of unknown architecture (config.json has no architectures)'}"
                    f"; convert_lora_to_gguf.py converts only architectures convert_hf_to_gguf.py registers "
                    f"(loractl knows {', '.join(sorted(LLAMACPP_ARCHITECTURES))})",
                )
            )
    dora = [m.name for m in a.modules.values() if m.is_dora]
    if dora:
        out.append(
            Finding(
                "llamacpp-dora",
                "error",
                dora[0],
                f"DoRA adapter ({len(dora)} modules with lora_magnitude_vector, e.g. {_few(dora)}); llama.cpp "
                "applies plain LoRA only and convert_lora_to_gguf.py stops at the magnitude vectors",
            )
        )
    for m in a.modules.values():
        if m.bias is not None:
            out.append(
                Finding(
                    "llamacpp-lora-bias",
                    "error",
                    m.name,
                    f"module {m.name!r} has lora_B.bias (lora_bias); a GGUF LoRA holds only lora_a/lora_b",
                )
            )
    for name in _saved_modules(a):
        if "norm" in _leaf(name):
            continue  # convert_lora_to_gguf.py keeps norm weights (mergekit-extract-lora)
        out.append(
            Finding(
                "llamacpp-modules-to-save",
                "error",
                name,
                f"module {name!r} is saved whole (modules_to_save); a GGUF LoRA holds only lora_a/lora_b pairs",
            )
        )
    for name in _saved_biases(a):
        out.append(
            Finding(
                "llamacpp-modules-to-save",
                "error",
                name,
                f"module {name!r} has a trained bias saved in the adapter (PEFT bias='all'/'lora_only'); "
                "a GGUF LoRA holds only lora_a/lora_b pairs",
            )
        )
    if a.format == "gguf":
        return out
    fix_ok = arch is not None and arch in writer_archs
    if a.format != "peft":
        out.append(
            Finding(
                "llamacpp-layout",
                "info",
                None,
                f"{a.path} is a {a.format} adapter; llama.cpp's convert_lora_to_gguf.py reads PEFT folders only, "
                "loractl writes the GGUF directly",
                gguf_fix if fix_ok or ctx.base is None else None,
            )
        )
    if arch in LLAMACPP_PERMUTED:
        qk = [n for n in a.modules if _leaf(n) in ("q_proj", "k_proj")]
        if qk:
            out.append(
                Finding(
                    "llamacpp-permute",
                    "info",
                    qk[0],
                    f"{len(qk)} q/k modules (e.g. {_few(qk)}): llama.cpp permutes {arch}'s q/k rows "
                    "(LlamaModel.permute), so their B factors must be permuted too; loractl's GGUF writer and "
                    "convert_lora_to_gguf.py do, a hand-written converter must",
                    gguf_fix if fix_ok else None,
                )
            )
    cfg = _served_config(a) or {}
    try:
        file_alpha = float(cfg.get("lora_alpha"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        file_alpha = None
    if file_alpha is not None:
        # get_scale: alpha ? adapter_scale * alpha / rank : adapter_scale
        off = [
            m
            for m in a.modules.values()
            if not math.isclose(m.scale, file_alpha / m.rank if file_alpha else 1.0, rel_tol=1e-6)
        ]
        if off:
            why = "rsLoRA" if any(m.rslora for m in off) else "per-module alpha (alpha_pattern)"
            out.append(
                Finding(
                    "llamacpp-fold-scale",
                    "info",
                    off[0].name,
                    f"{len(off)} modules (e.g. {_few([m.name for m in off])}) use {why}: llama.cpp scales every "
                    f"module by one alpha / rank ({file_alpha:g} / r), so their scale must be folded into B; "
                    "convert_lora_to_gguf.py does not, loractl's GGUF writer does"
                    + ("" if fix_ok or ctx.base is None else f" (but not for {arch})"),
                    gguf_fix if fix_ok or ctx.base is None else None,
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# LoRAX
# --------------------------------------------------------------------------------------------
def lorax_padded_rank(rank: int, world_size: int = 1) -> int:
    """The rank LoRAX pads a module to (``pad_to_min_rank`` in server/lorax_server/utils/punica.py):
    ``MIN_SGMV_RANK·world_size`` when at or below it, else the next multiple of ``SGMV_BLOCK_SIZE`` (16)."""
    min_rank = LORAX_MIN_SGMV_RANK * world_size
    if rank <= min_rank:
        return min_rank
    return -(-rank // LORAX_SGMV_BLOCK_SIZE) * LORAX_SGMV_BLOCK_SIZE


def _layer_type(name: str) -> tuple[str, int] | None:
    m = _LAYER.match(name)
    return (m["pre"] + "*" + m["post"], int(m["idx"])) if m else None


def _layer_count(ctx: _Ctx) -> int | None:
    if ctx.base is None:
        return None
    cfg = ctx.base.config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        for c in (cfg, text):
            if isinstance(c.get(key), int):
                return int(c[key])
    return None


def _lorax(ctx: _Ctx) -> list[Finding]:
    """What LoRAX accepts.

    - ``lorax-layout`` (error): ``LoraConfig.load`` reads adapter_config.json with PEFT's
      ``LoraConfig.from_pretrained``; weights are the folder's ``.safetensors`` files.
    - ``lorax-rank-padding`` (warning): with its SGMV kernels LoRAX zero-pads every module's A and
      B (``LoraWeights.load`` → ``pad_rank``) to ``MIN_SGMV_RANK`` (8) or the next multiple of
      ``SGMV_BLOCK_SIZE`` (16); the update is unchanged but memory and compute are spent on the
      padding, and the padded rank is what counts against LoRAX's limits.
    - ``lorax-rank-max`` (warning): above ``MAX_RANK_CUSTOM`` = ``BGMV_MAX_RANK`` = 128
      ``BatchLoraWeights.can_vectorize`` is False and LoRAX leaves its batched kernels for a
      per-adapter loop (slower, not an error).
    - ``lorax-mixed-ranks`` (error): one layer type's modules are stacked across layers
      (``torch.stack`` in ``LoraWeights.__init__``), which fails when their padded ranks differ.
    - ``lorax-partial-layers`` (error): ``LoraWeights.load`` returns None for a layer type as soon
      as one layer lacks it, so a module type adapted on only some layers is dropped everywhere
      (``Model.load_adapter`` only logs "unused adapter weights"). The layer count comes from the
      base's config.json for the architectures of :data:`LORAX_MODULES`; otherwise only layers
      that other modules of the adapter cover are compared.
    - ``lorax-patterns-ignored`` (warning): the scale is ``get_scaling_factor(config.lora_alpha,
      config.r)`` for every module; ``rank_pattern``/``alpha_pattern`` are not read.
    - ``lorax-unknown-module``, ``lorax-dora``, ``lorax-lora-bias``, ``lorax-modules-to-save``
      (errors): ``LoraConfig.map_weights_for_model`` takes only ``lora_A.weight``/``lora_B.weight``
      of the model's ``ADAPTER_LAYERS``; magnitude vectors, biases, embedding LoRAs, saved full
      tensors and other modules are silently ignored (a log warning), so the served model is not
      the trained one.
    """
    a = ctx.adapter
    out = _layout(ctx, "lorax-layout", "LoRAX", "adapter_config.json + .safetensors weights")
    mods = list(a.modules.values())
    if mods:
        top = max(mods, key=lambda m: m.rank)
        need = lorax_padded_rank(top.rank)
        unpadded = [m for m in mods if lorax_padded_rank(m.rank) != m.rank]
        for m in unpadded:
            out.append(
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
            )
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
    groups: dict[str, dict[int, LoraModule]] = {}
    for m in mods:
        lt = _layer_type(m.name)
        if lt is not None:
            groups.setdefault(lt[0], {})[lt[1]] = m
    # every layer has every adapter layer type only in the homogeneous models of LORAX_MODULES
    n_layers = _layer_count(ctx) if ctx.arch in LORAX_MODULES else None
    seen_layers = {i for g in groups.values() for i in g}
    all_layers = set(range(n_layers)) if n_layers else seen_layers
    for pattern, by_layer in groups.items():
        padded = {lorax_padded_rank(m.rank) for m in by_layer.values()}
        if len(padded) > 1:
            first = by_layer[min(by_layer)]
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
            first = by_layer[min(by_layer)]
            out.append(
                Finding(
                    "lorax-partial-layers",
                    "error",
                    first.name,
                    f"modules {pattern!r} ({_few([m.name for m in by_layer.values()])}) are adapted on "
                    f"{len(by_layer)} layers but not on layers "
                    f"{', '.join(map(str, missing[:8]))}{'...' if len(missing) > 8 else ''}; LoRAX loads a layer "
                    "type only when every layer has it and silently drops all of these",
                )
            )
    out.extend(
        _patterns_ignored(
            ctx,
            "lorax-patterns-ignored",
            "LoRAX scales every module by the config's lora_alpha/r = {served:g} (rank_pattern/alpha_pattern not read)",
        )
    )
    ignored = (
        "LoRAX ignores it silently (only a log warning), so it serves a different model than was trained"
    )
    for m in mods:
        if m.is_dora:
            out.append(Finding("lorax-dora", "error", m.name, f"module {m.name!r} is DoRA; {ignored}"))
        if m.bias is not None:
            out.append(
                Finding("lorax-lora-bias", "error", m.name, f"module {m.name!r} has lora_B.bias; {ignored}")
            )
    for name in _saved_modules(a):
        out.append(
            Finding(
                "lorax-modules-to-save",
                "error",
                name,
                f"module {name!r} is saved whole (modules_to_save); {ignored}",
            )
        )
    for name in _saved_biases(a):
        out.append(
            Finding(
                "lorax-modules-to-save",
                "error",
                name,
                f"module {name!r} has a trained bias saved in the adapter (PEFT bias='all'/'lora_only'); {ignored}",
            )
        )
    out.extend(
        _unknown_modules(
            ctx,
            LORAX_MODULES,
            "lorax-unknown-module",
            "lorax-modules-unchecked",
            "LoRAX",
            lambda m, arch, known: (
                f"module {m!r}: LoRAX's {arch} takes LoRA only on {', '.join(sorted(known))}; {ignored}"
            ),
        )
    )
    return out


# --------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------
def _peft(ctx: _Ctx) -> list[Finding]:
    """What PEFT (``PeftModel.from_pretrained``) accepts.

    - ``peft-layout`` (error): PEFT loads a folder with adapter_config.json and adapter_model.*.
    - ``peft-config`` (error; warning for ignored keys): the config must build a ``LoraConfig`` the
      way ``PeftConfig.from_pretrained`` does (``PeftConfigMixin.from_peft_type``): unknown keys are
      dropped with a warning (a config from a newer PEFT), anything else ``LoraConfig`` rejects is
      an error.
    - ``peft-unavailable`` (info): peft is not a dependency of loractl; without it the config is
      not tried.
    """
    a = ctx.adapter
    out = _layout(
        ctx, "peft-layout", "PeftModel.from_pretrained", "adapter_config.json + adapter_model.safetensors"
    )
    if out:
        return out
    try:
        import peft
    except ImportError:
        return [
            Finding(
                "peft-unavailable",
                "info",
                None,
                "peft is not installed, so adapter_config.json was not loaded with peft.LoraConfig "
                "(pip install peft)",
            )
        ]
    cfg = dict(a.config)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return [
            Finding(
                "peft-config",
                "error",
                None,
                f"{a.path}/adapter_config.json: peft_type is {cfg['peft_type']!r}, not LORA",
            )
        ]
    cfg.setdefault("peft_type", "LORA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft.LoraConfig.from_peft_type(**cfg)
        except Exception as e:  # LoraConfig raises TypeError/ValueError/others for bad values
            return [
                Finding(
                    "peft-config",
                    "error",
                    None,
                    f"{a.path}/adapter_config.json does not load in peft {peft.__version__}: {type(e).__name__}: {e}",
                )
            ]
    for w in caught:
        text = str(w.message)
        if "Unexpected keyword arguments" in text:
            out.append(
                Finding(
                    "peft-config",
                    "warning",
                    None,
                    f"{a.path}/adapter_config.json: peft {peft.__version__} ignores some keys: {text.split('. ')[0]}",
                )
            )
    return out


_RUNTIMES: dict[str, Callable[[_Ctx], list[Finding]]] = {
    "peft": _peft,
    "vllm": _vllm,
    "llama.cpp": _llamacpp,
    "lorax": _lorax,
}
