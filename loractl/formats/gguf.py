"""llama.cpp GGUF LoRA adapters, written and read as llama.cpp's ``convert_lora_to_gguf.py`` does.

The layout (``convert_lora_to_gguf.py`` with ``convert_hf_to_gguf.py``'s model classes; checked
against llama.cpp master and b4800, Feb 2025):

- tensor names: the PEFT key without ``base_model.model.`` and with ``.lora_A.weight`` →
  ``.weight`` (``get_base_tensor_name``), mapped by ``gguf.get_tensor_name_map(arch, n_layers)``
  (``ModelBase.map_tensor_name``), then ``.lora_a`` / ``.lora_b`` appended
  (``LoraModel.modify_tensors``): ``blk.N.attn_q.weight.lora_a``;
- data: ``lora_a`` is A ([r, in] in torch order, so ``ne = [in, r]`` in GGUF, which lists dims
  reversed) and ``lora_b`` is B ([out, r], ``ne = [r, out]``); for ``token_embd`` the script
  stores Aᵀ ([vocab, r]) because llama.cpp gathers rows of A per token (``llm_build_inp_embd``);
- Llama-family q/k projections are permuted for llama.cpp's RoPE layout
  (``LlamaModel.permute(w, n_head, n_head_kv)`` in ``LlamaModel.modify_tensors``); the script
  applies it to the LoRA pair through ``LoraTorchTensor``'s reshape/swapaxes, which touch only B's
  rows: ``B_gguf = B[p]`` where p is the row order of :func:`permute_rows`;
- tensor types: ``--outtype`` f32 / f16 / bf16 applies to ``.lora_a`` / ``.lora_b``
  (``prepare_tensors``); loractl keeps the adapter's own dtype (F32, F16 or BF16; other dtypes
  and A/B of different dtypes become F32, as ``LoraTorchTensor`` does);
- metadata, in the script's order: ``general.architecture`` (``GGUFWriter``), ``general.type =
  "adapter"``, ``adapter.type = "lora"`` (``set_type``), ``general.name`` and the other
  ``general.*`` keys of ``gguf.Metadata.load`` on the adapter folder (``prepare_metadata``),
  ``adapter.lora.alpha`` as float32 (``set_gguf_parameters``), ``general.quantization_version``.
  loractl adds its provenance (``loractl.*`` strings), which llama.cpp ignores.

llama.cpp's runtime scale is ``alpha / r`` with one alpha per file and r taken from each module's
``lora_b`` (``llama_adapter_lora_weight::get_scale``; alpha 0 means scale 1). The script writes
``lora_alpha`` and ignores ``use_rslora``, ``rank_pattern``'s effect on alpha and
``alpha_pattern``; loractl instead folds every module's scale into B (:func:`fold_scales`), so
that ``alpha_file / r_m · B'·A = s_m · B·A`` for every module whatever its rank. For a plain
adapter (one ``lora_alpha``, any ``rank_pattern``) nothing is folded and the file equals the
script's.

Supported bases (``config.json`` ``architectures``, else ``model_type``): Llama and Mistral
(arch ``llama``, q/k permuted), Qwen2 (``qwen2``), Qwen3 (``qwen3``), Gemma (``gemma``), Gemma 2
(``gemma2``) and Phi-3 (``phi3``), none of which but Llama/Mistral permute anything.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError, InputError, UnsupportedAdapterError, UsageError
from ..io.files import open_regular, shown, source_of

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from . import ReadOptions, WriteOptions

#: the most layers a GGUF adapter may name (``blk.N``); the name map is built for every layer
MAX_LAYERS = 65_536
_LLAMA_MODULES = (
    "model.embed_tokens",
    "lm_head",
    "model.layers.{bid}.self_attn.q_proj",
    "model.layers.{bid}.self_attn.k_proj",
    "model.layers.{bid}.self_attn.v_proj",
    "model.layers.{bid}.self_attn.o_proj",
    "model.layers.{bid}.mlp.gate_proj",
    "model.layers.{bid}.mlp.up_proj",
    "model.layers.{bid}.mlp.down_proj",
)
_PHI3_MODULES = (
    "model.embed_tokens",
    "lm_head",
    "model.layers.{bid}.self_attn.qkv_proj",
    "model.layers.{bid}.self_attn.o_proj",
    "model.layers.{bid}.mlp.gate_up_proj",
    "model.layers.{bid}.mlp.down_proj",
)


@dataclass(frozen=True)
class ArchSpec:
    """How one llama.cpp architecture stores a LoRA.

    Attributes:
        name: ``general.architecture`` (``gguf.MODEL_ARCH_NAMES``).
        enum: the ``gguf.MODEL_ARCH`` member.
        permute_qk: q/k rows are permuted (``convert_hf_to_gguf.py``'s ``LlamaModel``).
        modules: transformers' module names, used to map GGUF names back (``{bid}`` = layer).
    """

    name: str
    enum: str
    permute_qk: bool
    modules: tuple[str, ...] = _LLAMA_MODULES


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "LLAMA", True),
    "qwen2": ArchSpec("qwen2", "QWEN2", False),
    "qwen3": ArchSpec("qwen3", "QWEN3", False),
    "gemma": ArchSpec("gemma", "GEMMA", False),
    "gemma2": ArchSpec("gemma2", "GEMMA2", False),
    "phi3": ArchSpec("phi3", "PHI3", False, _PHI3_MODULES),
}
#: transformers ``architectures[0]`` -> GGUF arch, as ``convert_hf_to_gguf.py`` registers them
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}
#: ``model_type`` -> GGUF arch, for configs without ``architectures``
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
}
#: ``config.json`` architectures that llama.cpp's ``convert_lora_to_gguf.py`` can convert: it builds its
#: ``LoraModel`` on ``ModelBase.from_model_architecture(hparams["architectures"][0])`` and exits
#: with "Model ... is not supported" otherwise. The common text models registered with
#: ``@ModelBase.register(...)`` in convert_hf_to_gguf.py / conversion/*.py (llama.py, qwen.py,
#: gemma.py, phi.py, gpt2.py, gpt_neox.py, starcoder.py). Not exhaustive: llama.cpp registers many
#: more architectures; extend this set when a user's base is missing. This writer handles
#: :data:`HF_ARCHITECTURES`, a subset.
CONVERTIBLE_ARCHITECTURES = frozenset(
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
#: architectures llama.cpp converts with ``LlamaModel`` (``undo_permute = True``), which permutes q/k
#: rows (``LlamaModel.permute``) in ``modify_tensors`` (conversion/llama.py); for those this writer's
#: :class:`ArchSpec` has ``permute_qk``
PERMUTED_ARCHITECTURES = frozenset({"LLaMAForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"})
_LAYER_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")  # ModelBase.find_hparam
_PROVENANCE_SKIP = ("general.", "adapter.", "GGUF.")


def _gguf(source: Path) -> Any:
    """The ``gguf`` package (llama.cpp's gguf-py), imported only when a GGUF file is touched."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            f"{source}: GGUF support needs the gguf package (llama.cpp's gguf-py)",
            hint="pip install 'loractl[gguf]'",
        ) from None
    return gguf


