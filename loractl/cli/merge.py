"""``loractl merge``: write BASE + Σ wᵢ·ΔWᵢ in the base's own layout."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, human_bytes, progress_bar, render

EPILOG = """Examples:

\b
  loractl merge examples/tiny-llama examples/tiny-llama-lora -o merged
  loractl merge base/ a/ b/ --weight 1 --weight 0.5 -o merged --dtype bf16
  loractl merge sd.safetensors style.safetensors -o out.safetensors --no-receipt
  loractl merge deepseek-fp8/ lora/ -o merged-fp8 --requantize
"""


class DType(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@handled
def merge(
    base: str = typer.Argument(
        ..., help="Base model: a folder (transformers/diffusers) or a .safetensors file."
    ),
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER", help="One or more adapters, merged in order."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The merged model to create (folder, or file)."),
    weight: list[float] = typer.Option(None, "--weight", "-w", help="Merge weight per adapter (default 1)."),
    dtype: DType = typer.Option(
        DType.auto, "--dtype", help="Output dtype of float tensors (auto: the base's)."
    ),
    shard_size: str = typer.Option(
        None, "--shard-size", help="Re-shard the output, e.g. 5GB (default: as the base)."
    ),
    device: Device = typer.Option(  # hidden until merges run on a GPU; --device cpu is accepted
        Device.cpu, "--device", hidden=True, help="Where to compute."
    ),
    receipt: bool = typer.Option(
        True,
        "--receipt/--no-receipt",
        help="Write the receipt that lets unmerge restore the base bit for bit.",
    ),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Merge even if some modules match no weight."
    ),
    requantize: bool = typer.Option(
        False,
        "--requantize",
        help="FP8 base: write the changed weights back in FP8 (the base's blocks, new scales) "
        "instead of dequantized bf16.",
    ),
    force: bool = opt.FORCE,
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    subfolder: str = opt.SUBFOLDER,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Merge adapters into a base model, streaming tensor by tensor, exactly as PEFT's merge_and_unload."""
    from .. import api
    from ..errors import UsageError

    if device is Device.cuda:
        raise UsageError("--device cuda is not supported by this version; merges run on the CPU")
    with progress_bar("merging", enabled=not (json_out or quiet)) as bar:
        result = api.merge(
            base,
            adapters,
            output,
            weights=weight or None,
            dtype=dtype.value,
            shard_size=shard_size,
            receipt=receipt,
            allow_partial=allow_partial,
            requantize=requantize,
            force=force,
            format=format,
            allow_pickle=allow_pickle,
            alpha=alpha,
            subfolder=subfolder,
            progress=bar,
        )

    def human(r: api.MergeResult) -> None:
        c = console()
        c.print(
            f"merged {len(r.adapters)} adapter(s), {r.modules} modules, into {r.output} "
            f"({r.tensors_changed} tensors changed, {r.tensors_copied} copied, "
            f"{human_bytes(r.bytes_written)} in {r.seconds:.1f}s)"
        )
        if r.unmatched:
            c.print(f"skipped {len(r.unmatched)} modules that match no base weight (--allow-partial)")
        for note in r.notes:
            c.print(f"note: {note}")
        if r.receipt is not None:
            c.print(
                f"receipt: {r.receipt} ({human_bytes(r.receipt_bytes)}); unmerge restores the base bit for bit"
            )

    render("merge", result, as_json=json_out, quiet=quiet, human=human)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=EPILOG)(merge)
