"""Extracting a LoRA from two models (``loractl extract``): pair the tensors of BASE and TUNED, read
them one pair at a time, and turn every difference into a LoRA module or a tensor saved in full.

The steps, each a function here:

1. :func:`pair_tensors` pairs the tensors by name from the headers alone and refuses models that do
   not belong together (another architecture, a tensor in one only, another shape), before anything
   is read or written; :func:`kind_of` says what each tensor is to a LoRA (``linear``, ``embedding``,
   ``conv`` or ``full``: anything a LoRA cannot hold);
2. :func:`read_pairs` reads the pairs in file order on a thread while the previous pair is computed,
   so at most two pairs are in memory;
3. :func:`extract` turns each changed weight into the factors of :func:`loractl.ops.lowrank.low_rank`
   (fixed rank, energy, or per-module ranks) and keeps each other changed tensor; :func:`spectra`
   computes only the leading singular values, for the ``--budget`` allocator;
4. :func:`place` decides where what a LoRA cannot hold goes: PEFT's ``lora_B.bias`` (``lora_bias``),
   ``modules_to_save``, or the list of what was left out (``full=False``, or what PEFT cannot load).

Nothing here writes files; :func:`loractl.api.extract` writes the adapter with the format writers.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .adapter import LoraModule
from .errors import InputError, UsageError
from .formats.names import OUTPUT_HEADS
from .io.buffers import BufferPool
from .io.safetensors import FLOAT_DTYPES, TensorInfo, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .io.base import BaseModel
    from .ops.lowrank import Allocation, Spectrum

#: called with (bytes done, bytes total)
Progress = Callable[[int, int], None]

#: Module names (the last component) of ``nn.Embedding`` layers in transformers and diffusers models:
#: their LoRA is PEFT's ``lora_embedding_A`` / ``lora_embedding_B``. Every other 2-D ``.weight`` is
#: taken for a linear layer. (Llama, Mistral, Qwen, OPT: embed_tokens, embed_positions; GPT-2: wte, wpe;
#: BERT: word/position/token_type_embeddings; GPT-NeoX: embed_in; T5: shared, relative_attention_bias;
#: CLIP: token_embedding, position_embedding; LLaMA-1 checkpoints: tok_embeddings; diffusers:
#: class_embedding.)
EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens",
        "embed_positions",
        "embed_in",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "tok_embeddings",
        "shared",
        "relative_attention_bias",
        "token_embedding",
        "position_embedding",
        "class_embedding",
    }
)
#: transformers models whose projections are ``Conv1D`` layers, which store the weight [in, out]
#: (PEFT's ``fan_in_fan_out``), and those layers' names (transformers/models/gpt2/modeling_gpt2.py)
CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
KINDS = ("linear", "embedding", "conv", "full")


# --- pairing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One tensor of both models.

    Attributes:
        name: the tensor's name.
        module: its module's name (the name without ``.weight``, or without its last component).
        kind: ``linear``, ``embedding``, ``conv`` or ``full`` (see :func:`kind_of`).
        base: where it lies in BASE.
        tuned: where it lies in TUNED.
        fan_in_fan_out: a ``Conv1D`` weight, stored [in, out].
        why: for ``full``, why a LoRA cannot hold it.
    """

    name: str
    module: str
    kind: str
    base: TensorInfo
    tuned: TensorInfo
    fan_in_fan_out: bool = False
    why: str = ""

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.tuned.nbytes

    @property
    def matrix(self) -> tuple[int, int]:
        """The update's shape as the matrix that is factored: [out, in·kh·kw] for a conv."""
        shape = self.tuned.shape
        return shape[0], math.prod(shape[1:])


