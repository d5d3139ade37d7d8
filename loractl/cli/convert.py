"""``loractl convert``: rewrite an adapter in another format, the update unchanged."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, progress_bar, render

EPILOG = """Examples:

\b
  loractl convert adapter/ -o lora.safetensors --to kohya --base sd15/
  loractl convert adapter/ -o adapter.gguf --to gguf --base llama/
  loractl convert adapter/ -o served/ --to peft --normalize --pad-rank 16
  loractl convert moe-adapter/ -o per-expert/ --to peft --experts per-expert --base qwen3-moe/
"""


class To(str, Enum):
    peft = "peft"
    kohya = "kohya"
    diffusers = "diffusers"
    loralib = "loralib"
    gguf = "gguf"


class Experts(str, Enum):
    stacked = "stacked"
    per_expert = "per-expert"


class DType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@handled
def convert(
    adapter: str = typer.Argument(..., help="The adapter to convert."),
    output: Path = typer.Option(..., "-o", "--output", help="The converted adapter to create."),
    to: To = typer.Option(..., "--to", help="The format to write."),
    base: str = typer.Option(
        None, "--base", help="Base model, for module names (kohya) and architecture (GGUF)."
    ),
    dtype: DType = typer.Option(None, "--dtype", help="Dtype of the written factors (default: kept)."),
    normalize: bool = typer.Option(
        False, "--normalize", help="alpha = rank for every module, scale folded into B."
    ),
    pad_rank: int = typer.Option(
        None, "--pad-rank", help="Zero-pad every module to this rank (alpha adjusted)."
    ),
    rank: int = typer.Option(None, "--rank", help="r for inputs that do not store it (loralib)."),
    alpha: float = opt.ALPHA,
    experts: Experts = typer.Option(
        None,
        "--experts",
        help="per-expert: rewrite MoE expert LoRAs (PEFT target_parameters) as one module per expert, "
        "named as the base's checkpoint (needs --base; llama.cpp and vLLM read that form).",
    ),
    force: bool = opt.FORCE,
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    subfolder: str = opt.SUBFOLDER,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Rewrite an adapter in another format (peft, kohya, diffusers, loralib, gguf); scale·B·A is unchanged."""
    from .. import api

    with progress_bar("converting", enabled=not (json_out or quiet), unit="items") as bar:
        result = api.convert(
            adapter,
            output,
            to=to.value,
            base=base,
            dtype=dtype.value if dtype else None,
            normalize=normalize,
            pad_rank=pad_rank,
            rank=rank,
            alpha=alpha,
            experts=experts.value if experts else None,
            force=force,
            format=format,
            allow_pickle=allow_pickle,
            subfolder=subfolder,
            progress=bar,
        )

    def human(r: api.ConvertResult) -> None:
        extra = (", normalized" if r.normalize else "") + (
            f", padded to rank {r.pad_rank}" if r.pad_rank else ""
        )
        console().print(f"converted {r.modules} modules {r.source_format} → {r.format}{extra}: {r.output}")

    render("convert", result, as_json=json_out, quiet=quiet, human=human)


def register(app: typer.Typer) -> None:
    app.command("convert", epilog=EPILOG)(convert)
