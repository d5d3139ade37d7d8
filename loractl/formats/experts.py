"""LoRA on MoE experts (PEFT ``target_parameters``): which parameter a key is, and where it lands on disk.

transformers 5 holds the experts of an MoE block as fused parameters of one module (``...mlp.experts``):
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (``[E, H, 2I]`` / ``[E, I, H]`` when the
class says ``is_transposed``: GPT-OSS). PEFT's ``LoraConfig(target_parameters=[...])`` wraps such a
parameter in a ``lora.ParamWrapper`` and saves ``lora_A`` ``[r·E, in]`` and ``lora_B`` ``[out, r·E]``
(the arithmetic is in :mod:`loractl.ops.experts`). But ``save_pretrained`` writes each architecture's
checkpoint layout, not the fused one (transformers' conversion mappings, reversed): Qwen-style
``experts.{e}.gate_proj.weight`` (rows ``[0, I)`` of ``gate_up_proj[e]``) + ``up_proj.weight`` (rows
``[I, 2I)``) + ``down_proj.weight``; Mixtral-style ``block_sparse_moe.experts.{e}.w1/w3/w2.weight``;
GraniteMoE renamed fused tensors; GPT-OSS, Llama-4 and DBRX as in memory. A base saved with
``save_original_format=False`` holds the in-memory names. :func:`pieces` resolves a parameter against
the base's actual tensors, whichever layout it has.

The facts (with PEFT and transformers sources and proofs) are in the project's notes on MoE
(issue #13): key nesting, expert order inside ``r·E``, orientation, two roundings, layouts.
:data:`ARCHS` restates transformers 5.24's own facts as plain data (transformers is not imported
here); tests/formats/test_experts.py checks them against the transformers classes and merges with
them bit for bit as PEFT's ``merge_and_unload`` + ``save_pretrained`` do.

How the rest of loractl uses it
-------------------------------
- **Reader** (formats/peft.py): a key prefix ``<module>(.base_layer)*`` whose ``lora_A`` / ``lora_B``
  belong to a targeted parameter (:func:`parameters_of` with the adapter config's ``target_parameters``
  and the base's model type) becomes ONE ``LoraModule`` per parameter, named by the parameter
  (``model.layers.0.mlp.experts.gate_up_proj``), ``experts`` = E and ``rank`` the rank per expert; r and
  alpha from ``rank_pattern`` / ``alpha_pattern`` matched against the parameter's name,
  ``E = lora_A.shape[0] // r``. Read without a base (the model type unknown), the experts modules and
  the order of their parameters are those every architecture of :data:`ARCHS` shares
  (:data:`PARAM_ORDER`); the writer nests them back in that order (:func:`saved_prefixes`).
- **Planner** (plan.py): :func:`pieces` gives every base tensor a parameter LoRA touches; each becomes a
  contribution ``(module, expert, rows, index, transposed)`` of that tensor's merge, whose arithmetic
  (:mod:`loractl.ops.experts`: PEFT's einsum per expert, two roundings) ops/merge.py applies one base
  tensor and one expert's update at a time.
- **truncate / combine / similarity / convert** work per expert: each expert's ``(A_e, B_e)`` is a rank-r
  LoRA of its own (``LoraModule.expert``), restacked in PEFT's layout (``adapter.stack_experts``). The
  stacked ``lora_A`` is not one rank-r·E matrix of anything: an SVD of it is meaningless.

Errors: :class:`~loractl.errors.ShapeMismatchError` (exit 2) naming the adapter file, the parameter
and the base tensor when the expert count or shapes do not fit; FormatError / UnsupportedAdapterError
for keys that cannot be placed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, InputError, ShapeMismatchError, UnsupportedAdapterError
from .names import NameResolver

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import LoraModule


class NoBaseTensor(InputError):
    """The base has no tensor at all for a parameter LoRA (it matches nothing, as a module LoRA can)."""


@dataclass(frozen=True)
class Arch:
    """The experts facts of one architecture (transformers 5.24).

    Attributes:
        experts: regex for the end of the in-memory experts module's path (``mlp.experts``).
        params: the experts module's parameters in the order its class registers them
            (``named_parameters(recurse=False)``): PEFT nests the wrappers of several targeted
            parameters in that order, the first one innermost (``experts.base_layer.lora_*``).
        is_transposed: 3-D parameters are ``[E, in, out]`` (``@use_experts_implementation(is_transposed=True)``).
        num_experts: config keys that hold E, in order (dotted for nested ones); looked up in the
            config, then its ``text_config``.
        split: per-expert on-disk tensors of a fused parameter in the checkpoint layout: expert e's
            ``<experts>.{e}.<leaf>`` for each leaf, equal row chunks of ``param[e]`` in order
            (transformers' ``MergeModulelist(dim=0)`` + ``Concatenate(dim=1)``, reversed).
        renames: ``(in memory, on disk)`` substrings, applied in order to get a tensor's checkpoint
            name (transformers' ``WeightRenaming`` reversed).
    """

    experts: str
    params: tuple[str, ...]
    num_experts: tuple[str, ...]
    is_transposed: bool = False
    split: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()

    def is_experts(self, module: str) -> bool:
        """``module`` (a path in the model PEFT wrapped) is one of this architecture's experts modules."""
        return re.search(rf"(^|\.){self.experts}$", module) is not None

    def on_disk(self, name: str) -> str:
        """The checkpoint name of the in-memory tensor ``name`` (renames only; no split)."""
        for mem, disk in self.renames:
            name = name.replace(mem, disk)
        return name


_GATE_UP_DOWN = ("gate_up_proj", "down_proj")
#: transformers' "qwen2_moe" conversion: experts.{e}.gate_proj / up_proj / down_proj
_QWEN2 = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}
#: transformers' "mixtral" conversion: experts.{e}.w1 (gate) / w3 (up) / w2 (down), under block_sparse_moe
_MIXTRAL = {"gate_up_proj": ("w1.weight", "w3.weight"), "down_proj": ("w2.weight",)}
_BLOCK_SPARSE = ((".mlp.", ".block_sparse_moe."),)


def _qwen2(*num_experts: str, experts: str = r"mlp\.experts", renames: tuple = ()) -> Arch:
    return Arch(experts, _GATE_UP_DOWN, num_experts, split=_QWEN2, renames=renames)


def _mixtral(*num_experts: str, renames: tuple = ()) -> Arch:
    return Arch(r"mlp\.experts", _GATE_UP_DOWN, num_experts, split=_MIXTRAL, renames=_BLOCK_SPARSE + renames)


#: model_type (config.json) -> its experts facts. Every entry is checked end to end against PEFT's merge
#: (tests/formats/test_experts.py). Model types transformers maps onto the same conversions but left out
#: here (untested): afmoe, deepseek_v32, dots1, glm4_moe_lite, longcat_flash, flex_olmo, minimax_m2, ...
ARCHS: dict[str, Arch] = {
    "qwen3_moe": _qwen2("num_experts", "num_local_experts"),
    "qwen2_moe": _qwen2("num_experts"),
    "olmoe": _qwen2("num_experts", "num_local_experts"),
    "deepseek_v3": _qwen2("n_routed_experts", "num_local_experts"),
    "deepseek_v2": _qwen2("n_routed_experts", "num_experts"),
    "glm4_moe": _qwen2("n_routed_experts", "num_local_experts"),
    "qwen3_next": _qwen2("num_experts"),
    "ernie4_5_moe": _qwen2(
        "moe_num_experts", "num_experts", renames=((".mlp.gate.moe_statics.", ".mlp.moe_statics."),)
    ),
    "hunyuan_v1_moe": _qwen2("num_experts", "num_local_experts"),
    "jamba": _qwen2("num_experts", "num_local_experts", experts=r"feed_forward\.experts"),
    "mixtral": _mixtral("num_local_experts", "num_experts"),
    "minimax": _mixtral("num_local_experts", "num_experts"),
    "phimoe": _mixtral("num_local_experts", renames=((".router.weight", ".gate.weight"),)),
    "granitemoe": Arch(
        r"block_sparse_moe\.experts",
        _GATE_UP_DOWN,
        ("num_local_experts",),
        renames=(
            (".experts.gate_up_proj", ".input_linear.weight"),
            (".experts.down_proj", ".output_linear.weight"),
            (".router.weight", ".router.layer.weight"),
        ),
    ),
    # no conversion mapping: written as in memory; gate/up interleaved on the last dim (irrelevant here)
    "gpt_oss": Arch(
        r"mlp\.experts",
        ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        ("num_local_experts", "num_experts"),
        is_transposed=True,
    ),
    # stored [E, H, 2I] and used as x @ W[e], but no is_transposed: PEFT's in/out are its out/in. Llama4ForCausalLM
    # writes model_type llama4_text; the multimodal "llama4" config holds it as text_config (model_type_of)
    "llama4_text": Arch(r"feed_forward\.experts", _GATE_UP_DOWN, ("num_local_experts",)),
    # DbrxExperts holds DbrxExpertGLU `mlp` with 2-D [E·F, H] w1, v1, w2: PEFT puts ONE rank-r LoRA on the
    # whole stack (num_experts 1), not one per expert
    "dbrx": Arch(r"ffn\.experts\.mlp", ("w1", "v1", "w2"), ("ffn_config.moe_num_experts",)),
}


#: the parameters of every experts module of :data:`ARCHS`, in an order each architecture's registration order
#: follows (tested): how an adapter read without its base (model type unknown) is nested, and how the PEFT
#: writer nests parameter LoRAs back
PARAM_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "w1", "v1", "w2")