# --------------------------------------------------------------------------------------------
# base configuration
# --------------------------------------------------------------------------------------------
def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The config with ``text_config`` moved to the root, as ``TextModel.__init__`` does."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else dict(config)


def architecture(config: dict[str, Any], text_first: bool = True) -> str | None:
    """The config's ``architectures[0]`` (with ``text_first``, its ``text_config``'s if it states one),
    or None.

    Raises:
        InputError: ``architectures`` is not a list of class names.
    """
    text = config.get("text_config") if text_first else None
    for c in (text, config) if isinstance(text, dict) else (config,):
        archs = c.get("architectures")
        if not archs:
            continue
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise InputError(
                f"{source_of(config, 'the base config.json')}: architectures is {shown(archs)}, not a list of class names",
                hint="fix the base model's config.json",
            )
        return archs[0]
    return None


def base_arch(config: dict[str, Any], source: Path) -> ArchSpec:
    """The GGUF architecture of a base from its ``config.json`` (``architectures[0]``, else ``model_type``).

    Raises:
        InputError: no config (``--base`` missing) or an architecture loractl does not map.
    """
    if not config:
        raise InputError(
            f"{source}: converting to GGUF needs --base (the base's config.json gives architecture, layers, heads)",
            hint="pass --base with the base model folder",
        )
    name = architecture(config)
    arch = HF_ARCHITECTURES.get(name) if name else None
    if arch is None:
        arch = MODEL_TYPES.get(str(hparams(config).get("model_type")))
    if arch is None:
        raise InputError(
            f"{source}: base architecture {name or hparams(config).get('model_type')!r} has no GGUF LoRA mapping in loractl",
            hint=f"supported: {', '.join(sorted(HF_ARCHITECTURES))}",
        )
    return ARCHS[arch]


