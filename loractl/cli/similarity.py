"""``loractl similarity``: the LoRA paper's subspace similarity φ, or its amplification analysis."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, render

EPILOG = """Examples:

\b
  loractl similarity run1/ run2/ --i 8 --j 8
  loractl similarity r8/ r64/ --grid --module '*q_proj' --plot phi.png
  loractl similarity adapter/ --base base-model/ --json
"""


class Factor(str, Enum):
    A = "A"
    B = "B"


@handled
def similarity(
    adapters: list[str] = typer.Argument(..., metavar="ADAPTER", help="Two adapters (or one with --base)."),
    base: str = typer.Option(
        None, "--base", help="With one adapter: Section 7.3 amplification against this base."
    ),
    module: str = typer.Option(None, "--module", help="Only modules matching this glob (e.g. '*q_proj')."),
    i: int = typer.Option(None, "--i", help="Top-i directions of the first adapter (default: its rank)."),
    j: int = typer.Option(None, "--j", help="Top-j directions of the second adapter (default: its rank)."),
    grid: bool = typer.Option(False, "--grid", help="The whole i×j matrix per module and its mean."),
    factor: Factor = typer.Option(Factor.A, "--factor", help="A: right-singular vectors of A; B: left of B."),
    plot: Path = typer.Option(
        None, "--plot", help="Draw the mean grid as a heatmap PNG (needs loractl[plot])."
    ),
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Normalized subspace similarity φ(A₁, A₂, i, j) = ‖U₁ᵢᵀU₂ⱼ‖²_F / min(i, j) per module (Hu et al. 2021)."""
    from .. import api
    from ..errors import UsageError

    if base is not None:
        if len(adapters) != 1:
            raise UsageError("with --base give one adapter")
        amp = api.amplification(
            adapters[0], base, module=module, format=format, allow_pickle=allow_pickle, alpha=alpha
        )

        def human_amp(r: api.AmplificationResult) -> None:
            from rich.table import Table

            t = Table(show_edge=False)
            for col in ("module", "r", "‖ΔW‖", "‖UᵀWV‖ (ΔW)", "(W top-r)", "(random)", "amplification"):
                t.add_column(col, justify="left" if col == "module" else "right")
            for m in r.modules:
                t.add_row(
                    m.name,
                    str(m.rank),
                    f"{m.delta_norm:.4g}",
                    f"{m.proj_delta:.4g}",
                    f"{m.proj_top:.4g}",
                    f"{m.proj_random:.4g}",
                    f"{m.amplification:.4g}",
                )
            console().print(t)

        render("similarity", amp, as_json=json_out, quiet=quiet, human=human_amp)
        return
    if len(adapters) != 2:
        raise UsageError("give two adapters (or one adapter and --base)")
    if alpha is not None:
        raise UsageError("--alpha is for --base: φ compares factors and needs no scale")
    result = api.similarity(
        adapters[0],
        adapters[1],
        i=i,
        j=j,
        grid=grid or plot is not None,
        factor=factor.value,
        module=module,
        format=format,
        allow_pickle=allow_pickle,
    )
    if plot is not None:
        from ._plot import heatmap

        heatmap(result, plot, inputs=adapters)

    def human(r: api.SimilarityResult) -> None:
        from rich.table import Table

        t = Table(show_edge=False)
        t.add_column("module")
        t.add_column("φ", justify="right")
        for m in r.modules:
            t.add_row(m.name, f"{m.phi:.4f}")
        c = console()
        c.print(t)
        for m in r.modules:
            if m.grid is not None:
                _print_grid(c, f"φ(i, j) for {m.name} (rows i, columns j)", m.grid)
        if r.grid is not None and len(r.modules) > 1:
            _print_grid(c, f"mean φ(i, j) over {len(r.modules)} modules", r.grid)
        ij = f"i={r.i if r.i is not None else 'rank'}, j={r.j if r.j is not None else 'rank'}"
        c.print(f"mean φ = {r.mean_phi:.4f} over {len(r.modules)} modules ({ij}, factor {r.factor})")

    render("similarity", result, as_json=json_out, quiet=quiet, human=human)


def _print_grid(c, title: str, grid: list[list[float]]) -> None:
    from rich.table import Table

    t = Table(title=title, show_edge=False)
    t.add_column("i \\ j", justify="right")
    for j in range(len(grid[0]) if grid else 0):
        t.add_column(str(j + 1), justify="right")
    for i, row in enumerate(grid):
        t.add_row(str(i + 1), *(f"{x:.2f}" for x in row))
    c.print(t)


def register(app: typer.Typer) -> None:
    app.command("similarity", epilog=EPILOG)(similarity)