def model_type_of(config: Mapping[str, Any]) -> str | None:
    """The base's model type as :data:`ARCHS` knows it: ``model_type``, else its ``text_config``'s."""
    mt = config.get("model_type")
    if isinstance(mt, str) and mt in ARCHS:
        return mt
    text = config.get("text_config")
    if isinstance(text, Mapping) and isinstance(text.get("model_type"), str) and text["model_type"] in ARCHS:
        return text["model_type"]
    return mt if isinstance(mt, str) else None


def num_experts(config: Mapping[str, Any]) -> int | None:
    """E according to the base's config (None if the model type or the key is unknown)."""
    arch = ARCHS.get(model_type_of(config) or "")
    if arch is None:
        return None
    text = config.get("text_config")
    for cfg in (config, text if isinstance(text, Mapping) else {}):
        for key in arch.num_experts:
            value: Any = cfg
            for part in key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's ``_inject_parameters``: a target is the parameter's full name or a dot-suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def targeted_parameters(
    module: str, targets: Sequence[str], model_type: str | None, *, source: str = "adapter"
) -> list[str]:
    """The parameters of ``module`` that ``target_parameters`` wraps, in PEFT's nesting order.

    A known experts module has the parameters :data:`ARCHS` lists (in registration order); any other
    module is taken to be a linear layer whose one targetable parameter is ``weight`` (routers). With no
    model type (an adapter read without its base), an experts module is one any architecture of
    :data:`ARCHS` has, and its parameters are the targeted ones of :data:`PARAM_ORDER` (the caller checks
    that the adapter holds exactly that many wrappers: :func:`parameters_of`).

    Raises:
        UnsupportedAdapterError: targets on an experts module of a model type loractl does not know.
    """
    arch = ARCHS.get(model_type or "")
    if arch is not None and arch.is_experts(module):
        return [p for p in arch.params if _matches(f"{module}.{p}", targets)]
    if model_type is None and any(a.is_experts(module) for a in ARCHS.values()):
        return [p for p in PARAM_ORDER if _matches(f"{module}.{p}", targets)]
    if arch is None and re.search(r"(^|\.)experts(\.mlp)?$", module):
        hits = sorted({t for t in targets if _matches(f"{module}.{t.rpartition('.')[2]}", [t])})
        if hits:
            raise UnsupportedAdapterError(
                f"{source}: module {module!r}: target_parameters {hits} on the experts of a model of type {model_type!r}, "
                "whose experts layout loractl does not know",
                hint=f"known MoE model types: {', '.join(sorted(ARCHS))}",
            )
    return ["weight"] if _matches(f"{module}.weight", targets) else []


