"""The rules every check runs, whatever the target: the adapter reads, its values, its rank, its fit to
the base, and how it was initialised."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, InputError
from .findings import Context, Finding, text

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..formats import ReadOptions


def load(path: Path, format: str | None, options: ReadOptions, out: list[Finding]) -> Adapter | None:
    """Read the adapter; a file that cannot be read becomes a finding instead of an error.

    ``integrity`` (error): loractl's reader refused it: a safetensors header inconsistent with the
    file (``SafetensorsFile`` validates lengths, offsets, dtypes and overlaps before reading), a
    truncated file, a config that does not belong to the weights, an unknown layout, a pickle
    without ``allow_pickle``. ``not-lora`` (error): a LyCORIS algorithm that is not LoRA (LoHa,
    LoKr, OFT, ...), recognised by its keys (``formats.refuse_lycoris``).
    """
    from ..formats import load_adapter, refuse_lycoris, weights_file
    from ..io.safetensors import SafetensorsFile

    try:
        if format is None and path.suffix != ".gguf":
            weights = weights_file(path)
            if weights.suffix == ".safetensors":
                with SafetensorsFile(weights) as f:
                    keys = f.keys()
                try:
                    refuse_lycoris(keys, weights)
                except FormatError as e:
                    out.append(Finding("not-lora", "error", None, text(e)))
                    return None
        return load_adapter(path, format=format, options=options)
    except InputError as e:
        out.append(Finding("integrity", "error", None, text(e)))
        return None


def nonfinite(ctx: Context) -> list[Finding]:
    """``nan-inf`` (error), per module: NaN/Inf in any factor makes the update NaN/Inf (a diverged
    training); counts per tensor (:meth:`loractl.adapter.Adapter.nonfinite`, the scan ``load_adapter``
    refuses on)."""
    by_module: dict[str, list[str]] = {}
    saved: list[Finding] = []
    for bad in ctx.adapter.nonfinite():
        what = f"{bad.nan} NaN and {bad.inf} Inf of {bad.numel} values"
        if bad.tensor in ctx.adapter.modules_to_save:
            saved.append(
                Finding("nan-inf", "error", bad.module, f"{ctx.source}: saved tensor {bad.tensor!r} holds {what}")
            )
        else:
            by_module.setdefault(bad.module, []).append(f"{bad.tensor} holds {what}")
    return [
        Finding(
            "nan-inf",
            "error",
            name,
            f"{ctx.source}: module {name!r}: {'; '.join(parts)}; its update is not finite (diverged training?)",
        )
        for name, parts in by_module.items()
    ] + saved


def untrained(ctx: Context) -> list[Finding]:
    """``untrained-module`` (warning, per module) and ``all-zero`` (error, the whole adapter).

    A module whose B (or A) is all zero has update ``s·B·A = 0``: PEFT initialises B to zero
    (``LoraLayer.reset_lora_parameters``), and B stays zero in a module that gets no gradient
    (MiniLM's ``pooler.dense`` when the loss uses the token embeddings): one such module is a
    warning, the rest of the adapter is trained. When every module's update is zero (and nothing
    is saved in full) the adapter changes nothing: saved before training, or never updated; that
    is one ``all-zero`` error instead of a warning per module. Modules with NaN/Inf are left to
    :func:`nonfinite`.
    """
    broken = {bad.module for bad in ctx.adapter.nonfinite()}
    zero: list[Finding] = []
    for name, m in ctx.adapter.modules.items():
        if name in broken:
            continue
        for label, t in (("lora_B", m.up), ("lora_A", m.down)):
            if t.is_floating_point() and not bool(t.any()):
                zero.append(
                    Finding(
                        "untrained-module",
                        "warning",
                        name,
                        f"{ctx.source}: module {name!r}: {label} is all zero, so its update s·B·A is zero: the "
                        "module was never trained (it got no gradient, e.g. a pooler the loss does not "
                        "use) and changes nothing",
                    )
                )
                break
    modules = len(ctx.adapter.modules)
    if modules and len(zero) == modules and not ctx.adapter.modules_to_save:
        return [
            Finding(
                "all-zero",
                "error",
                None,
                f"{ctx.source}: every update is zero: lora_B (or lora_A) is all zero in all {modules} modules, "
                "as PEFT initialises them; the adapter was saved before training, or training never "
                "updated it",
            )
        ]
    return zero


def max_rank(ctx: Context, limit: int) -> list[Finding]:
    """``rank-too-large`` (error): a module's rank above ``limit``; fixed by an optimal SVD truncation."""
    fix = ctx.cmd("truncate", "-o", "OUT", "--rank", str(limit))
    return [
        Finding("rank-too-large", "error", name, f"module {name!r} has rank {m.rank}, above --max-rank {limit}", fix)
        for name, m in ctx.adapter.modules.items()
        if m.rank > limit
    ]


#: the finding code of each kind of :class:`loractl.plan.Problem`
FIT_CODES = {
    "unmatched": "unmatched-module",
    "ambiguous": "unmatched-module",
    "shape": "shape-mismatch",
    "no-bias": "shape-mismatch",
    "not-float": "shape-mismatch",
}


def fit(ctx: Context) -> list[Finding]:
    """``unmatched-module`` and ``shape-mismatch`` (errors): every problem :func:`loractl.plan.match`
    finds, the rule ``merge`` applies (a module that resolves to no base weight, or to several; an
    update whose shape is not the weight's; ``lora_B.bias`` on a layer without bias; an integer
    weight; a saved tensor that matches nothing or has another shape)."""
    from ..plan import match

    assert ctx.base is not None
    return [Finding(FIT_CODES[p.kind], "error", p.module, p.message) for p in match(ctx.base, ctx.adapter).problems]


def init(ctx: Context) -> list[Finding]:
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
            f"{ctx.source}: trained with init_lora_weights={a.init!r}, which changes the base weights; on the "
            "original base it gives different outputs unless converted to a plain LoRA first "
            "(PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))",
        )
    ]
