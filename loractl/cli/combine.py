"""``loractl combine``: one adapter from several."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, render

EPILOG = """Examples:

\b
  loractl combine style/ subject/ -o both --weight 0.7 --weight 1.0
  loractl combine a/ b/ -o ab --method svd --rank 16
  loractl combine a/ b/ c/ -o abc --method dare-ties --density 0.5 --seed 0 --rank 16
"""


class Method(str, Enum):
    cat = "cat"
    svd = "svd"
    linear = "linear"
    ties = "ties"
    dare_linear = "dare-linear"
    dare_ties = "dare-ties"
    magnitude_prune = "magnitude-prune"


class Sign(str, Enum):
    total = "total"
    frequency = "frequency"


@handled
def combine(
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER", help="Two or more adapters for the same base."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The combined adapter to create."),
    weight: list[float] = typer.Option(None, "--weight", "-w", help="Weight per adapter (default 1)."),
    method: Method = typer.Option(
        Method.cat, "--method", help="cat is exact; svd is the exact sum truncated to --rank."
    ),
    rank: int = typer.Option(None, "--rank", help="Rank of the result (svd and PEFT's *_svd methods)."),
    density: float = typer.Option(
        None, "--density", help="Fraction of entries kept (ties, dare-*, magnitude-prune)."
    ),
    majority_sign: Sign = typer.Option(Sign.total, "--majority-sign", help="TIES sign election."),
    seed: int = typer.Option(None, "--seed", help="Seed for DARE's random drops."),
    to: str = typer.Option(None, "--to", help="Output format (default: the first adapter's)."),
    force: bool = opt.FORCE,
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Combine adapters: cat (exact), svd (optimal truncation of the exact sum), or PEFT's add_weighted_adapter methods."""
    from .. import api

    result = api.combine(
        adapters,
        output,
        weights=weight or None,
        method=method.value,
        rank=rank,
        density=density,
        majority_sign=majority_sign.value,
        seed=seed,
        to=to,
        force=force,
        format=format,
        allow_pickle=allow_pickle,
        alpha=alpha,
    )

    def human(r: api.CombineResult) -> None:
        rank_txt = (
            str(r.rank["min"]) if r.rank["min"] == r.rank["max"] else f"{r.rank['min']}..{r.rank['max']}"
        )
        console().print(
            f"combined {len(r.adapters)} adapters ({r.method}) into {r.output}: {r.modules} modules, "
            f"rank {rank_txt}, {r.format}, {r.seconds:.2f}s"
        )

    render("combine", result, as_json=json_out, quiet=quiet, human=human)


def register(app: typer.Typer) -> None:
    app.command("combine", epilog=EPILOG)(combine)