def parameter_of(
    prefix: str, target_parameters: Sequence[str], model_type: str | None, *, source: str = "adapter"
) -> str | None:
    """The parameter a PEFT key prefix holds the LoRA of, or None for an ordinary (``target_modules``) module.

    PEFT nests one ``ParamWrapper`` per targeted parameter of a module in the order the module registers
    them, the first innermost: of n, the i-th (0-based) is saved under ``<module>`` + ``.base_layer`` ×
    (n-1-i). So ``experts.lora_*`` alone does not say which parameter it is; the set of targeted
    parameters does.

    Args:
        prefix: the key without ``base_model.model.`` and ``.lora_A.weight`` / ``.lora_B.weight``
            (``model.layers.0.mlp.experts.base_layer``).
        target_parameters: the adapter config's ``target_parameters`` (order irrelevant).
        model_type: the base's (:func:`model_type_of`).
        source: the adapter file, for messages.

    Returns:
        The parameter's full name, e.g. ``model.layers.0.mlp.experts.gate_up_proj``.

    Raises:
        FormatError: more ``.base_layer`` levels than targeted parameters, or an experts module none of
            whose parameters is targeted.
        UnsupportedAdapterError: an experts module of an unknown model type.
    """
    module, depth = _unnest(prefix)
    params = targeted_parameters(module, target_parameters, model_type, source=source)
    arch = ARCHS.get(model_type or "")
    if depth >= len(params) and (depth or (arch is not None and arch.is_experts(module))):
        raise FormatError(
            f"{source}: tensor {prefix + '.lora_A.weight'!r}: {depth} '.base_layer' level(s), but "
            f"target_parameters {list(target_parameters)} wrap {len(params)} parameter(s) of {module!r}"
            + (f" ({', '.join(params)})" if params else ""),
            hint="is this adapter for a model of another type?",
        )
    if not params:
        return None
    return f"{module}.{params[len(params) - 1 - depth]}"


