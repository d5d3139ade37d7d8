"""``loractl verify``: audit a merged model against BASE + Σ wᵢ·ΔWᵢ, tensor by tensor."""

from __future__ import annotations

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, progress_bar, render

EPILOG = """Examples:

\b
  loractl verify merged/ examples/tiny-llama-lora --base examples/tiny-llama
  loractl verify merged/ a/ b/ --weight 1 --weight 0.5 --base base/ --json
  loractl verify org/merged-model org/adapter --base org/base-model || exit 1
"""


@handled
def verify(
    merged: str = typer.Argument(
        ..., help="The merged model to audit (folder, .safetensors file or Hub repo), whoever wrote it."
    ),
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER", help="The adapters it should hold, in merge order."
    ),
    base: str = typer.Option(..., "--base", help="The base model the adapters were merged into."),
    weight: list[float] = typer.Option(None, "--weight", "-w", help="Merge weight per adapter (default 1)."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Check the modules that match a base weight, ignore the others."
    ),
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    subfolder: str = opt.SUBFOLDER,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Verify a merged model against BASE and the adapters, tensor by tensor.

    Every tensor an adapter changes must equal BASE + Σ wᵢ·ΔWᵢ up to the rounding of its dtype,
    every other tensor must equal BASE. Works on merges by loractl, PEFT (merge_and_unload +
    save_pretrained), mergekit and others, in the base's dtype or another. Exit 1 with a finding
    per tensor left unmerged, merged at the wrong scale, changed where no adapter touches it,
    holding NaN/Inf, or missing; 0 when every tensor is right.
    """
    from .. import api

    with progress_bar("verifying", enabled=not (json_out or quiet)) as bar:
        result = api.verify(
            merged,
            adapters,
            base=base,
            weights=weight or None,
            allow_partial=allow_partial,
            format=format,
            allow_pickle=allow_pickle,
            alpha=alpha,
            subfolder=subfolder,
            progress=bar,
        )

    def human(r: api.VerifyResult) -> None:
        c = console()
        t = r.tensors
        if r.findings:
            c.print(findings_table(r.findings, c.width))
        for note in r.notes:
            c.print(f"note: {note}")
        head = "ok" if r.ok else f"FAILED ({len(r.findings)} finding(s))"
        c.print(
            f"{head}: {r.merged}: {t.tensors} tensors checked against {r.base} and {len(r.adapters)} adapter(s) "
            f"in {r.seconds:.1f}s: {t.exact} changed with a correct merge's exact bits, {t.within_bound} changed "
            f"within the rounding bound, {t.untouched} equal to the base"
        )

    render("verify", result, as_json=json_out, quiet=quiet, human=human)
    if not result.ok:
        raise typer.Exit(1)


#: the narrowest the message column may get before the findings are listed one below the other
MESSAGE_MIN_WIDTH = 24


def findings_table(findings, width: int):  # -> rich renderable
    """The findings as a table whose codes and module names are never cut or wrapped (the message
    column wraps); on a terminal too narrow for that, one block per finding: ``code  module`` (the
    module on a line of its own if need be), then the message wrapped below it."""
    import textwrap

    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    codes = [f.code for f in findings]
    modules = [f.module or "-" for f in findings]
    whole = max(4, *map(len, codes)) + max(6, *map(len, modules))
    if whole + MESSAGE_MIN_WIDTH + 3 * 3 + 1 <= width:  # 3: padding and rule of each column
        t = Table(show_edge=False)
        t.add_column("code", no_wrap=True, min_width=max(4, *map(len, codes)))
        t.add_column("module", no_wrap=True, min_width=max(6, *map(len, modules)))
        t.add_column("message", ratio=1, min_width=MESSAGE_MIN_WIDTH)
        for f, module in zip(findings, modules):  # Text: no rich markup in messages
            t.add_row(Text(f.code), Text(module), Text(f.message))
        return t
    lines: list[str] = []
    for f, module in zip(findings, modules):
        if len(f.code) + 2 + len(module) <= width:
            lines.append(f"{f.code}  {module}")
        else:
            lines += [f.code, f"    {module}"]
        lines += textwrap.wrap(f.message, max(8, width - 4), initial_indent="    ", subsequent_indent="    ")
    return Group(*(Text(line, no_wrap=True, overflow="ignore") for line in lines))


def register(app: typer.Typer) -> None:
    app.command("verify", epilog=EPILOG)(verify)
