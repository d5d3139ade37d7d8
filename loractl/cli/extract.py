"""``loractl extract``: the best LoRA of a full fine-tune (the optimal rank-R approximation of TUNED − BASE)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, human_bytes, progress_bar, render

EPILOG = """Examples:

\b
  loractl extract base/ tuned/ -o lora-r16 --rank 16
  loractl extract org/base org/tuned@main -o lora --energy 0.9 --module 'model.layers.*'
  loractl extract base/ tuned/ -o small --budget 200MB --dtype bf16
  loractl extract base/ tuned/ -o lora.safetensors --rank 32 --to kohya --no-full
"""


class DType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class To(str, Enum):
    peft = "peft"
    kohya = "kohya"
    diffusers = "diffusers"
    loralib = "loralib"
    gguf = "gguf"


@handled
def extract(
    base: str = typer.Argument(..., help="The base model: a folder, a .safetensors file or a Hub id org/name[@rev]."),
    tuned: str = typer.Argument(..., help="The fine-tuned model, the same way."),
    output: Path = typer.Option(..., "-o", "--output", help="The adapter to create (a PEFT folder by default)."),
    rank: int = typer.Option(None, "--rank", help="Rank R of every module (never above its update's true rank)."),
    energy: float = typer.Option(None, "--energy", help="Per module, the smallest rank with Σσ²ₖ/Σσ² ≥ F."),
    budget: str = typer.Option(
        None, "--budget", help="A total size (e.g. 200MB): ranks where they lower the total error most."
    ),
    module: list[str] = typer.Option(None, "--module", help="Extract only modules matching this glob (repeatable)."),
    full: bool = typer.Option(
        True,
        "--full/--no-full",
        help="Save what a LoRA cannot hold (biases, norms, resized vocabulary) in full, or list and leave it out.",
    ),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="dtype of the LoRA factors."),
    to: To = typer.Option(To.peft, "--to", help="The format to write."),
    force: bool = opt.FORCE,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Extract the best LoRA of a full fine-tune: per changed weight, the optimal rank-R approximation of TUNED − BASE."""
    from .. import api

    with progress_bar("extracting", enabled=not (json_out or quiet)) as bar:
        result = api.extract(
            base,
            tuned,
            output,
            rank=rank,
            energy=energy,
            budget=budget,
            module=module or None,
            full=full,
            dtype=dtype.value,
            to=to.value,
            force=force,
            progress=bar,
        )
    render("extract", result, as_json=json_out, quiet=quiet, human=_human)


def _human(r) -> None:  # r: api.ExtractResult
    from rich.table import Table

    t = Table(show_edge=False)
    for col in ("module", "kind", "rank", "rel. error", "energy kept"):
        t.add_column(col, justify="left" if col in ("module", "kind") else "right")
    for m in r.modules:
        t.add_row(m.name, m.kind, str(m.rank), f"{m.rel_error:.4g}", f"{m.energy_kept:.6f}")
    c = console()
    c.print(t)
    tot = r.total
    c.print(
        f"total: {tot.modules} LoRA modules, relative error {tot.rel_error:.4g}, energy kept {tot.energy_kept:.6f}, "
        f"{tot.parameters} parameters; {r.unchanged} tensors unchanged"
    )
    for s in r.saved_full:
        c.print(f"saved in full: {s.name} ({human_bytes(s.bytes)}): {s.reason}")
    for s in r.left_out:
        c.print(f"left out: {s.name} ({human_bytes(s.bytes)}): {s.reason}")
    if r.budget is not None:
        b = r.budget
        c.print(
            f"budget {human_bytes(b.size)}: {human_bytes(b.ranks_bytes)} of ranks, squared error lost {b.lost:.4g} "
            f"(no allocation within the budget loses less than {b.lost_bound:.4g})"
        )
    for note in r.notes:
        c.print(f"note: {note}")
    c.print(f"wrote {r.output} ({r.format}, {human_bytes(r.bytes)}) in {r.seconds:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("extract", epilog=EPILOG)(extract)
