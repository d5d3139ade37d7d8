"""Which adapter module changes which base tensor: the one rule for "does this adapter fit this base?".

:func:`match` answers it for one adapter, module by module, and every command that asks calls it:
``merge`` and ``unmerge`` (through :func:`plan_merge`), ``inspect --base`` (its coverage) and
``check --base`` (its fit findings). A module fits when its name resolves to a base weight
(:class:`~loractl.formats.names.NameResolver`: prefixes, tied output heads), the update's shape is
that weight's real shape (quantized weights: the shape they dequantize to), the weight is a float tensor
(or a quantized one loractl dequantizes), and a ``lora_B.bias`` finds a base bias. Saved full tensors
(``modules_to_save``) must resolve to a base tensor of their shape. A LoRA on a parameter (MoE experts,
PEFT ``target_parameters``) fits when :func:`loractl.formats.experts.pieces` places every expert's update
in the base's own layout (per-expert tensors or fused ones) with the expert count and shapes it has.

:func:`plan_merge` turns the matches of several adapters into :class:`Contribution` lists per base
tensor, in the order PEFT applies them: every adapter's full replacements first (the last one wins, as
PEFT loads them before merging), then the LoRA updates, adapter by adapter (a parameter LoRA: one
``expert`` contribution per expert and base tensor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InputError, ShapeMismatchError, UnsupportedAdapterError
from .formats.experts import NoBaseTensor, Piece, pieces
from .formats.names import NameResolver, ties_word_embeddings
from .ops.merge import Contribution

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter, LoraModule
    from .io.base import BaseModel

#: the kinds of :class:`Problem` that are not "matches nothing" (a merge refuses them even with
#: ``allow_partial``)
MISFITS = ("ambiguous", "shape", "no-bias", "not-float", "missing", "unsupported")
#: the error a merge raises for each kind of misfit
_ERRORS = {"shape": ShapeMismatchError, "no-bias": ShapeMismatchError, "unsupported": UnsupportedAdapterError}


@dataclass
class Problem:
    """One way an adapter does not fit a base.

    Attributes:
        kind: ``unmatched`` (no base tensor of that name), ``ambiguous`` (several), ``shape`` (the
            update's shape is not the weight's; for experts also their count), ``no-bias``
            (``lora_B.bias`` on a layer without bias), ``not-float`` (the weight is an integer tensor
            loractl cannot add to), ``missing`` (the base lacks some experts' tensors),
            ``unsupported`` (experts of a model type whose layout loractl does not know).
        module: the adapter module (or, for a saved tensor, the module it belongs to).
        message: one sentence naming the module and the base tensor.
        adapter_shape: the update's shape, for ``shape``.
        base_shape: the base tensor's shape, for ``shape``.
    """

    kind: str
    module: str
    message: str
    adapter_shape: list[int] | None = None
    base_shape: list[int] | None = None


@dataclass
class Fit:
    """How one adapter fits one base.

    Attributes:
        weights: module name -> the base weight it updates (only modules that fit).
        biases: module name -> the base bias its ``lora_B.bias`` updates.
        saved: saved tensor key (``modules_to_save``) -> the base tensor it replaces.
        pieces: parameter LoRA (``LoraModule.experts``) -> every base tensor position its experts'
            updates go to (:class:`~loractl.formats.experts.Piece`); these modules are not in ``weights``.
        problems: every module or saved tensor that does not fit, in the adapter's order.
    """

    weights: dict[str, str] = field(default_factory=dict)
    biases: dict[str, str] = field(default_factory=dict)
    saved: dict[str, str] = field(default_factory=dict)
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def matched(self) -> int:
        """Modules that fit: module LoRAs and parameter LoRAs."""
        return len(self.weights) + len(self.pieces)

    @property
    def unmatched(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "unmatched"]

    @property
    def misfits(self) -> list[Problem]:
        """Problems no ``allow_partial`` excuses: shapes, biases, dtypes, ambiguous names."""
        return [p for p in self.problems if p.kind in MISFITS]

    @property
    def complete(self) -> bool:
        """Every module and saved tensor fits: exactly when a merge accepts the adapter as it is."""
        return not self.problems


def real_shape(base: BaseModel, key: str) -> tuple[int, ...]:
    """A base tensor's shape as a weight: a quantized weight's dequantized shape, else the stored one."""
    q = base.quantized.get(key)
    return tuple(q.shape) if q is not None else tuple(base.info(key).shape)


def resolver_for(base: BaseModel) -> NameResolver:
    return NameResolver(base.tensors, tie_word_embeddings=ties_word_embeddings(base.config))


class _Shapes(Mapping[str, tuple[int, ...]]):
    """Every base tensor's :func:`real_shape`, by name, computed when asked."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return real_shape(self.base, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.tensors)

    def __len__(self) -> int:
        return len(self.base.tensors)


def _match_parameter(base: BaseModel, m: LoraModule, resolver: NameResolver, fit: Fit, source: str) -> None:
    """Where a parameter LoRA's experts go in ``base`` (:func:`~loractl.formats.experts.pieces`), or its problem."""
    from .io.safetensors import FLOAT_DTYPES

    try:
        found = pieces(
            _Shapes(base),
            base.config,
            m.name,
            max(1, m.experts),
            (int(m.up.shape[0]), int(m.down.shape[1])),
            source=source,
            resolver=resolver,
        )
    except NoBaseTensor as e:
        fit.problems.append(Problem("unmatched", m.name, e.message))
        return
    except ShapeMismatchError as e:
        fit.problems.append(Problem("shape", m.name, e.message, adapter_shape=list(m.weight_shape)))
        return
    except UnsupportedAdapterError as e:
        fit.problems.append(Problem("unsupported", m.name, e.message))
        return
    except InputError as e:
        fit.problems.append(Problem("missing", m.name, e.message))
        return
    for key in dict.fromkeys(p.tensor for p in found):
        if key not in base.quantized and base.info(key).dtype not in FLOAT_DTYPES:
            fit.problems.append(
                Problem(
                    "not-float",
                    m.name,
                    f"{base.path}: tensor {key!r} (parameter {m.name!r}) is {base.info(key).dtype}, not a float weight",
                )
            )
            return
    fit.pieces[m.name] = found


def match(base: BaseModel, adapter: Adapter) -> Fit:
    """Match every module and saved tensor of ``adapter`` to ``base``'s tensors (see the module's docstring).

    Never raises for a misfit: each becomes a :class:`Problem`; the caller decides (merge refuses,
    check reports, inspect counts).
    """
    from .io.safetensors import FLOAT_DTYPES

    resolver = resolver_for(base)
    fit = Fit()
    src = adapter.path

    def resolve(module: str, leaf: str, owner: str, missing: str, kind: str = "unmatched") -> str | None:
        """The base tensor of ``module``'s ``leaf``; a problem (``kind``) for ``owner`` when there is none."""
        try:
            key = resolver.resolve(module, leaf)
        except InputError as e:  # several base tensors end in this name
            fit.problems.append(Problem("ambiguous", owner, f"{src}: module {owner!r}: {e.message}"))
            return None
        if key is None:
            fit.problems.append(Problem(kind, owner, f"{src}: {missing}"))
        return key

    for key, t in adapter.modules_to_save.items():
        owner = key.rsplit(".", 1)[0]
        module, _, leaf = key.replace(".base_layer.", ".").rpartition(".")
        bkey = resolve(module, leaf, owner, f"saved tensor {key!r} matches no tensor of the base {base.path}")
        if bkey is None:
            continue
        if real_shape(base, bkey) != tuple(t.shape):
            fit.problems.append(_shape_problem(f"{src}: tensor {key!r} is", owner, list(t.shape), base, bkey))
            continue
        fit.saved[key] = bkey
    weights_file = str(adapter.files[0] if adapter.files else src)
    for name, m in adapter.modules.items():
        if m.experts:
            _match_parameter(base, m, resolver, fit, weights_file)
            continue
        key = resolve(
            name, "weight", name, f"module {name!r} matches no weight of the base {base.path}; is the adapter for it?"
        )
        if key is None:
            continue
        if real_shape(base, key) != tuple(m.weight_shape):
            fit.problems.append(
                _shape_problem(f"{src}: module {name!r}: adapter update is", name, list(m.weight_shape), base, key)
            )
            continue
        if key not in base.quantized and base.info(key).dtype not in FLOAT_DTYPES:
            fit.problems.append(
                Problem(
                    "not-float",
                    name,
                    f"{base.path}: tensor {key!r} (module {name!r}) is {base.info(key).dtype}, not a float weight "
                    "(loractl dequantizes bitsandbytes 4-bit and FP8 weights with their scales, no other integers)",
                )
            )
            continue
        fit.weights[name] = key
        if m.bias is not None:
            bkey = resolve(
                name,
                "bias",
                name,
                f"module {name!r} has lora_B.bias but the base layer {key!r} has no bias "
                "(PEFT cannot merge lora_bias into a layer without bias either)",
                kind="no-bias",
            )
            if bkey is None:
                del fit.weights[name]
                continue
            fit.biases[name] = bkey
    return fit


def _shape_problem(what: str, module: str, shape: list[int], base: BaseModel, key: str) -> Problem:
    base_shape = list(real_shape(base, key))
    return Problem(
        "shape",
        module,
        f"{what} {shape} but base tensor {key!r} is {base_shape}; is this adapter for another base model?",
        adapter_shape=shape,
        base_shape=base_shape,
    )


@dataclass
class MergePlan:
    """What a merge changes: per base tensor the contributions in merge order, and what matched nothing."""

    changes: dict[str, list[Contribution]]
    unmatched: list[str]
    fits: list[Fit] = field(default_factory=list)

    def refuse_unmatched(
        self, base: BaseModel, adapters: Sequence[Adapter], allow_partial: bool, verb: str = "merge"
    ) -> None:
        """Refuse modules that match no base weight (unless ``allow_partial``), and a merge that would
        change nothing at all. ``verb``: what the hint offers to do with the rest (``merge``, ``verify``).

        Raises:
            InputError: naming the base and the first modules.
        """
        if self.unmatched and not allow_partial:
            shown = ", ".join(self.unmatched[:3]) + (
                f" and {len(self.unmatched) - 3} more" if len(self.unmatched) > 3 else ""
            )
            raise InputError(
                f"{base.path}: {len(self.unmatched)} adapter modules match no base weight: {shown}",
                hint=f"is the adapter for this base? pass --allow-partial to {verb} the rest anyway",
            )
        if not self.changes:  # --allow-partial, and not one module matched: the output would be the base
            raise InputError(
                f"{base.path}: no adapter module matches a base weight ({', '.join(str(a.path) for a in adapters)}); "
                "is it for this base?",
                hint="check the adapter's module names with `loractl inspect ADAPTER --base BASE`",
            )

    def refuse_subtraction(self, adapters: Sequence[Adapter]) -> None:
        """Without a receipt an unmerge subtracts: refuse what subtraction cannot undo (a replaced
        tensor, a DoRA merge).

        Raises:
            UnsupportedAdapterError: naming the adapter and the tensor or module.
        """
        for key, contribs in self.changes.items():
            for c in contribs:
                if c.kind == "replace":
                    raise UnsupportedAdapterError(
                        f"{adapters[c.adapter].path}: replaces {key!r} (modules_to_save); the original is gone from "
                        "the merged model",
                        hint="unmerge with the receipt that merge wrote",
                    )
                if c.module is not None and c.module.is_dora:
                    raise UnsupportedAdapterError(
                        f"{adapters[c.adapter].path}: module {c.module.name!r} is DoRA: its merge scaled the weight "
                        "by norms of the original, which subtraction cannot undo",
                        hint="unmerge with the receipt that merge wrote (loractl merge writes one by default)",
                    )


def plan_merge(base: BaseModel, adapters: Sequence[Adapter], weights: Sequence[float]) -> MergePlan:
    """Every change the adapters make to ``base``, per base tensor, in PEFT's order.

    Raises:
        ShapeMismatchError: a module or saved tensor that resolves but does not fit (shape, bias).
        InputError: a module whose name matches several base tensors, or a weight that is not float.
        UnsupportedAdapterError: an adapter that changed the base during training (PiSSA, OLoRA...).
    """
    changes: dict[str, list[Contribution]] = {}
    unmatched: list[str] = []
    fits: list[Fit] = []
    for i, (ad, w) in enumerate(zip(adapters, weights)):
        if ad.init:
            raise UnsupportedAdapterError(
                f"{ad.path}: trained with init_lora_weights={ad.init!r}, which changes the base weights; "
                "merging it into the original base would be wrong",
                hint="convert it to a plain LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))",
            )
        fit = match(base, ad)
        fits.append(fit)
        for p in fit.misfits:
            raise _ERRORS.get(p.kind, InputError)(p.message)
        unmatched += [f"{p.module} ({ad.path})" for p in fit.unmatched]
        # full replacements first, every adapter's: PEFT loads them into the model (the last loaded
        # wins) before any LoRA is merged; an adapter's own replacement must not undo an earlier
        # adapter's update (two adapters on embed_tokens each save its base_layer.weight)
        for key, bkey in fit.saved.items():
            changes.setdefault(bkey, []).append(Contribution(i, "replace", w, tensor=ad.modules_to_save[key]))
    for i, (ad, w, fit) in enumerate(zip(adapters, weights, fits)):
        for name, key in fit.weights.items():
            m = ad.modules[name]
            changes.setdefault(key, []).append(Contribution(i, "lora", w, module=m))
            if name in fit.biases:
                changes.setdefault(fit.biases[name], []).append(Contribution(i, "bias", w, module=m))
        for name, found in fit.pieces.items():
            m = ad.modules[name]
            for p in found:
                changes.setdefault(p.tensor, []).append(
                    Contribution(
                        i,
                        "expert",
                        w,
                        module=m,
                        expert=p.expert,
                        index=p.index,
                        rows=p.rows,
                        transposed=p.transposed,
                        single=p.single,
                    )
                )
    return MergePlan(changes, unmatched, fits)
