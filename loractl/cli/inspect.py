"""``loractl inspect``: what an adapter is, and how it fits a base."""

from __future__ import annotations

from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, human_bytes, render

EPILOG = """Examples:

\b
  loractl inspect examples/tiny-llama-lora
  loractl inspect examples/tiny-llama-lora --base examples/tiny-llama --count 1000
  loractl inspect a/ b/ --json | jq '.adapters[].rank'
"""


def _fmt_float(x: float) -> str:
    return f"{x:.6g}"


@handled
def inspect(
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER", help="One or more adapters (several: one comparison table)."
    ),
    base: str = typer.Option(
        None, "--base", help="A base model: coverage, size ratio and storage arithmetic."
    ),
    count: int = typer.Option(100, "--count", help="N for 'one base + N adapters vs N merged copies'."),
    spectrum: bool = typer.Option(
        False,
        "--spectrum",
        help="Singular values per module, effective rank, energy kept at ranks 1, 2, 4, … r.",
    ),
    plot: Path = typer.Option(None, "--plot", help="With --spectrum: draw energy-vs-rank curves to a PNG."),
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    subfolder: str = opt.SUBFOLDER,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Describe adapters: format, kind, rank, alpha and effective scale per module, sizes, coverage of a base."""
    from .. import api
    from ..errors import UsageError

    if spectrum:
        spec = api.spectrum(adapters, base=base, format=format, allow_pickle=allow_pickle, alpha=alpha)
        if plot is not None:
            from ._plot import spectrum_curves

            spectrum_curves(spec, plot, inputs=[*adapters, base])
        render("inspect", spec, as_json=json_out, quiet=quiet, human=_human_spectrum)
        return
    if plot is not None:
        raise UsageError("--plot goes with --spectrum")
    result = api.inspect(
        adapters,
        base=base,
        count=count,
        format=format,
        allow_pickle=allow_pickle,
        subfolder=subfolder,
        alpha=alpha,
    )

    render("inspect", result, as_json=json_out, quiet=quiet, human=_human_inspect)


def _human_inspect(r) -> None:  # r: api.InspectResult
    """The human form of `inspect`: one table per adapter, its base fit when given."""
    from rich.table import Table

    c = console()
    if len(r.adapters) > 1:
        t = Table(title="adapters")
        for col in ("path", "format", "kind", "modules", "rank", "parameters", "bytes", "dtypes"):
            t.add_column(col)
        for a in r.adapters:
            rank = (
                str(a.rank["min"]) if a.rank["min"] == a.rank["max"] else f"{a.rank['min']}-{a.rank['max']}"
            )
            t.add_row(
                a.path,
                a.format,
                a.kind,
                str(a.modules),
                rank,
                f"{a.parameters:,}",
                human_bytes(a.bytes),
                ",".join(a.dtypes),
            )
        c.print(t)
    for a in r.adapters:
        rank = str(a.rank["min"]) if a.rank["min"] == a.rank["max"] else f"{a.rank['min']}..{a.rank['max']}"
        c.print(
            f"[bold]{a.path}[/bold]: {a.format} {a.kind}, {a.modules} modules, rank {rank}, "
            f"{a.parameters:,} parameters, {human_bytes(a.bytes)} ({', '.join(a.dtypes)})"
        )
        if a.init:
            c.print(
                f"  trained with init_lora_weights={a.init!r}: it changed the base; do not merge into the original"
            )
        if a.modules_to_save:
            c.print(f"  modules_to_save (full copies): {', '.join(a.modules_to_save)}")
        t = Table(show_edge=False)
        for col in ("module", "kind", "rank", "alpha", "scale", "shape", "dtype"):
            t.add_column(col, justify="right" if col in ("rank", "alpha", "scale") else "left")
        for m in a.module_list:
            kind = m.kind + (" DoRA" if m.dora else "")
            t.add_row(
                m.name,
                kind,
                str(m.rank),
                _fmt_float(m.alpha),
                _fmt_float(m.scale),
                "x".join(map(str, m.shape)),
                m.dtype,
            )
        c.print(t)
        if a.base is not None:
            _human_base(c, a.base)


def _human_base(c, b) -> None:  # b: api.BaseFit
    cov, st = b.coverage, b.storage
    c.print(
        f"  base {b.path}: {b.parameters:,} parameters, {human_bytes(b.bytes)}; adapter/base = {b.ratio:.4%}"
    )
    if b.quantized is not None:
        qz = b.quantized
        c.print(
            f"  4-bit base ({qz.method}, {'/'.join(qz.quant_types)}"
            f"{', double-quantized' if qz.double_quant else ''}): {qz.weights} weights; "
            f"a merged copy weighs {human_bytes(qz.merged_bytes)} (bf16)"
        )
    c.print(
        f"  coverage: {cov.matched} modules match, {len(cov.unmatched)} unmatched, "
        f"{len(cov.shape_mismatch)} with the wrong shape"
        + (f", {len(cov.incompatible)} that cannot be merged" if cov.incompatible else "")
    )
    for name in cov.unmatched[:10]:
        c.print(f"    unmatched: {name}")
    for mm in cov.shape_mismatch[:10]:
        c.print(f"    shape mismatch: {mm.module}: adapter {mm.adapter} vs base {mm.base}")
    for bad in cov.incompatible[:10]:
        c.print(f"    cannot merge: {bad.message}")
    c.print(
        f"  storage for {st.count}: one base + {st.count} adapters = {human_bytes(st.base_plus_adapters)} "
        f"vs {st.count} merged copies = {human_bytes(st.merged_copies)}"
    )


def _human_spectrum(r) -> None:  # r: api.SpectrumResult
    from rich.table import Table

    c = console()
    for a in r.adapters:
        c.print(f"[bold]{a.path}[/bold]: singular values of each module's update s·B·A")
        t = Table(show_edge=False)
        for col in ("module", "rank", "eff. rank", "σ₁", "σ_r", "energy kept at rank k"):
            t.add_column(col, justify="left" if col in ("module", "energy kept at rank k") else "right")
        for m in a.modules:
            sv = m.singular_values
            energy = "  ".join(f"{k}:{v:.3f}" for k, v in m.energy.items())
            t.add_row(m.name, str(m.rank), f"{m.effective_rank:.2f}", f"{sv[0]:.4g}", f"{sv[-1]:.4g}", energy)
        c.print(t)


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EPILOG)(inspect)