def _unnest(prefix: str) -> tuple[str, int]:
    """``(module, depth)`` of a key prefix ``<module>`` + ``.base_layer`` × depth."""
    module, depth = prefix, 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    return module, depth


def parameters_of(
    prefixes: Sequence[str], target_parameters: Sequence[str], model_type: str | None, *, source: str = "adapter"
) -> dict[str, str | None]:
    """:func:`parameter_of` for every key prefix of an adapter, checking that each module holds one wrapper per
    parameter its targets wrap (PEFT saves every one): a level missing would shift the nesting.

    Raises:
        FormatError: a module whose nesting levels are not exactly those of its targeted parameters.
        UnsupportedAdapterError: see :func:`parameter_of`.
    """
    out = {p: parameter_of(p, target_parameters, model_type, source=source) for p in prefixes}
    levels: dict[str, set[int]] = {}
    for prefix, param in out.items():
        if param is not None:
            module, depth = _unnest(prefix)
            levels.setdefault(module, set()).add(depth)
    for module, depths in sorted(levels.items()):
        params = targeted_parameters(module, target_parameters, model_type, source=source)
        if depths != set(range(len(params))):
            raise FormatError(
                f"{source}: module {module!r}: tensors at {len(depths)} '.base_layer' nesting level(s), but "
                f"target_parameters {list(target_parameters)} wrap {len(params)} of its parameters ({', '.join(params)})",
                hint=None
                if model_type
                else "read it with the base model (--base), so that loractl knows the experts' parameters",
            )
    return out