#: the most attention heads a base config may state (the largest models have a few hundred)
MAX_HEADS = 65_536


def config_count(config: dict[str, Any], key: str, value: Any, limit: int) -> int:
    """A count read from a base's config (``config[key]`` or its ``text_config``'s is ``value``): a
    positive integer (an integral float as well, as Python reads ``32.0``) of at most ``limit``.

    Raises:
        InputError: naming the config file and the key.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise InputError(
            f"{source_of(config, 'the base config.json')}: {key} is {shown(value)}, not a count from 1 to {limit}",
            hint="fix the base model's config.json",
        )
    return value


def _count(config: dict[str, Any], keys: Sequence[str], limit: int) -> int | None:
    """The first of ``keys`` the config states (not null), checked by :func:`config_count`."""
    hp = hparams(config)
    for k in keys:
        if hp.get(k) is not None:
            return config_count(config, k, hp[k], limit)
    return None


def head_counts(config: dict[str, Any]) -> tuple[int, int] | None:
    """(n_head, n_head_kv) from the config (``num_key_value_heads`` defaults to ``num_attention_heads``).

    Raises:
        InputError: a count that is not a positive integer (:func:`config_count`).
    """
    n_head = _count(config, ("num_attention_heads", "n_heads"), MAX_HEADS)
    if n_head is None:
        return None
    n_kv = _count(config, ("num_key_value_heads", "n_kv_heads"), MAX_HEADS)
    return n_head, n_kv or n_head


def layer_count(config: dict[str, Any]) -> int | None:
    """The number of layers the config states (``ModelBase.find_hparam``'s keys), or None.

    Raises:
        InputError: a count that is not a positive integer (:func:`config_count`).
    """
    return _count(config, _LAYER_KEYS, MAX_LAYERS)


# --------------------------------------------------------------------------------------------
# the two pieces of arithmetic GGUF needs: q/k row order and one alpha per file
# --------------------------------------------------------------------------------------------
def permute_rows(rows: int, n_head: int) -> torch.Tensor:
    """The row order of ``convert_hf_to_gguf.py``'s ``LlamaModel.permute(w, n_head, n_head_kv)``.

    ``permute(w) = w.reshape(n, 2, rows // n // 2, ...).swapaxes(1, 2).reshape(w.shape)`` (n is
    ``n_head_kv`` for k_proj) equals ``w[p]`` with ``p = arange(rows)`` put through the same
    reshape and swap; un-permuting is ``w[argsort(p)]``. Only B's rows move (``LoraTorchTensor``).
    """
    import torch

    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of two RoPE halves")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def fold_scales(modules: Collection[LoraModule]) -> tuple[float, dict[str, float]]:
    """One file alpha and each module's factor for B, so that llama.cpp's scale gives PEFT's.

    llama.cpp scales module m by ``alpha_file / r_m``; PEFT by ``s_m`` (``alpha/r`` or, rsLoRA,
    ``alpha/√r``). With ``e_m = s_m · r_m`` (the alpha m would need under the plain rule) and
    ``B'_m = B_m · e_m / alpha_file``: ``alpha_file / r_m · B'_m·A_m = s_m · B_m·A_m`` for any ranks.

    ``alpha_file`` is the most common ``e_m`` (ties: the first module's), so those modules keep B
    bit for bit; a plain adapter (one ``lora_alpha``, any ``rank_pattern``) folds nothing and
    ``alpha_file = lora_alpha`` as ``convert_lora_to_gguf.py`` writes; rsLoRA with one rank r
    gives ``alpha·√r`` and folds nothing either. Factors are computed against the float32 alpha
    that is stored; a module whose ``e_m`` is ``alpha_file`` keeps factor 1, leaving only the
    float32 rounding of alpha (relative 2⁻²⁴ at most, 0 when it is representable, e.g. integer).

    Returns:
        (alpha_file, factor by module name). alpha_file is never 0 (llama.cpp reads 0 as "scale 1").
    """
    import numpy as np

    eff = {m.name: m.scale * m.rank for m in modules}
    counts = Counter(v for v in eff.values() if v != 0)  # in first-seen order: ties go to the first
    alpha = max(counts, key=counts.__getitem__) if counts else 1.0
    alpha32 = float(np.float32(alpha))
    factors = {name: (1.0 if e == alpha else e / alpha32) for name, e in eff.items()}
    return alpha32, factors


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def detect(keys: list[str], metadata: dict[str, str]) -> bool:
    """GGUF files are not safetensors: the registry finds them by their ``.gguf`` suffix."""
    return False


def read(
    path: Path, weights: Path, tensors: dict[str, Any], metadata: dict[str, str], options: ReadOptions
) -> Adapter:
    """Not used: a GGUF adapter is one ``.gguf`` file, read by :func:`read_file`."""
    raise FormatError(
        f"{weights}: is a safetensors/pickle file, not GGUF", hint="GGUF adapters are .gguf files"
    )


def _refuse(adapter: Adapter) -> None:
    """What a GGUF LoRA cannot hold, refused by name (llama.cpp has only A/B pairs per tensor)."""
    src = adapter.path
    # saved embedding layers (PEFT's save_embedding_layers: "<m>.base_layer.weight") are skipped, as
    # convert_lora_to_gguf.py skips them; other full tensors cannot be carried
    full = sorted(k for k in adapter.modules_to_save if ".base_layer." not in k)
    if full:
        key = full[0]
        raise UnsupportedAdapterError(
            f"{src}: tensor {key!r} is a full replacement (modules_to_save); a GGUF LoRA holds only lora_a/lora_b pairs",
            hint="merge the adapter into the base instead (loractl merge)",
        )
    for m in adapter.modules.values():
        what = None
        if m.is_dora:
            what = "is DoRA (lora_magnitude_vector); llama.cpp applies plain LoRA only"
        elif m.bias is not None:
            what = "has lora_B.bias (lora_bias); a GGUF LoRA has no bias"
        elif m.kind == "conv":
            what = "is a convolution LoRA; GGUF LoRA covers linear and embedding layers"
        elif m.fan_in_fan_out:
            what = "is a fan_in_fan_out (Conv1D) layer, which no supported GGUF architecture has"
        if what:
            raise UnsupportedAdapterError(f"{src}: module {m.name!r} {what}")


def _gguf_name(tmap: Any, module: str) -> str | None:
    """``convert_lora_to_gguf.py``'s name: strip the language-model prefix as its ``modify_tensors``
    does, then ``map_tensor_name(<module>.weight)`` with suffixes ``.weight`` / ``.bias``."""
    for prefix, repl in (("model.language_model.", "model."), ("language_model.", "")):
        if module.startswith(prefix):
            module = repl + module[len(prefix) :]
            break
    return tmap.get_name(module + ".weight", try_suffixes=(".weight", ".bias"))


def _qtype(gguf: Any, a: torch.Tensor, b: torch.Tensor) -> Any:
    """F32 / F16 / BF16 as the factors are; mixed or other dtypes: F32 (``LoraTorchTensor``)."""
    import torch

    q = gguf.GGMLQuantizationType
    if a.dtype == b.dtype:
        return {torch.float16: q.F16, torch.bfloat16: q.BF16}.get(a.dtype, q.F32)
    return q.F32


def _encode(gguf: Any, t: torch.Tensor, factor: float, qtype: Any, source: Path, name: str) -> np.ndarray:
    """``t · factor`` rounded to ``qtype``, laid out as ``gguf.quants.quantize`` gives it.

    Factor 1 is exact (F16/BF16 values pass through float32 unchanged). A folded B is computed in
    float64 and rounded once to F32 or F16; BF16 goes through float32 first, as ``gguf.quants`` does.
    """
    import numpy as np

    if factor == 1.0:
        data = t.detach().float().contiguous().numpy()  # exact: F16/BF16 → F32 → back
    else:
        data = t.detach().double().contiguous().numpy() * factor
        limit = {gguf.GGMLQuantizationType.F16: 65504.0}.get(qtype, float(np.finfo(np.float32).max))
        if not np.isfinite(data).all() or np.abs(data).max(initial=0.0) > limit:
            raise FormatError(
                f"{source}: tensor {name!r} overflows {qtype.name} after folding the scale (×{factor:g}) into B",
                hint="convert the adapter to float32 first",
            )
    return gguf.quants.quantize(data, qtype)


def write(adapter: Adapter, out: Path, options: WriteOptions) -> None:
    """A GGUF LoRA at ``out`` as ``convert_lora_to_gguf.py --base BASE --outtype <adapter dtype>``
    writes it, with every module's scale folded into B (see the module docstring).

    Raises:
        InputError: no or unsupported base config; an adapter module GGUF cannot hold; a module
            without a GGUF tensor name; q/k rows that do not split into the config's heads.
    """
    src = adapter.files[0] if adapter.files else adapter.path
    gguf = _gguf(src)
    spec = base_arch(options.base_config, src)
    _refuse(adapter)
    n_layers = layer_count(options.base_config)
    if n_layers is None:
        raise InputError(
            f"{src}: the base config.json has no num_hidden_layers", hint="is --base a transformers model?"
        )
    heads = head_counts(options.base_config)
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.enum), n_layers)
    alpha, factors = fold_scales(list(adapter.modules.values()))

    writer = gguf.GGUFWriter(path=None, arch=spec.name)
    seen: dict[str, str] = {}
    for name, m in adapter.modules.items():
        gname = _gguf_name(tmap, name)
        if gname is None:
            raise InputError(
                f"{src}: module {name!r} has no tensor in a llama.cpp {spec.name!r} model "
                f"(gguf.get_tensor_name_map({spec.enum}, {n_layers}))",
                hint="llama.cpp ignores or ties this layer (e.g. Gemma's lm_head); drop it from the adapter",
            )
        if gname in seen:
            raise FormatError(
                f"{src}: modules {seen[gname]!r} and {name!r} both map to GGUF tensor {gname!r}"
            )
        seen[gname] = name
        a, b = m.down, m.up
        if m.kind == "embedding":
            a = a.T  # convert_lora_to_gguf.py: token_embd.lora_a is Aᵀ (see llm_build_inp_embd)
        full = name + ".weight"
        if spec.permute_qk and full.endswith(("q_proj.weight", "k_proj.weight")):
            if heads is None:
                raise InputError(
                    f"{src}: module {name!r} needs the base's num_attention_heads to permute for llama.cpp",
                    hint="the base config.json has no num_attention_heads",
                )
            n = heads[0] if full.endswith("q_proj.weight") else heads[1]
            try:
                b = b[permute_rows(int(b.shape[0]), n)]
            except ValueError as e:
                raise InputError(
                    f"{src}: module {name!r}: {e}", hint="is the adapter for this base?"
                ) from None
        qtype = _qtype(gguf, m.down, m.up)
        writer.add_tensor(gname + ".lora_a", _encode(gguf, a, 1.0, qtype, src, name), raw_dtype=qtype)
        writer.add_tensor(
            gname + ".lora_b", _encode(gguf, b, factors[name], qtype, src, name), raw_dtype=qtype
        )

    # metadata in prepare_metadata's order: type, model card, parameters, quantization version
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    total = writer.get_total_parameter_count()[0]
    card = adapter.path if adapter.path.is_dir() else None
    meta = gguf.Metadata.load(None, card, None, total)
    if meta.name is None:
        meta.name = adapter.metadata.get("general.name") or adapter.path.stem or adapter.path.name
    meta.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in sorted(options.metadata.items()):
        if not key.startswith(_PROVENANCE_SKIP):
            writer.add_string(key, str(value))
    try:
        writer.write_header_to_file(path=out)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except OSError as e:  # a full disk or a file size limit: a short write has no errno
        from ..io.safetensors import disk_error

        if e.errno is None:
            e = OSError(27, "the file cannot grow (file size limit or no space left)")
        raise disk_error(out, e) from None
    finally:
        try:
            writer.close()
        except OSError:
            pass  # the error above is the one to report


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _field_value(gguf: Any, field: Any) -> Any:
    """A GGUF key's value from ``GGUFReader``'s field parts (scalars, strings, arrays)."""
    t = gguf.GGUFValueType
    kind = field.types[0] if field.types else None
    if kind == t.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if kind == t.ARRAY:
        if field.types[-1] == t.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[0]].tolist()[0]


def _tensor(gguf: Any, t: Any, source: Path) -> torch.Tensor:
    """A ``ReaderTensor`` as a torch tensor in torch order (GGUF lists dims reversed: ``ne``)."""
    import numpy as np
    import torch

    q = gguf.GGMLQuantizationType
    shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
    if t.tensor_type == q.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    if t.tensor_type == q.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16).reshape(shape))
    if t.tensor_type == q.BF16:
        raw = np.array(t.data, dtype=np.uint8).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    try:  # Q8_0 (--outtype q8_0) and the like: dequantized to float32
        return torch.from_numpy(
            np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        )
    except NotImplementedError:
        raise FormatError(
            f"{source}: tensor {t.name!r} has type {t.tensor_type.name}, which loractl cannot read"
        ) from None


def _module_names(
    gguf: Any, spec: ArchSpec, n_layers: int, base_keys: Collection[str] | None
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """GGUF base name (``blk.0.attn_q``) -> transformers module name, by mapping ``spec.modules``
    forward with ``gguf.get_tensor_name_map``; plus every candidate of the full map, to pick the
    one the base has when its tensor names are known."""
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.enum), n_layers)
    preferred: dict[str, str] = {}
    for tpl in spec.modules:
        for bid in range(n_layers) if "{bid}" in tpl else (None,):
            hf = tpl.format(bid=bid)
            g = tmap.get_name(hf)
            if g is not None:
                preferred.setdefault(g, hf)
    candidates: dict[str, list[str]] = {}
    if base_keys:
        for hf, (_, g) in tmap.mapping.items():
            if hf != g:
                candidates.setdefault(g, []).append(hf)
    return preferred, candidates


def read_file(path: Path, options: ReadOptions) -> Adapter:
    """A GGUF LoRA (``convert_lora_to_gguf.py``'s layout) as PEFT-named linear/embedding modules.

    Architecture and alpha come from the file; layers and heads from ``options.base_config``.
    Llama-family q/k B rows are un-permuted (inverse of ``LlamaModel.permute``), which needs the
    head counts. Every module gets ``alpha = adapter.lora.alpha`` (``r`` when it is 0: llama.cpp
    then uses scale 1) and the plain rule ``alpha / r``, exactly llama.cpp's runtime scale.

    Raises:
        FormatError: not a GGUF LoRA, a broken pair, an unknown tensor.
        InputError: q/k need head counts and no base config was given (``--base``); the base's
            architecture differs from the file's.
        UnsupportedAdapterError: an activated LoRA (aLoRA), norm tensors, an unsupported architecture.
    """
    path = Path(path)
    gguf = _gguf(path)
    os.close(open_regular(path, ".gguf file"))  # a FIFO would block np.memmap's open
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings on a damaged header's offsets
            warnings.simplefilter("ignore", RuntimeWarning)
            reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/KeyError/IndexError for damaged files
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            try:
                kv[key] = _field_value(gguf, field)
            except Exception:  # an unusual value type; not needed here
                continue
    spec, alpha = _lora_header(kv, path, options)
    pairs, max_bid = _pairs(reader, path)
    n_layers = layer_count(options.base_config) or max_bid + 1
    preferred, candidates = _module_names(gguf, spec, max(n_layers, max_bid + 1), options.base_keys)
    keys = set(options.base_keys or ())
    modules: dict[str, LoraModule] = {}
    for base_name, p in pairs.items():
        short = base_name.removesuffix(".weight")
        hf = preferred.get(short)
        if keys and (hf is None or hf + ".weight" not in keys):
            hf = next((c for c in candidates.get(short, []) if c + ".weight" in keys), hf)
        if hf is None:
            raise FormatError(f"{path}: tensor {base_name + '.lora_a'!r} has no known module in a {spec.name!r} model")
        modules[hf] = _module(gguf, p, base_name, hf, spec, alpha, path, options)
    metadata = {k: str(v) for k, v in kv.items() if isinstance(v, (str, int, float))}
    return Adapter(path=path, format="gguf", modules=modules, config={}, metadata=metadata, files=[path])


def _lora_header(kv: dict[str, Any], path: Path, options: ReadOptions) -> tuple[ArchSpec, float]:
    """The architecture and alpha of a GGUF LoRA, checked against the base when one is given."""
    gtype, atype = kv.get("general.type"), kv.get("adapter.type")
    if gtype != "adapter" or atype != "lora":
        raise FormatError(
            f"{path}: not a GGUF LoRA adapter (general.type={gtype!r}, adapter.type={atype!r})",
            hint="a GGUF LoRA is what convert_lora_to_gguf.py writes; a full GGUF model is not an adapter",
        )
    if kv.get("adapter.alora.invocation_tokens"):  # gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS (gguf >= 0.17)
        raise UnsupportedAdapterError(
            f"{path}: an activated LoRA (adapter.alora.invocation_tokens); it applies only after its "
            "invocation tokens, so it cannot be merged or converted as a plain LoRA"
        )
    arch = str(kv.get("general.architecture"))
    spec = ARCHS.get(arch)
    if spec is None:
        raise UnsupportedAdapterError(
            f"{path}: GGUF architecture {arch!r} has no module mapping in loractl",
            hint=f"supported: {', '.join(ARCHS)}",
        )
    if options.base_config:
        base = base_arch(options.base_config, path)
        if base.name != spec.name:
            raise InputError(
                f"{path}: the adapter is for llama.cpp architecture {spec.name!r} but the base is {base.name!r}",
                hint="is the adapter for this base?",
            )
    if "adapter.lora.alpha" not in kv:
        raise FormatError(f"{path}: no adapter.lora.alpha key")
    alpha = kv["adapter.lora.alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise FormatError(f"{path}: adapter.lora.alpha is {alpha!r}, not a finite number")
    return spec, float(alpha)


def _pairs(reader: Any, path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The file's tensors as lora_a/lora_b pairs by base tensor name, and the highest block number."""
    pairs: dict[str, dict[str, Any]] = {}
    max_bid = -1
    for t in reader.tensors:
        name = str(t.name)
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = t
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "blk" and parts[1].isdecimal():
                if len(parts[1]) > 5 or int(parts[1]) >= MAX_LAYERS:
                    raise FormatError(
                        f"{path}: tensor {name!r}: layer {parts[1][:20]} is beyond {MAX_LAYERS} layers"
                    )
                max_bid = max(max_bid, int(parts[1]))
        elif name.endswith("_norm.weight"):
            raise UnsupportedAdapterError(
                f"{path}: tensor {name!r} is a full norm vector (mergekit-extract-lora), not a LoRA pair; "
                "llama.cpp ignores it and loractl does not read it"
            )
        else:
            raise FormatError(f"{path}: tensor {name!r} is neither .lora_a nor .lora_b")
    for base_name, p in pairs.items():
        missing = "lora_b" if "b" not in p else "lora_a" if "a" not in p else None
        if missing:
            raise FormatError(f"{path}: tensor {base_name + '.' + missing!r} is missing (half a LoRA pair)")
    return pairs, max_bid


def _module(
    gguf: Any, p: dict[str, Any], base_name: str, hf: str, spec: ArchSpec, alpha: float, path: Path, options: ReadOptions
) -> LoraModule:
    """One pair as the PEFT module ``hf``: an embedding's Aᵀ transposed back, q/k's B un-permuted."""
    import torch

    a, b = _tensor(gguf, p["a"], path), _tensor(gguf, p["b"], path)
    is_embd = base_name.removesuffix(".weight") == "token_embd"
    if is_embd and a.dim() == 2:
        a = a.T  # stored Aᵀ [vocab, r]: back to PEFT's lora_embedding_A [r, vocab]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise FormatError(
            f"{path}: tensor {base_name + '.lora_a'!r} {list(a.shape)} and .lora_b {list(b.shape)} "
            "do not share a rank (llama.cpp: lora_a tensor is not transposed)"
        )
    full = hf + ".weight"
    if spec.permute_qk and full.endswith(("q_proj.weight", "k_proj.weight")):
        heads = head_counts(options.base_config) if options.base_config else None
        if heads is None:
            raise InputError(
                f"{path}: tensor {base_name + '.lora_b'!r} is permuted for llama.cpp's RoPE; undoing it "
                "needs --base (the base model's head counts)",
                hint="pass --base with the base model folder (its config.json gives num_attention_heads)",
            )
        n = heads[0] if full.endswith("q_proj.weight") else heads[1]
        try:
            b = b[torch.argsort(permute_rows(int(b.shape[0]), n))]
        except ValueError as e:
            raise InputError(f"{path}: tensor {base_name + '.lora_b'!r}: {e}", hint="is --base the right model?") from None
    rank = int(a.shape[0])
    return LoraModule(
        name=hf,
        kind="embedding" if is_embd else "linear",
        down=a.contiguous(),
        up=b.contiguous(),
        alpha=alpha if alpha != 0 else float(rank),
    )


__all__ = [
    "ARCHS",
    "HF_ARCHITECTURES",
    "ArchSpec",
    "base_arch",
    "detect",
    "fold_scales",
    "permute_rows",
    "read",
    "read_file",
    "write",
]
