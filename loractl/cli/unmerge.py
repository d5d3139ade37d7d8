"""``loractl unmerge``: take adapters out of a merged model again."""

from __future__ import annotations

from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, human_bytes, progress_bar, render

EPILOG = """Examples:

\b
  loractl unmerge merged examples/tiny-llama-lora -o restored
  loractl unmerge merged a/ b/ --weight 1 --weight 0.5 -o restored
  loractl unmerge merged.safetensors lora.safetensors -o base.safetensors --receipt merged.safetensors.loractl.receipt
"""


@handled
def unmerge(
    merged: str = typer.Argument(..., help="The merged model (folder or file)."),
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER", help="The adapters that were merged, in the same order."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The restored model to create."),
    weight: list[float] = typer.Option(None, "--weight", "-w", help="The merge weight used per adapter."),
    receipt: Path = typer.Option(
        None, "--receipt", help="The receipt merge wrote (default: found beside the merged model)."
    ),
    no_receipt: bool = typer.Option(
        False, "--no-receipt", help="Ignore any receipt: subtract (close, not exact)."
    ),
    force: bool = opt.FORCE,
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Remove merged adapters: bit for bit with merge's receipt, by subtraction without it."""
    from .. import api

    with progress_bar("unmerging", enabled=not (json_out or quiet)) as bar:
        result = api.unmerge(
            merged,
            adapters,
            output,
            weights=weight or None,
            receipt=receipt,
            use_receipt=not no_receipt,
            force=force,
            format=format,
            allow_pickle=allow_pickle,
            alpha=alpha,
            progress=bar,
        )

    def human(r: api.UnmergeResult) -> None:
        how = (
            f"exact, with receipt {r.receipt}" if r.exact else "by subtraction: close to the base, not exact"
        )
        c = console()
        c.print(
            f"unmerged {len(r.adapters)} adapter(s) into {r.output} ({r.tensors_changed} tensors, "
            f"{human_bytes(r.bytes_written)} in {r.seconds:.1f}s; {how})"
        )
        for note in r.notes:
            c.print(f"note: {note}")

    render("unmerge", result, as_json=json_out, quiet=quiet, human=human)
    if not json_out:  # even with --quiet: the run could not check what it did
        for w in result.warnings:
            console(stderr=True).print(f"warning: {w}")


def register(app: typer.Typer) -> None:
    app.command("unmerge", epilog=EPILOG)(unmerge)