def saved_prefixes(parameters: Sequence[str]) -> dict[str, str]:
    """PEFT's key prefix of each parameter LoRA (``<module>`` + ``.base_layer`` × (n-1-i) for the i-th of the
    n parameters of one module, in :data:`PARAM_ORDER`): the inverse of :func:`parameters_of`.

    Raises:
        UnsupportedAdapterError: several parameters of one module, one of which loractl cannot order.
    """
    by_module: dict[str, list[str]] = {}
    for param in parameters:
        module, _, leaf = param.rpartition(".")
        by_module.setdefault(module, []).append(leaf)
    out: dict[str, str] = {}
    for module, leaves in by_module.items():
        unknown = [x for x in leaves if x not in PARAM_ORDER]
        if len(leaves) > 1 and unknown:
            raise UnsupportedAdapterError(
                f"module {module!r}: LoRAs on parameters {sorted(leaves)}: loractl does not know the order PEFT nests "
                f"{unknown[0]!r} in"
            )
        leaves.sort(key=lambda x: PARAM_ORDER.index(x) if x in PARAM_ORDER else 0)
        for i, leaf in enumerate(leaves):
            out[f"{module}.{leaf}"] = module + ".base_layer" * (len(leaves) - 1 - i)
    return out


@dataclass(frozen=True)
class Piece:
    """Where (part of) one expert's update lands in the base.

    ``base[tensor][index][:] += Δ_e[rows]`` (``index`` None: the whole tensor; ``rows`` None: all
    rows), ``Δ_e = expert_delta(A_e, B_e, s, transposed)`` in the orientation of the parameter's
    ``[e]`` slice, which is the orientation of every on-disk layout transformers writes.

    Attributes:
        tensor: the base tensor's name.
        expert: e, the expert whose factors give the update (0 for a 2-D parameter).
        index: e for a fused ``[E, ., .]`` tensor, None for a per-expert or 2-D one.
        rows: the rows of ``Δ_e`` this tensor holds (gate: ``[0, I)``, up: ``[I, 2I)``), None for all.
        transposed: ``Δ_e = (B_e @ A_e)ᵀ`` (the parameter is ``[E, in, out]``, ``is_transposed``).
        single: a 2-D parameter: PEFT's ``lora.Linear`` product ``(B @ A) · s``, not the experts' einsum.
    """

    tensor: str
    expert: int
    index: int | None
    rows: slice | None
    transposed: bool
    single: bool = False