def kind_of(name: str, shape: tuple[int, ...], dtype: str, model_type: str | None = None) -> tuple[str, bool, str]:
    """What a tensor is to a LoRA: ``(kind, fan_in_fan_out, why it is "full")``.

    ``linear``: a 2-D ``.weight`` (a ``Conv1D`` of :data:`CONV1D_MODELS`, stored [in, out], has
    ``fan_in_fan_out``); ``embedding``: a 2-D ``.weight`` of a module named in
    :data:`EMBEDDING_NAMES`; ``conv``: a 3-, 4- or 5-D ``.weight`` (``nn.Conv1d/2d/3d``, factored
    as PEFT's conv LoRA: [out, in·kh·kw]); ``full``: everything else (biases, norms, other
    parameters, integer buffers).
    """
    if dtype not in FLOAT_DTYPES:
        return "full", False, f"a {dtype} tensor, not floating point"
    if not name.endswith(".weight"):
        if name.endswith(".bias"):
            return "full", False, "a bias"
        return "full", False, f"a {len(shape)}-D parameter that is no layer's weight"
    leaf = name[: -len(".weight")].rpartition(".")[2]
    if len(shape) == 2:
        if leaf in EMBEDDING_NAMES:
            return "embedding", False, ""
        return "linear", model_type in CONV1D_MODELS and leaf in CONV1D_NAMES, ""
    if len(shape) in (3, 4, 5):
        return "conv", False, ""
    return "full", False, "a norm or scale vector" if len(shape) == 1 else f"a {len(shape)}-D weight"


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last component."""
    return name.rpartition(".")[0]


def _model_type(m: BaseModel) -> str | None:
    t = m.config.get("model_type")
    return t if isinstance(t, str) else None


def _resized_vocab(name: str, b: TensorInfo, t: TensorInfo) -> bool:
    """A token embedding or output head whose rows (the vocabulary) grew or shrank, nothing else."""
    leaf = module_of(name).rpartition(".")[2]
    is_vocab = leaf in EMBEDDING_NAMES or leaf in OUTPUT_HEADS
    return is_vocab and len(b.shape) == len(t.shape) == 2 and b.shape[1] == t.shape[1]


def pair_tensors(base: BaseModel, tuned: BaseModel) -> list[Pair]:
    """Every tensor of BASE with its TUNED counterpart, in BASE's file order, checked to belong together.

    Raises:
        InputError: the configs name other architectures (``model_type``), a tensor is in one model
            only, a tensor has another shape (but a resized vocabulary), or a model is 4-bit.
    """
    tb, tt = _model_type(base), _model_type(tuned)
    if tb and tt and tb != tt:
        raise InputError(
            f"{tuned.path}: is a {tt!r} model but {base.path} is a {tb!r} model (config.json model_type)",
            hint="extract needs the base model TUNED was fine-tuned from",
        )
    for m in (base, tuned):
        if m.quantized:
            raise InputError(
                f"{m.path}: holds 4-bit weights ({next(iter(m.quantized))!r}); extract reads full-precision models",
                hint="extract from the unquantized checkpoints",
            )
    for a, b in ((tuned, base), (base, tuned)):
        missing = [n for n in a.tensors if n not in b.tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(
                f"{a.path}: tensor {missing[0]!r}{more} is not in {b.path}",
                hint="are both the same architecture? extract needs the base model TUNED was fine-tuned from",
            )
    order = sorted(base.tensors, key=lambda n: (base.tensors[n][0], base.tensors[n][1].begin))
    pairs = []
    for name in order:
        b, t = base.info(name), tuned.info(name)
        kind, fifo, why = kind_of(name, t.shape, t.dtype, tt or tb)
        if b.shape != t.shape:
            if not _resized_vocab(name, b, t):
                raise InputError(
                    f"{tuned.path}: tensor {name!r} is {list(t.shape)} but {list(b.shape)} in {base.path}",
                    hint="are both the same architecture and size? extract needs the base model TUNED was fine-tuned from",
                )
            kind, fifo, why = "full", False, f"vocabulary resized from {b.shape[0]} to {t.shape[0]} rows"
        pairs.append(Pair(name, module_of(name), kind, b, t, fifo, why))
    return pairs


def select(pairs: Sequence[Pair], globs: Sequence[str] | None, where: object) -> list[Pair]:
    """The pairs whose module name matches one of ``globs`` (fnmatch; all pairs without globs).

    Raises:
        UsageError: a glob that matches no module.
    """
    if not globs:
        return list(pairs)
    for g in globs:
        if not any(fnmatch.fnmatchcase(p.module, g) for p in pairs):
            raise UsageError(f"--module {g!r} matches no module of {where}", hint="module names are as in `loractl inspect`: model.layers.0.self_attn.q_proj")
    return [p for p in pairs if any(fnmatch.fnmatchcase(p.module, g) for g in globs)]


# --- reading --------------------------------------------------------------------------------------


def _read_pair(base: BaseModel, tuned: BaseModel, p: Pair, buffers: BufferPool | None) -> tuple[torch.Tensor, torch.Tensor]:
    if buffers is None:
        return base.read(p.name), tuned.read(p.name)
    out_b = buffers.empty(p.base.shape, torch_dtype(p.base.dtype))
    out_t = buffers.empty(p.tuned.shape, torch_dtype(p.tuned.dtype))
    return base.read(p.name, out=out_b), tuned.read(p.name, out=out_t)


def read_pairs(base: BaseModel, tuned: BaseModel, pairs: Sequence[Pair]) -> Iterator[tuple[Pair, torch.Tensor, torch.Tensor]]:
    """``(pair, base tensor, tuned tensor)`` in order; the next pair is read on a thread while the
    caller computes this one (two pairs in memory at most).

    The tensors of a pair that is not ``full`` are read into reused buffers (fresh memory costs a
    page fault every 4 KiB: most of the system time of a whole-model extraction), valid until the
    caller asks for the next pair; a ``full`` pair's tensors are the caller's to keep."""
    if not pairs:
        return
    buffers = BufferPool(max_free=2)  # the pair being read takes the two the previous pair gave back

    def read(p: Pair) -> tuple[torch.Tensor, torch.Tensor]:
        plain = p.kind != "full" and p.base.dtype in FLOAT_DTYPES and p.tuned.dtype in FLOAT_DTYPES
        return _read_pair(base, tuned, p, buffers if plain else None)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loractl-read") as pool:
        nxt = pool.submit(read, pairs[0])
        for i, p in enumerate(pairs):
            b, t = nxt.result()
            nxt = pool.submit(read, pairs[i + 1]) if i + 1 < len(pairs) else None
            yield p, b, t
            buffers.release(b)
            buffers.release(t)
            del b, t


def _same(b: torch.Tensor, t: torch.Tensor) -> bool:
    """The same bytes (same dtype and shape)."""
    import torch

    if b.dtype != t.dtype or b.shape != t.shape:
        return False
    return bool(torch.equal(b.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)))


def update_of(
    p: Pair, b: torch.Tensor, t: torch.Tensor, models: tuple[object, object], scratch: BufferPool | None = None
) -> torch.Tensor | None:
    """``tuned − base`` as the float32 matrix that is factored ([out, in·kh·kw] for a conv), or None
    when the two hold the same values. With ``scratch``, the matrix is one of its buffers (the caller
    releases it).

    Raises:
        InputError: a NaN or Inf in either tensor.
    """
    import torch

    from .ops.merge import all_finite

    if _same(b, t):
        return None
    if scratch is None:  # a copy even of a float32 t: the caller reads t again (noise_floor)
        delta = t.to(torch.float32, copy=True).reshape(p.matrix)
    else:
        delta = scratch.empty(p.matrix, torch.float32).copy_(t.reshape(p.matrix))
    delta.sub_(b.reshape(p.matrix))
    if not all_finite(delta) and not bool(torch.isfinite(delta).all()):  # a cheap screen first
        if scratch is not None:
            scratch.release(delta)
        bad = models[1] if not bool(torch.isfinite(t).all()) else models[0]
        raise InputError(f"{bad}: tensor {p.name!r} holds NaN or Inf values", hint="a diverged checkpoint cannot be extracted from")
    if not bool(delta.any()):
        if scratch is not None:
            scratch.release(delta)
        return None
    return delta


def noise_floor(p: Pair, t: torch.Tensor) -> float:
    """The rounding noise of the tuned weight, as a singular value (:func:`loractl.ops.lowrank.rounding_floor`)."""
    from .ops.lowrank import rounding_floor

    return rounding_floor(t.reshape(p.matrix))


# --- extraction -----------------------------------------------------------------------------------


@dataclass
class ExtractedModule:
    """One changed weight, and how well its LoRA holds the update.

    Attributes:
        name: PEFT's module name.
        kind: ``linear``, ``embedding`` or ``conv``.
        shape: the weight's shape.
        rank: the rank written (0: the update is below the rounding floor, or the budget gave it
            nothing; the module is then not in the adapter).
        rel_error: ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` of the factors as written (1.0 at rank 0).
        energy_kept: ``‖B·A‖²_F / ‖ΔW‖²_F`` (0.0 at rank 0).
        numerical_rank: how many singular values the method found above the rounding floor.
        method: ``exact`` or ``randomized`` (see :func:`loractl.ops.lowrank.low_rank`).
        norm: ``‖ΔW‖_F``.
    """

    name: str
    kind: str
    shape: list[int]
    rank: int
    rel_error: float
    energy_kept: float
    numerical_rank: int
    method: str
    norm: float


@dataclass
class SavedTensor:
    """A tensor saved in full (or left out), and why a LoRA does not hold it.

    Attributes:
        name: the tensor's name.
        reason: why.
        bytes: its size.
    """

    name: str
    reason: str
    bytes: int


@dataclass
class Rule:
    """How many ranks: a fixed ``rank``, an ``energy`` fraction, or ``ranks`` per module (a budget's)."""

    rank: int | None = None
    energy: float | None = None
    ranks: dict[str, int] | None = None


@dataclass
class Extraction:
    """What :func:`extract` found.

    Attributes:
        modules: the LoRA modules of rank ≥ 1 (factors in the output dtype, alpha = rank).
        report: every changed weight, rank 0 included, in file order.
        full: changed tensors a LoRA cannot hold, with the tuned tensor, by name.
        why: the reason of each of those.
        unchanged: tensors with the same values in both models.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    report: list[ExtractedModule] = field(default_factory=list)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0


def factors_module(p: Pair, b: torch.Tensor, a: torch.Tensor) -> LoraModule:
    """The LoRA module (alpha = rank, scale 1) whose update is ``b · a`` in the stored orientation.

    Linear: lora_B = b, lora_A = a. Conv: the same, reshaped to PEFT's [r, in, kh, kw] / [out, r, 1, 1].
    Embedding (stored [vocab, dim], PEFT's update (B·A)ᵀ) and ``Conv1D`` (stored [in, out], update
    (B·A)ᵀ): lora_A = bᵀ, lora_B = aᵀ.
    """
    k = int(a.shape[0])
    shape = p.tuned.shape
    if p.kind == "embedding" or p.fan_in_fan_out:
        down, up = b.T.contiguous(), a.T.contiguous()
    elif p.kind == "conv":
        down = a.reshape(k, *shape[1:]).contiguous()
        up = b.reshape(shape[0], k, *([1] * (len(shape) - 2))).contiguous()
    else:
        down, up = a.contiguous(), b.contiguous()
    return LoraModule(p.module, "embedding" if p.kind == "embedding" else p.kind, down, up, float(k), fan_in_fan_out=p.fan_in_fan_out)


def _low_rank(p: Pair, delta: torch.Tensor, floor: float, rule: Rule, dtype: torch.dtype) -> tuple[LoraModule | None, ExtractedModule]:
    """Factor one update by ``rule``; the factors cast to ``dtype`` and certified as cast."""
    import torch

    from .ops.lowrank import low_rank, narrow

    if rule.ranks is not None:
        lr = low_rank(delta, rank=rule.ranks[p.module], noise_floor=floor)
    else:
        lr = low_rank(delta, rank=rule.rank, energy=rule.energy, noise_floor=floor)
    rel, energy = (1.0, 0.0) if lr.rank == 0 else (lr.rel_error, lr.energy_kept)
    b, a = lr.b, lr.a
    if lr.rank and dtype != torch.float32:
        b, a, rel, energy = narrow(delta, b, a, dtype)
    report = ExtractedModule(p.module, p.kind, list(p.tuned.shape), lr.rank, rel, energy, lr.numerical_rank, lr.method, lr.norm)
    return (factors_module(p, b, a) if lr.rank else None), report


def changes(
    base: BaseModel,
    tuned: BaseModel,
    pairs: Sequence[Pair],
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[Pair, torch.Tensor | None, float | None]]:
    """Each pair read once (:func:`read_pairs`), as what :func:`extract` and :func:`survey` work on:
    ``(pair, None, None)`` when the two models hold the same values; ``(pair, tuned tensor, None)`` for a
    changed ``full`` pair (the caller's to keep); ``(pair, ΔW, noise floor)`` for a changed weight a LoRA
    can hold, ΔW float32 in a reused buffer valid until the next pair. ``progress`` gets each pair's
    bytes once the caller is done with it.

    Raises:
        InputError: a NaN or Inf in a tensor.
    """
    models = (base.path, tuned.path)
    scratch = BufferPool(max_free=1)
    for p, b, t in read_pairs(base, tuned, pairs):
        if p.kind == "full":
            yield (p, None, None) if _same(b, t) else (p, t, None)
        else:
            delta = update_of(p, b, t, models, scratch)
            if delta is None:
                yield p, None, None
            else:
                floor = noise_floor(p, t)
                del b, t
                yield p, delta, floor
                scratch.release(delta)
                del delta
        if progress is not None:
            progress(p.nbytes)


def extract(
    base: BaseModel,
    tuned: BaseModel,
    pairs: Sequence[Pair],
    rule: Rule,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None = None,
) -> Extraction:
    """Read every pair once and factor each changed weight by ``rule`` (pairs with a ``ranks`` entry
    of 0 are not read: the module is reported at rank 0 from ``zero`` by the caller).

    Raises:
        InputError: a NaN or Inf in a tensor.
    """
    out = Extraction()
    for p, x, floor in changes(base, tuned, pairs, progress):
        if x is None:
            out.unchanged += 1
        elif floor is None:
            out.full[p.name], out.why[p.name] = x, p.why
        else:
            module, report = _low_rank(p, x, floor, rule, dtype)
            out.report.append(report)
            if module is not None:
                out.modules[p.module] = module
    return out


@dataclass
class Survey:
    """What the first pass of a ``--budget`` extraction found (no factors).

    Attributes:
        spectra: the leading singular values of each changed weight, by module.
        full: changed tensors a LoRA cannot hold: name -> bytes.
        unchanged: tensors with the same values in both models.
    """

    spectra: dict[str, Spectrum] = field(default_factory=dict)
    full: dict[str, int] = field(default_factory=dict)
    unchanged: int = 0


def survey(
    base: BaseModel,
    tuned: BaseModel,
    pairs: Sequence[Pair],
    caps: dict[str, int],
    progress: Callable[[int], None] | None = None,
) -> Survey:
    """Read ``pairs`` once: the leading singular values (at most ``caps[module]``) of each changed
    weight (:func:`loractl.ops.lowrank.spectrum_topk`), and which other tensors changed."""
    from .ops.lowrank import spectrum_topk

    out = Survey()
    for p, x, floor in changes(base, tuned, pairs, progress):
        if x is None:
            out.unchanged += 1
        elif floor is None:
            out.full[p.name] = p.tuned.nbytes
        else:
            out.spectra[p.module] = spectrum_topk(x, caps[p.module], noise_floor=floor)
    return out


# --- placing what a LoRA cannot hold --------------------------------------------------------------


@dataclass
class BiasPlan:
    """Where the changed biases of LoRA modules go (:func:`plan_biases`).

    Attributes:
        lora_bias: in PEFT's ``lora_B.bias`` (zeros for the layers whose bias did not change).
        whole: LoRA modules saved in full instead, with the reason.
    """

    lora_bias: bool = False
    whole: dict[str, str] = field(default_factory=dict)


def plan_biases(kinds: dict[str, str], changed: Collection[str], has_bias: Callable[[str], bool], sizes: dict[str, int]) -> BiasPlan:
    """How the changed biases of LoRA modules are held. PEFT gives a module either a LoRA or a place
    in ``modules_to_save``, never both; its ``lora_B.bias`` (``lora_bias``) is one switch for every
    LoRA layer, needs a bias in each base layer to merge, and is refused on embeddings
    (peft/tuners/lora/layer.py: ``LoraLayer.update_layer``, ``Linear.merge``,
    ``Embedding.update_layer``). So:

    * no LoRA module's bias changed: nothing to do;
    * every LoRA linear/conv layer has a base bias: ``lora_bias``, and the embedding LoRAs (if any)
      are saved in full instead, when they take fewer bytes than the next option's;
    * else the modules whose bias changed are saved in full, weight and bias.

    Args:
        kinds: LoRA module name -> kind.
        changed: names of the changed tensors a LoRA does not hold.
        has_bias: does a module have a bias in the base?
        sizes: bytes of each LoRA module's weight saved in full.
    """
    needing = [m for m in kinds if f"{m}.bias" in changed]
    if not needing:
        return BiasPlan()
    layers = [m for m, k in kinds.items() if k != "embedding"]
    embeddings = [m for m, k in kinds.items() if k == "embedding"]
    if all(has_bias(m) for m in layers) and sum(sizes[m] for m in embeddings) <= sum(sizes[m] for m in needing):
        why = "an embedding, and PEFT's lora_bias (which holds the biases' changes) refuses embeddings"
        return BiasPlan(True, {m: why for m in embeddings})
    why = "its bias changed too: PEFT holds a layer's LoRA and its bias's change only with lora_bias, which needs a bias in every adapted layer"
    return BiasPlan(False, {m: why for m in needing})


@dataclass
class Placed:
    """Where everything went.

    Attributes:
        modules: the LoRA modules written (with ``bias`` when ``lora_bias``).
        modules_to_save: tensors saved in full, by name.
        saved_full: those tensors with their reasons.
        left_out: changed tensors not in the adapter, with their reasons.
        lora_bias: the biases' changes ride in PEFT's ``lora_B.bias``.
    """

    modules: dict[str, LoraModule]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_full: list[SavedTensor] = field(default_factory=list)
    left_out: list[SavedTensor] = field(default_factory=list)
    lora_bias: bool = False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unsavable(name: str, lora: Collection[str]) -> str | None:
    """Why PEFT's ``modules_to_save`` cannot hold tensor ``name`` beside these LoRA modules, or None."""
    module = module_of(name)
    if not module or not name.endswith((".weight", ".bias")):
        return "modules_to_save holds a layer's .weight and .bias only"
    if any(m.startswith(module + ".") or module.startswith(m + ".") for m in lora):
        return f"its module {module} also holds LoRA layers, and modules_to_save would replace all of it"
    return None


def _lora_biases(modules: dict[str, LoraModule], ex: Extraction, base: BaseModel, dtype: torch.dtype) -> set[str]:
    """Give every LoRA module ``lora_B.bias`` = the change of its bias (zeros if none); returns the
    bias tensors so held."""
    import dataclasses

    import torch

    held = set()
    for name, m in modules.items():
        key = f"{name}.bias"
        if key in ex.full:
            delta = ex.full[key].to(torch.float32) - base.read(key).to(torch.float32)
            held.add(key)
        else:
            delta = torch.zeros(m.up.shape[0])
        modules[name] = dataclasses.replace(m, bias=delta.to(dtype))
    return held


def place(ex: Extraction, base: BaseModel, tuned: BaseModel, plan: BiasPlan | None, *, dtype: torch.dtype) -> Placed:
    """Put every changed tensor a LoRA does not hold where PEFT loads it, or list it as left out.

    With a ``plan`` (see :func:`plan_biases`): the modules it names are saved in full (the tuned
    weight) instead of their LoRA, the biases ride in ``lora_B.bias`` if it says so, and every
    other tensor goes in ``modules_to_save`` (PEFT loads the tensors given into a copy of the module
    and keeps its others), unless PEFT cannot load it there (:func:`_unsavable`): then it is left
    out and listed. With ``plan=None`` (``--no-full``) the adapter holds LoRA factors only and every
    other changed tensor is listed.
    """
    placed = Placed(modules=dict(ex.modules))
    if plan is None:
        placed.left_out = [
            SavedTensor(n, f"{ex.why[n]}; left out (no tensors saved in full)", _nbytes(t)) for n, t in ex.full.items()
        ]
        return placed
    for name, why in plan.whole.items():
        placed.modules.pop(name, None)
        t = tuned.read(f"{name}.weight")
        placed.modules_to_save[f"{name}.weight"] = t
        placed.saved_full.append(SavedTensor(f"{name}.weight", why, _nbytes(t)))
    held: set[str] = set()
    if plan.lora_bias and placed.modules:
        placed.lora_bias = True
        held = _lora_biases(placed.modules, ex, base, dtype)
    for name, t in ex.full.items():
        if name in held:
            continue
        problem = _unsavable(name, placed.modules)
        entry = SavedTensor(name, ex.why[name] if problem is None else f"{ex.why[name]}; {problem}", _nbytes(t))
        if problem is None:
            placed.modules_to_save[name] = t
            placed.saved_full.append(entry)
        else:
            placed.left_out.append(entry)
    for name in companions(placed.modules_to_save, tuned):
        t = tuned.read(name)
        placed.modules_to_save[name] = t
        why = f"unchanged; saved with its module {module_of(name)}, as PEFT's modules_to_save loads whole modules"
        placed.saved_full.append(SavedTensor(name, why, _nbytes(t)))
    return placed


def companions(saved: Collection[str], tuned: BaseModel) -> dict[str, int]:
    """The other tensors of the modules of ``saved`` (name -> bytes): PEFT's ``modules_to_save``
    loads every tensor of a module's copy (a LayerNorm's weight and bias), so a module saved in full
    carries its unchanged tensors too (peft/utils/save_and_load.py: ``set_peft_model_state_dict``
    looks up each key of ``ModulesToSaveWrapper.adapter_state_dict_load_map``)."""
    prefixes = tuple(sorted({module_of(n) + "." for n in saved if module_of(n)}))
    if not prefixes:
        return {}
    return {n: tuned.info(n).nbytes for n in tuned.tensors if n not in saved and n.startswith(prefixes)}


# --- ranks for a size budget ----------------------------------------------------------------------

#: The bytes a budget sets aside for what is not tensor data: the safetensors header (each key with
#: its dtype, shape and offsets), the adapter config (each module in target_modules, rank_pattern
#: and alpha_pattern, escaped) and the metadata. Generous: a few hundred bytes per module.
HEADER_BYTES = 16384
MODULE_HEADER_BYTES = 1024


def overhead(modules: Collection[str], saved: Collection[str], metadata: int) -> int:
    """An upper bound of an adapter's bytes beyond its tensor data (see :data:`HEADER_BYTES`)."""
    return (
        HEADER_BYTES
        + metadata
        + sum(MODULE_HEADER_BYTES + 12 * len(m) for m in modules)
        + sum(320 + 2 * len(n) for n in saved)
    )


@dataclass
class Budgeted:
    """Ranks a budget allocated, with the first pass's findings.

    Attributes:
        ranks: module -> rank (0: left out).
        survey: the first pass (spectra, changed tensors).
        plan: where changed biases go (None without ``full``).
        allocation: the allocator's result.
        fixed: bytes taken before any rank: tensors saved in full and the headers.
    """

    ranks: dict[str, int]
    survey: Survey
    plan: BiasPlan | None
    allocation: Allocation
    fixed: int


def _caps(pairs: Sequence[Pair], budget: int, itemsize: int) -> dict[str, int]:
    """First spectrum lengths: four times the rank an even spread of the budget would give (≥ 16)."""
    per_rank = sum((p.matrix[0] + p.matrix[1]) * itemsize for p in pairs) or 1
    even = budget / per_rank
    return {p.module: min(min(p.matrix), max(16, math.ceil(4 * even))) for p in pairs}


def budget_ranks(
    base: BaseModel,
    tuned: BaseModel,
    pairs: Sequence[Pair],
    budget: int,
    *,
    full: bool,
    itemsize: int,
    metadata: int,
    progress: Callable[[int], None] | None = None,
) -> Budgeted:
    """Ranks that minimise the total squared error of the LoRA modules within ``budget`` bytes of
    output (:func:`loractl.ops.lowrank.allocate`: greedy by kept energy per byte, optimal for this
    objective at the bytes it reaches; see docs/algebra.md).

    A first pass reads every pair for the leading singular values of each changed weight; the
    tensors saved in full and the headers are paid first. A module given every singular value
    listed while its spectrum may go on has its spectrum listed four times longer and the
    allocation redone.

    Raises:
        UsageError: a budget below what must be paid first, or below one rank of any module.
    """
    from .ops.lowrank import Candidate, allocate

    lora = [p for p in pairs if p.kind != "full"]
    caps = _caps(lora, budget, itemsize)
    found = survey(base, tuned, pairs, caps, progress)
    by_module = {p.module: p for p in lora}
    by_name = {p.name: p for p in pairs}
    kinds = {m: by_module[m].kind for m, sp in found.spectra.items() if len(sp.s)}
    plan = None
    if full:
        plan = plan_biases(kinds, found.full, lambda m: f"{m}.bias" in base.tensors, {m: by_module[m].tuned.nbytes for m in kinds})
    whole = plan.whole if plan else {}
    lora_bias = plan is not None and plan.lora_bias

    def full_cost(name: str) -> int:  # a bias held in lora_B.bias is written in the factors' dtype
        info = by_name[name].tuned
        held = lora_bias and name.endswith(".bias") and module_of(name) in kinds and module_of(name) not in whole
        return max(info.nbytes, info.numel * itemsize) if held else info.nbytes

    fixed = sum(full_cost(n) for n in found.full) if full else 0
    if full:
        saved = [n for n in found.full if module_of(n) not in kinds] + [f"{m}.weight" for m in whole]
        fixed += sum(companions(saved, tuned).values())
    fixed += sum(by_module[m].tuned.nbytes for m in whole)
    fixed += overhead(list(found.spectra), list(found.full) + list(whole), metadata)
    if fixed >= budget:
        raise UsageError(
            f"--budget of {budget} bytes is below the {fixed} bytes that the tensors saved in full and the file headers take",
            hint="raise --budget, or give --no-full to leave out what a LoRA cannot hold",
        )
    while True:
        cands = [
            Candidate(
                m,
                found.spectra[m].s.square(),
                (by_module[m].matrix[0] + by_module[m].matrix[1]) * itemsize,
                fixed_bytes=by_module[m].matrix[by_module[m].fan_in_fan_out] * itemsize if lora_bias and f"{m}.bias" not in found.full else 0,
                total=found.spectra[m].total,
            )
            for m in found.spectra
            if m not in whole
        ]
        try:
            alloc = allocate(cands, budget - fixed)
        except ValueError as e:
            raise UsageError(f"--budget of {budget} bytes: {e} after {fixed} bytes for tensors saved in full and headers", hint="raise --budget") from None
        redo = [m for m in alloc.saturated if len(found.spectra[m].s) == caps[m] < min(by_module[m].matrix)]
        if not redo:
            return Budgeted(alloc.ranks, found, plan, alloc, fixed)
        for m in redo:
            caps[m] = min(min(by_module[m].matrix), 4 * caps[m])
        again = survey(base, tuned, [by_module[m] for m in redo], caps, progress)
        found.spectra.update(again.spectra)


# --- the whole run --------------------------------------------------------------------------------


@dataclass
class ExtractTotal:
    """Totals of an extraction.

    Attributes:
        modules: LoRA modules written.
        rel_error: ``√(Σ‖ΔW − B·A‖²_F / Σ‖ΔW‖²_F)`` over every changed weight (those at rank 0 too).
        energy_kept: ``Σ‖B·A‖²_F / Σ‖ΔW‖²_F`` over the same.
        parameters: values in the LoRA factors (and ``lora_B.bias``).
        saved_full_bytes: bytes of the tensors saved in full.
    """

    modules: int
    rel_error: float
    energy_kept: float
    parameters: int
    saved_full_bytes: int


@dataclass
class ExtractBudget:
    """How a ``budget`` was spent.

    Attributes:
        size: the budget, bytes.
        for_ranks: what was left for the LoRA factors after the tensors saved in full and headers.
        ranks_bytes: what the allocated ranks take.
        lost: the allocation's ``Σ‖ΔW − B·A‖²_F / Σ‖ΔW‖²_F`` from the singular values.
        lost_bound: no allocation within the budget loses less than this fraction.
    """

    size: int
    for_ranks: int
    ranks_bytes: int
    lost: float
    lost_bound: float


@dataclass
class Run:
    """What :func:`run` found and placed.

    Attributes:
        found: the extraction (factors, reports, changed tensors a LoRA cannot hold).
        placed: where everything goes in the adapter.
        report: every changed weight that is a LoRA module or at rank 0, in file order.
        unchanged: tensors equal in both models.
        total: totals over ``report``.
        budget: how a budget was spent (None without one).
        notes: what a user should know.
    """

    found: Extraction
    placed: Placed
    report: list[ExtractedModule]
    unchanged: int
    total: ExtractTotal
    budget: ExtractBudget | None
    notes: list[str]


class Ticks:
    """Progress in bytes read over passes whose total is known pass by pass."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress(0, total)

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        self.total = max(self.total, self.done)
        if self.progress is not None:
            self.progress(self.done, self.total)


def total_of(report: Sequence[ExtractedModule], placed: Placed) -> ExtractTotal:
    """Totals over the modules reported (error and energy weighted by ‖ΔW‖²)."""
    norm2 = sum(r.norm**2 for r in report)
    err2 = sum((r.rel_error * r.norm) ** 2 for r in report)
    kept = sum(r.energy_kept * r.norm**2 for r in report)
    return ExtractTotal(
        modules=len(placed.modules),
        rel_error=math.sqrt(err2 / norm2) if norm2 else 0.0,
        energy_kept=kept / norm2 if norm2 else 1.0,
        parameters=sum(m.parameters for m in placed.modules.values()),
        saved_full_bytes=sum(s.bytes for s in placed.saved_full),
    )


def notes_of(pairs: Sequence[Pair], placed: Placed) -> list[str]:
    """What a user should know about the adapter: a resized vocabulary, biases in ``lora_B.bias``."""
    notes = []
    saved = {s.name for s in placed.saved_full}
    for p in pairs:
        if p.name in saved and p.base.shape != p.tuned.shape:
            notes.append(
                f"{p.name}: the vocabulary was resized from {p.base.shape[0]} to {p.tuned.shape[0]} rows; "
                f"PEFT loads the adapter on a base resized first (model.resize_token_embeddings({p.tuned.shape[0]}))"
            )
    if placed.lora_bias:
        notes.append("the biases' changes are in lora_B.bias (PEFT's lora_bias: true)")
    return notes


def _budgeted(
    b: BaseModel, t: BaseModel, pairs: Sequence[Pair], size: int, full: bool, dtype: torch.dtype, metadata: int, tick: Ticks
) -> tuple[Extraction, BiasPlan | None, ExtractBudget]:
    """``--budget``: ranks from a first pass (:func:`budget_ranks`), then the factors at those ranks
    in a second; rank-0 modules are reported from the first pass's spectra."""
    import torch

    itemsize = torch.empty(0, dtype=dtype).element_size()
    bud = budget_ranks(b, t, pairs, size, full=full, itemsize=itemsize, metadata=metadata, progress=tick)
    again = [p for p in pairs if p.name in bud.survey.full or bud.ranks.get(p.module, 0) > 0]
    tick.total = tick.done + sum(p.nbytes for p in again)
    found = extract(b, t, again, Rule(ranks=bud.ranks), dtype, tick)
    found.unchanged = bud.survey.unchanged
    done = {r.name: r for r in found.report}
    found.report = []
    for p in pairs:
        sp = bud.survey.spectra.get(p.module) if p.kind != "full" else None
        if sp is not None:
            zero = ExtractedModule(p.module, p.kind, list(p.tuned.shape), 0, 1.0, 0.0, len(sp.s), sp.method, math.sqrt(sp.total))
            found.report.append(done.get(p.module, zero))
    total = sum(sp.total for sp in bud.survey.spectra.values()) or 1.0
    alloc = bud.allocation
    spent = ExtractBudget(size, size - bud.fixed, alloc.bytes, alloc.lost / total, alloc.lost_bound / total)
    return found, bud.plan, spent


def run(
    base: BaseModel,
    tuned: BaseModel,
    pairs: Sequence[Pair],
    rule: Rule,
    budget: int | None,
    full: bool,
    dtype: torch.dtype,
    metadata: int,
    progress: Progress | None = None,
) -> Run:
    """Extract ``pairs`` by ``rule`` (or, with ``budget``, by the ranks :func:`budget_ranks` allocates)
    and place what a LoRA cannot hold (:func:`place`); ``full=False`` leaves it out, listed."""
    tick = Ticks(progress, sum(p.nbytes for p in pairs) * (2 if budget else 1))
    spent = None
    if budget is None:
        found = extract(base, tuned, pairs, rule, dtype, tick)
        kinds = {m.name: m.kind for m in found.modules.values()}
        sizes = {m: tuned.info(f"{m}.weight").nbytes for m in kinds}
        plan = plan_biases(kinds, found.full, lambda m: f"{m}.bias" in base.tensors, sizes) if full else None
    else:
        found, plan, spent = _budgeted(base, tuned, pairs, budget, full, dtype, metadata, tick)
    placed = place(found, base, tuned, plan, dtype=dtype)
    report = [r for r in found.report if plan is None or r.name not in plan.whole]
    return Run(found, placed, report, found.unchanged, total_of(report, placed), spent, notes_of(pairs, placed))


def nothing_to_extract(r: Run, base: BaseModel, tuned: BaseModel, globs: Sequence[str]) -> None:
    """Refuse an extraction that would write no LoRA module (PEFT loads no adapter without one).

    Raises:
        InputError: identical models (within ``globs``), only rounding noise, or only tensors a
            LoRA cannot hold changed.
    """
    found, placed = r.found, r.placed
    where = f" (among the modules {', '.join(globs)})" if globs else ""
    if not found.report and not found.full:
        raise InputError(
            f"{tuned.path}: holds the same values as {base.path} in every tensor{where}: nothing to extract",
            hint="TUNED must be a fine-tune of BASE" + (", or widen --module" if globs else ""),
        )
    if not placed.modules:
        if found.report and not any(x.rank for x in found.report):
            why = f"the {len(found.report)} changed weights differ only by rounding noise (below its floor)"
        else:
            names = ", ".join(list(found.full)[:3]) + (" ..." if len(found.full) > 3 else "")
            why = f"only tensors a LoRA cannot hold changed ({names})"
        raise InputError(f"{tuned.path}: no LoRA module to extract from {base.path}{where}: {why}")
