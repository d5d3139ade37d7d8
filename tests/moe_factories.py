"""Oracle factories for LoRA adapters on MoE experts (PEFT ``target_parameters``), transformers v5 layouts.

A plain module (not a test file): tiny MoE models from small configs with seeded weights, their bases saved
in transformers' own on-disk layout (or the fused in-memory layout), PEFT adapters with ``target_parameters``
and PEFT's own merge (``merge_and_unload`` + ``save_pretrained``) as the expected on-disk result.

The facts these encode, with their sources, are in /work/notes/moe.md (copied to docs when loractl learns
MoE merges). :data:`LAYOUTS` is the correspondence "adapter parameter, expert e -> on-disk tensor and slice"
as plain data; tests/test_moe_oracle.py proves it against PEFT bit for bit.

Nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: sizes of every tiny model: all distinct so that a transposition or a wrong split shows as a shape error
E = 4  # experts
H = 32  # hidden
I = 20  # noqa: E741 - the expert intermediate size (gate_up_proj has 2*I = 40 rows)
VOCAB = 96

_COMMON: dict[str, Any] = dict(
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class ParamLayout:
    """One expert parameter: how PEFT sees it and where transformers writes it.

    ``name``: the parameter on the experts module (in memory), e.g. ``gate_up_proj``.
    ``peft_transposed``: the parameter is stored ``[E, in, out]`` and the experts class says so
    (``is_transposed=True``, set by ``@use_experts_implementation``); PEFT then keeps in = dim 1, out = dim 2
    and expert e's update is ``(B_e @ A_e).T``. Otherwise PEFT takes in = dim 2, out = dim 1 and the update
    is ``B_e @ A_e`` (whatever the forward does with the tensor: Llama-4 multiplies ``x @ W[e]`` but has no
    ``is_transposed``, so PEFT's "in" is its output side; the merge is still ``W[e] + B_e @ A_e``).
    ``split``: transformers' default on-disk layout when it is per expert: ``(name, chunk, chunks)``
    entries; expert e's tensor ``name.format(layer=l, e=e)`` is ``param[e].chunk(chunks, dim=0)[chunk]``
    (no transposition: rows are the same rows as in memory). ``None``: written fused.
    ``fused_disk``: the name it is written under when fused in the default layout, if not its in-memory
    name (GraniteMoe: ``block_sparse_moe.input_linear.weight``), ``{layer}`` to fill in.
    ``stacked_2d``: a 2-D ``[E·F, H]`` tensor (DBRX): PEFT sees one matrix (``num_experts`` 1) and puts ONE
    rank-r LoRA over the whole stack, not one per expert.
    """

    name: str
    peft_transposed: bool = False
    split: tuple[tuple[str, int, int], ...] | None = None
    fused_disk: str | None = None
    stacked_2d: bool = False


@dataclass(frozen=True)
class ArchLayout:
    """An architecture: its classes, its tiny config and its expert parameters.

    ``experts``: the in-memory experts module, ``{layer}`` to fill in. ``moe_layers``: the layers that
    have experts in the tiny config. ``params``: the expert parameters in the order the experts module
    registers them (``named_parameters(recurse=False)``), which is PEFT's nesting order.
    ``renames``: ``(in memory, on disk)`` substrings for the other tensors of an MoE block (Mixtral's router
    ``mlp.gate.weight`` is ``block_sparse_moe.gate.weight`` on disk); none in the fused layout.
    ``main``: one of the six architectures every test runs on (the others get the core tests).
    """

    config_cls: str
    model_cls: str
    config: dict[str, Any]
    experts: str
    moe_layers: tuple[int, ...]
    params: tuple[ParamLayout, ...]
    renames: tuple[tuple[str, str], ...] = ()
    main: bool = False

    def param(self, name: str) -> ParamLayout:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


def _qwen2_style(prefix: str) -> tuple[ParamLayout, ...]:
    """transformers' ``qwen2_moe`` conversion (conversion_mapping.py): per expert ``gate_proj``/``up_proj``
    (the first and second half of ``gate_up_proj[e]``) and ``down_proj``."""
    return (
        ParamLayout(
            "gate_up_proj",
            split=((prefix + ".{e}.gate_proj.weight", 0, 2), (prefix + ".{e}.up_proj.weight", 1, 2)),
        ),
        ParamLayout("down_proj", split=((prefix + ".{e}.down_proj.weight", 0, 1),)),
    )


def _mixtral_style(prefix: str) -> tuple[ParamLayout, ...]:
    """transformers' ``mixtral`` conversion: per expert ``w1`` (gate, first half), ``w3`` (up, second half),
    ``w2`` (down)."""
    return (
        ParamLayout(
            "gate_up_proj", split=((prefix + ".{e}.w1.weight", 0, 2), (prefix + ".{e}.w3.weight", 1, 2))
        ),
        ParamLayout("down_proj", split=((prefix + ".{e}.w2.weight", 0, 1),)),
    )


_L = "model.layers.{layer}"
_QWEN2 = _qwen2_style(_L + ".mlp.experts")
_MIXTRAL = _mixtral_style(_L + ".block_sparse_moe.experts")
_FUSED = (ParamLayout("gate_up_proj"), ParamLayout("down_proj"))
_DSV = dict(  # DeepSeek-V2/V3 and GLM-4-MoE: MLA or GQA attention, layer 0 dense as in the real models
    intermediate_size=48,
    moe_intermediate_size=I,
    n_routed_experts=E,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_LINEAR_ATTN = dict(  # Qwen3-Next: one gated-delta-net layer and one attention layer
    layer_types=["linear_attention", "full_attention"],
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)

#: the architectures that work end to end (build, save, PEFT target_parameters, merge, save), checked by
#: tests/test_moe_oracle.py. See /work/notes/moe.md for those that do not.
LAYOUTS: dict[str, ArchLayout] = {
    "qwen3_moe": ArchLayout(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=2,
            head_dim=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        _L + ".mlp.experts",
        (0, 1),
        _QWEN2,
        main=True,
    ),
    "qwen2_moe": ArchLayout(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=24,
            num_experts=E,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        _L + ".mlp.experts",
        (0, 1),
        _QWEN2,
        main=True,
    ),
    "olmoe": ArchLayout(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=I, num_experts=E, num_experts_per_tok=2),
        _L + ".mlp.experts",
        (0, 1),
        _QWEN2,
        main=True,
    ),
    "deepseek_v3": ArchLayout(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(**_DSV, **_MLA, q_lora_rank=16),
        _L + ".mlp.experts",
        (1,),
        _QWEN2,
        main=True,
    ),
    "mixtral": ArchLayout(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, head_dim=8),
        _L + ".mlp.experts",
        (0, 1),
        _MIXTRAL,
        ((".mlp.gate.", ".block_sparse_moe.gate."),),
        main=True,
    ),
    "gpt_oss": ArchLayout(
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, head_dim=8),
        _L + ".mlp.experts",
        (0, 1),
        # [E, H, 2I] and [E, I, H]: stored (in, out), written as is; gate/up interleaved on the last dim
        (ParamLayout("gate_up_proj", peft_transposed=True), ParamLayout("down_proj", peft_transposed=True)),
        main=True,
    ),
    "deepseek_v2": ArchLayout(
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(**_DSV, **_MLA, q_lora_rank=None),
        _L + ".mlp.experts",
        (1,),
        _QWEN2,
    ),
    "glm4_moe": ArchLayout(
        "Glm4MoeConfig", "Glm4MoeForCausalLM", dict(**_DSV, head_dim=8), _L + ".mlp.experts", (1,), _QWEN2
    ),
    "qwen3_next": ArchLayout(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=24,
            num_experts=E,
            num_experts_per_tok=2,
            head_dim=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **_LINEAR_ATTN,
        ),
        _L + ".mlp.experts",
        (0, 1),
        _QWEN2,
    ),
    "ernie4_5_moe": ArchLayout(
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=I,
            moe_num_experts=E,
            moe_k=2,
            moe_layer_start_index=0,
            moe_layer_interval=1,
            moe_num_shared_experts=0,
        ),
        _L + ".mlp.experts",
        (0, 1),
        _QWEN2,
        ((".mlp.gate.moe_statics.", ".mlp.moe_statics."),),
    ),
    "hunyuan_v1_moe": ArchLayout(
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(intermediate_size=I, num_experts=E, moe_topk=2, head_dim=8),
        _L + ".mlp.experts",
        (0, 1),
        _QWEN2,
    ),
    "jamba": ArchLayout(
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        ),
        _L + ".feed_forward.experts",
        (0, 1),
        _qwen2_style(_L + ".feed_forward.experts"),
    ),
    "minimax": ArchLayout(
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
        _L + ".mlp.experts",
        (0, 1),
        _MIXTRAL,
        ((".mlp.gate.", ".block_sparse_moe.gate."),),
    ),
    "phimoe": ArchLayout(
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=2),
        _L + ".mlp.experts",
        (0, 1),
        _MIXTRAL,
        ((".mlp.router.", ".block_sparse_moe.gate."),),
    ),
    "granitemoe": ArchLayout(
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=2),
        _L + ".block_sparse_moe.experts",
        (0, 1),
        (
            ParamLayout("gate_up_proj", fused_disk=_L + ".block_sparse_moe.input_linear.weight"),
            ParamLayout("down_proj", fused_disk=_L + ".block_sparse_moe.output_linear.weight"),
        ),
        ((".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"),),
    ),
    "llama4": ArchLayout(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=I,
            intermediate_size_mlp=48,
            num_local_experts=E,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1],
        ),
        _L + ".feed_forward.experts",
        (0, 1),
        _FUSED,  # [E, H, 2I] and [E, I, H], used as x @ W[e], no is_transposed: PEFT's in/out are swapped
    ),
    "dbrx": ArchLayout(
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=H,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            ffn_config=dict(ffn_hidden_size=I, moe_num_experts=E, moe_top_k=2),
            # rope_theta: DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
        ),
        "transformer.blocks.{layer}.ffn.experts.mlp",
        (0, 1),
        tuple(ParamLayout(n, stacked_2d=True) for n in ("w1", "v1", "w2")),
    ),
}

ARCHS = tuple(LAYOUTS)
MAIN_ARCHS = tuple(a for a, lay in LAYOUTS.items() if lay.main)


def arch_of(model) -> str:
    """The LAYOUTS key of a model built by :func:`build_moe` (or loaded with its class)."""
    for arch, lay in LAYOUTS.items():
        if type(model).__name__ == lay.model_cls:
            return arch
    raise KeyError(type(model).__name__)


def _classes(arch: str):
    import transformers as tf

    lay = LAYOUTS[arch]
    return getattr(tf, lay.config_cls), getattr(tf, lay.model_cls)


def build_moe(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **over: Any):
    """A tiny MoE model (E=4 experts, hidden 32, expert intermediate 20, 2 layers, vocab 96) with seeded
    random values in every parameter (not just the init), in ``dtype``."""
    config_cls, model_cls = _classes(arch)
    kw = {} if arch == "dbrx" else dict(_COMMON)
    kw.update(LAYOUTS[arch].config)
    if arch == "dbrx":
        kw.update(vocab_size=VOCAB, tie_word_embeddings=False)
    kw.update(over)
    torch.manual_seed(seed)
    # _from_config(dtype=...) holds what from_pretrained(dtype=...) would: the model's keep-in-float32 parameters
    # (DeepSeek-V3's router: `_keep_in_fp32_modules_strict`) and those it creates in float32 (HunYuan's router
    # `wg`) stay float32
    model = model_cls._from_config(config_cls(**kw), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def save_moe_base(model, path: Path, fused: bool = False, max_shard_size: str | None = None) -> Path:
    """``save_pretrained``: transformers' on-disk layout (its conversion mapping reversed: per-expert tensors
    for every arch here but GPT-OSS), or with ``fused=True`` the in-memory layout (``save_original_format=False``:
    ``...experts.gate_up_proj`` [E, 2I, H] etc.), which ``from_pretrained`` reads back as is."""
    kw: dict[str, Any] = {"save_original_format": not fused}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kw)
    return path


def make_moe_adapter(
    model,
    path: Path,
    seed: int = 1,
    target_modules: list[str] | None = None,
    target_parameters: list[str] | None = None,
    std: float = 0.3,
    **lora: Any,
) -> Path:
    """A PEFT LoRA with ``target_parameters`` on (a float32 copy of) ``model``, every lora tensor given seeded
    non-zero values, saved with ``save_pretrained`` (README removed). ``target_modules`` defaults to ``[]``
    (``None`` would let PEFT add its default modules for the model type), ``target_parameters`` to all the expert
    parameters of the arch (``[]``: none; PEFT may still add some: it rewrites classic MoE ``target_modules`` names, see
    /work/notes/moe.md)."""
    import peft

    if target_parameters is None:
        target_parameters = [p.name for p in LAYOUTS[arch_of(model)].params]
    m = copy.deepcopy(model).float()
    cfg = peft.LoraConfig(
        target_modules=list(target_modules or []), target_parameters=list(target_parameters), **lora
    )
    pm = peft.get_peft_model(m, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(path)
    readme = path / "README.md"
    if readme.exists():
        readme.unlink()
    return path


def peft_moe_merged(
    base_dir: Path, adapter_dirs: list[Path], dtype: torch.dtype, arch: str, out_dir: Path
) -> Path:
    """PEFT's own merge written to disk: ``from_pretrained(base_dir, dtype)``, ``PeftModel.from_pretrained``
    (+ ``load_adapter`` for the others), ``merge_and_unload`` of all of them, ``save_pretrained(out_dir)``.
    Returns ``out_dir``: the expected on-disk tensors (in the layout the base was read from)."""
    import peft

    _, model_cls = _classes(arch)
    model = model_cls.from_pretrained(base_dir, dtype=dtype)
    pm = peft.PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    names = ["a0"]
    for i, a in enumerate(adapter_dirs[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
        names.append(f"a{i}")
    merged = pm.merge_and_unload(adapter_names=names)
    merged.save_pretrained(out_dir)
    return out_dir


# --- the derived rules -------------------------------------------------------------------------------------


def adapter_keys(arch: str, layer: int, targeted: list[str]) -> dict[str, str]:
    """PEFT's saved key prefix of each targeted parameter of one experts module.

    Each targeted parameter gets one ``ParamWrapper``; several on one module are nested in the order the
    module registers its parameters (the first one innermost), whatever the order of ``target_parameters``.
    The innermost of n wrappers is ``<experts>.base_layer....lora_*`` (n-1 times ``.base_layer``), the
    outermost ``<experts>.lora_*``. Keys are ``base_model.model.`` + prefix + ``.lora_A.weight`` /
    ``.lora_B.weight``.
    """
    lay = LAYOUTS[arch]
    ordered = [p.name for p in lay.params if p.name in targeted]
    mod = lay.experts.format(layer=layer)
    n = len(ordered)
    return {name: mod + ".base_layer" * (n - 1 - i) for i, name in enumerate(ordered)}


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, e: int, num_experts: int):
    """``(B_e, A_e)`` of expert e from PEFT's stacked factors ``lora_A`` [r·E, in] and ``lora_B`` [out, r·E].

    The two are stacked differently (``ParamWrapper.get_delta_weight``): lora_A's rows are expert-major
    (row ``e*r + k``), lora_B's columns are rank-major (column ``k*E + e``).
    """
    r = lora_a.shape[0] // num_experts
    return lora_b[:, e::num_experts], lora_a[e * r : (e + 1) * r]


def expert_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    e: int,
    num_experts: int,
    scaling: float,
    peft_transposed: bool,
) -> torch.Tensor:
    """Expert e's update in float32, in the orientation of ``param[e]`` (PEFT's arithmetic: factors in float32,
    product, then times the scale; transposed for ``[E, in, out]`` parameters)."""
    b_e, a_e = expert_factors(lora_a.float(), lora_b.float(), e, num_experts)
    d = (b_e @ a_e) * scaling
    return d.T if peft_transposed else d


def expert_pieces(
    arch: str, param: str, layer: int, e: int, fused: bool = False
) -> list[tuple[str, tuple, int, int]]:
    """Where expert e's update of ``param`` lands on disk: ``(tensor name, index, chunk, chunks)`` entries meaning
    ``disk[name][index] += delta_e.chunk(chunks, dim=0)[chunk]`` (``delta_e`` in the orientation of ``param[e]``;
    ``index`` is ``(e,)`` for a fused [E, ., .] tensor, ``()`` for a per-expert one or a stacked 2-D one, whose
    only "expert" is e = 0). Never a transposition between memory and disk for these archs."""
    lay = LAYOUTS[arch]
    p = lay.param(param)
    if p.stacked_2d:
        return [(f"{lay.experts.format(layer=layer)}.{param}", (), 0, 1)]
    if fused or p.split is None:
        name = p.fused_disk if (p.fused_disk and not fused) else f"{lay.experts}.{param}"
        return [(name.format(layer=layer), (e,), 0, 1)]
    return [(name.format(layer=layer, e=e), (), chunk, chunks) for name, chunk, chunks in p.split]


def peft_experts(arch: str, param: str) -> int:
    """How many experts PEFT sees in ``param`` (the E of r·E): E, or 1 for a stacked 2-D tensor."""
    return 1 if LAYOUTS[arch].param(param).stacked_2d else E


def disk_name(arch: str, name: str, fused: bool = False) -> str:
    """The on-disk name of a non-expert tensor ``name`` (in-memory name) of ``arch``."""
    if not fused:
        for a, b in LAYOUTS[arch].renames:
            name = name.replace(a, b)
    return name


def read_st(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (safetensors' own reader)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out
