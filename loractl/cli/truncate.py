"""``loractl truncate``: lower an adapter's rank (optimal SVD truncation, or DyLoRA nested ranks)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, render

EPILOG = """Examples:

\b
  loractl truncate adapter/ -o adapter-r16 --rank 16
  loractl truncate adapter/ -o smaller --energy 0.95 --rank 64
  loractl truncate adapter/ -o small --budget 20MB
  loractl truncate dylora.safetensors -o r8.safetensors --rank 8 --nested --dylora-convention kohya
"""


class Convention(str, Enum):
    original = "original"
    kohya = "kohya"
    lycoris = "lycoris"


@handled
def truncate(
    adapter: str = typer.Argument(..., help="The adapter to truncate."),
    output: Path = typer.Option(..., "-o", "--output", help="The truncated adapter to create."),
    rank: int = typer.Option(None, "--rank", help="Target rank (a cap with a dynamic rule)."),
    energy: float = typer.Option(None, "--energy", help="Keep the smallest rank with Σσ²ₖ/Σσ² ≥ F."),
    sv_ratio: float = typer.Option(None, "--sv-ratio", help="Keep σᵢ ≥ σ₁/P."),
    sv_cumulative: float = typer.Option(
        None, "--sv-cumulative", help="Keep the smallest rank with Σσₖ/Σσ ≥ F."
    ),
    sv_fro: float = typer.Option(None, "--sv-fro", help="Keep the smallest rank with √(Σσ²ₖ/Σσ²) ≥ F."),
    budget: str = typer.Option(
        None, "--budget", help="A total size (e.g. 50MB): ranks where they lower the total error most."
    ),
    nested: bool = typer.Option(
        False, "--nested", help="DyLoRA: keep the first R components exactly (no SVD)."
    ),
    dylora_convention: Convention = typer.Option(
        None,
        "--dylora-convention",
        help="How a nested truncation sets alpha (default: kohya for kohya DyLoRA files).",
    ),
    to: str = typer.Option(None, "--to", help="Output format (default: the input's)."),
    force: bool = typer.Option(
        False, "--force", help="Replace the output; with --nested, truncate a non-DyLoRA adapter."
    ),
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Lower an adapter's rank: optimal per-module SVD truncation from the factors, or DyLoRA nested ranks."""
    from .. import api

    result = api.truncate(
        adapter,
        output,
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative,
        sv_fro=sv_fro,
        budget=budget,
        nested=nested,
        dylora_convention=dylora_convention.value if dylora_convention else None,
        to=to,
        force=force,
        format=format,
        allow_pickle=allow_pickle,
        alpha=alpha,
    )

    def human(r: api.TruncateResult) -> None:
        from rich.table import Table

        t = Table(show_edge=False)
        for col in ("module", "rank", "energy kept", "Frobenius kept"):
            t.add_column(col, justify="left" if col == "module" else "right")
        for m in r.modules:
            t.add_row(
                m.name, f"{m.rank_before} → {m.rank_after}", f"{m.energy_kept:.6f}", f"{m.fro_kept:.6f}"
            )
        c = console()
        c.print(t)
        c.print(f"wrote {r.output} ({r.format}, {r.method}) in {r.seconds:.2f}s")

    render("truncate", result, as_json=json_out, quiet=quiet, human=human)


def register(app: typer.Typer) -> None:
    app.command("truncate", epilog=EPILOG)(truncate)