def _chunks(n: int, k: int) -> list[slice]:
    """The row ranges of ``torch.chunk(t, k, dim=0)`` for ``n`` rows (transformers' ``Chunk``)."""
    step = math.ceil(n / k)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def pieces(
    shapes: Mapping[str, Sequence[int]],
    config: Mapping[str, Any],
    parameter: str,
    experts: int,
    update_shape: Sequence[int],
    *,
    source: str = "adapter",
    resolver: NameResolver | None = None,
) -> list[Piece]:
    """Every base tensor position a parameter LoRA updates, in the layout the base actually has.

    Looks for, in order: the checkpoint layout (per-expert tensors, or a renamed fused tensor), then
    the in-memory name (a fused base, ``save_original_format=False``). Names resolve as ordinary
    modules do (:class:`~loractl.formats.names.NameResolver`: exact, else a unique suffix).

    Args:
        shapes: every base tensor's shape by name.
        config: the base's config.json.
        parameter: the parameter's full in-memory name (:func:`parameter_of`).
        experts: E of the adapter (``lora_A.shape[0] // r``), 1 for a 2-D parameter.
        update_shape: one expert's ``B_e @ A_e``: ``(lora_B.shape[0], lora_A.shape[1])``.
        source: the adapter file, for messages.
        resolver: a resolver over ``shapes`` (made if not given).

    Returns:
        Pieces ordered by expert, then by tensor.

    Raises:
        ShapeMismatchError: the expert count or a shape does not fit the base tensor.
        NoBaseTensor: the base has no tensor for the parameter.
        InputError: experts are missing, or a name matches several base tensors.
        UnsupportedAdapterError: a 3-D parameter of a model type loractl does not know.
    """
    resolver = resolver or NameResolver(shapes)
    model_type = model_type_of(config)
    arch = ARCHS.get(model_type or "")
    module, _, pname = parameter.rpartition(".")
    out, inp = (int(d) for d in update_shape)
    where = f"{source}: parameter {parameter!r}"
    tried: list[str] = []

    def find(name: str) -> str | None:
        tried.append(name)
        return resolver.resolve_tensor(name)

    # the checkpoint's per-expert layout
    if arch is not None and pname in arch.split and arch.is_experts(module):
        leaves = arch.split[pname]
        first = [find(arch.on_disk(f"{module}.0.{leaf}")) for leaf in leaves]
        if all(first):
            return _split_pieces(shapes, config, arch, module, leaves, experts, (out, inp), where, resolver)
    transposed = bool(arch and arch.is_transposed and arch.is_experts(module))
    names = [arch.on_disk(parameter)] if arch is not None else []
    names += [parameter] if parameter not in names else []
    for name in names:
        hit = find(name)
        if hit is None:
            continue
        shape = tuple(int(d) for d in shapes[hit])
        if len(shape) == 2:  # a 2-D parameter: one LoRA over the whole tensor, [out, in]
            if experts != 1 or shape != (out, inp):
                raise ShapeMismatchError(
                    f"{where}: adapter update is {experts} x {[out, inp]} but base tensor {hit!r} is {list(shape)}",
                    hint="is this adapter for another base model?",
                )
            return [Piece(hit, 0, None, None, False, single=True)]
        if len(shape) != 3:
            raise ShapeMismatchError(
                f"{where}: base tensor {hit!r} is {list(shape)}, not [experts, rows, cols]"
            )
        if arch is None:
            raise UnsupportedAdapterError(
                f"{where}: base model type {model_type!r}: loractl does not know the orientation of its experts",
                hint=f"known MoE model types: {', '.join(sorted(ARCHS))}",
            )
        per = (inp, out) if transposed else (out, inp)
        if shape[0] != experts or shape[1:] != per:
            raise ShapeMismatchError(
                f"{where}: adapter has {experts} experts of {list(per)} but base tensor {hit!r} is {list(shape)}",
                hint="is this adapter for another base model?",
            )
        return [Piece(hit, e, e, None, transposed) for e in range(experts)]
    raise NoBaseTensor(
        f"{where}: the base has no tensor for it (looked for {', '.join(repr(t) for t in tried)})",
        hint="is this adapter for another base model?",
    )


def _split_pieces(
    shapes: Mapping[str, Sequence[int]],
    config: Mapping[str, Any],
    arch: Arch,
    module: str,
    leaves: tuple[str, ...],
    experts: int,
    update_shape: tuple[int, int],
    where: str,
    resolver: NameResolver,
) -> list[Piece]:
    """:func:`pieces` for a base in the per-expert layout: expert e's leaves are row chunks of ``param[e]``."""

    def names(e: int) -> list[str | None]:
        return [resolver.resolve_tensor(arch.on_disk(f"{module}.{e}.{leaf}")) for leaf in leaves]

    held = 0
    while all(names(held)):
        held += 1
    want = num_experts(config) or held
    if held < want:  # a gap: the config's experts are not all there
        missing = next(
            arch.on_disk(f"{module}.{held}.{leaf}") for leaf, n in zip(leaves, names(held)) if n is None
        )
        raise InputError(f"{where}: the base has no tensor {missing!r} (config: {want} experts)")
    if experts != held:
        raise ShapeMismatchError(
            f"{where}: adapter has {experts} experts but the base has {held} "
            f"(base tensors {names(0)[0]!r} to {names(held - 1)[0]!r})",
            hint="is this adapter for another base model?",
        )
    rows = _chunks(update_shape[0], len(leaves))
    result = []
    for e in range(experts):
        for leaf_rows, name in zip(rows, names(e)):
            assert name is not None
            want_shape = (leaf_rows.stop - leaf_rows.start, update_shape[1])
            shape = tuple(int(d) for d in shapes[name])
            if shape != want_shape or len(rows) != len(leaves):
                raise ShapeMismatchError(
                    f"{where}: adapter update of expert {e} is {list(update_shape)}, so base tensor {name!r} "
                    f"should be {list(want_shape)} but is {list(shape)}",
                    hint="is this adapter for another base model?",
                )
            result.append(Piece(name, e, None, None if len(leaves) == 1 else leaf_rows, arch.is_transposed))
    return result


def per_expert(module: LoraModule, config: Mapping[str, Any], *, source: str = "adapter") -> list[LoraModule]:
    """A parameter LoRA rewritten as one module LoRA per expert and on-disk tensor (transformers 4's layout,
    which llama.cpp's ``convert_lora_to_gguf.py`` and vLLM's per-expert MoE LoRA wrapper read): expert e of
    ``<experts>.gate_up_proj`` becomes ``<experts>.{e}.gate_proj`` (rows ``[0, I)`` of ``B_e``, with ``A_e``) and
    ``<experts>.{e}.up_proj`` (rows ``[I, 2I)``, the same ``A_e``), named as the base's checkpoint names them
    (Mixtral: ``block_sparse_moe.experts.{e}.w1`` / ``w3``); ``down_proj`` becomes ``<experts>.{e}.down_proj``.
    A 2-D parameter (a router's ``weight``) becomes a module LoRA on its module. Each update ``s·B·A`` is the
    expert's own (alpha and rsLoRA kept, the rank per expert); PEFT merging the result on transformers 5
    rounds it as a ``lora.Linear`` of transformers 4 did (once), not as the parameter's (twice).

    Raises:
        UnsupportedAdapterError: a model type whose checkpoints hold this parameter fused (GPT-OSS, Llama-4,
            DBRX, GraniteMoE), or one loractl does not know.
        ShapeMismatchError: an expert count other than the base config's.
    """
    model_type = model_type_of(config)
    arch = ARCHS.get(model_type or "")
    mod, _, pname = module.name.rpartition(".")
    where = f"{source}: parameter {module.name!r}"
    if module.experts <= 1 and pname == "weight":  # a router: a module LoRA on its module, as stored on disk
        disk = arch.on_disk(module.name) if arch is not None else module.name
        return [replace(module, name=disk.rpartition(".")[0], experts=0)]
    if arch is None or not arch.is_experts(mod) or pname not in arch.split:
        raise UnsupportedAdapterError(
            f"{where}: the checkpoints of model type {model_type!r} hold it fused, not one tensor per expert: "
            "it has no per-expert form",
            hint="keep it as PEFT target_parameters (leave out --experts per-expert)",
        )
    want = num_experts(config)
    if want is not None and want != module.experts:
        raise ShapeMismatchError(f"{where}: adapter has {module.experts} experts but the base config says {want}")
    leaves = arch.split[pname]
    rows = _chunks(int(module.up.shape[0]), len(leaves))
    out: list[LoraModule] = []
    for e, one in enumerate(module.split_experts()):
        for leaf, r in zip(leaves, rows):
            name = arch.on_disk(f"{mod}.{e}.{leaf}").rpartition(".")[0]
            out.append(replace(one, name=name, down=one.down.contiguous(), up=one.up[r].contiguous(), experts=0))
    return out
