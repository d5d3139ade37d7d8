"""``loractl run``: a pipeline of steps from a TOML recipe (for CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from . import _options as opt
from ._errors import handled, say_error
from ._output import console, render

EPILOG = """Examples:

\b
  loractl run examples/recipe.toml
  loractl run recipe.toml --dry-run
  loractl run recipe.toml --set base=/models/llama --json
"""


@handled
def run(
    recipe: Path = typer.Argument(..., help="The TOML recipe."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; run nothing."),
    set_: list[str] = typer.Option(
        None,
        "--set",
        metavar="NAME=VALUE",
        help="Set a recipe variable (repeatable); a path given here is taken from the current folder.",
    ),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Accept .bin/.pt/.ckpt pickles in every step (read with torch.load(weights_only=True)).",
    ),
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Run a recipe of check, truncate, combine, convert, merge and inspect steps, validated before anything runs."""
    from .. import api
    from .. import recipe as rec
    from ..errors import UsageError
    from ._config import read_defaults

    overrides = {}
    for item in set_ or []:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise UsageError(f"--set {item!r}: expected name=value", hint="for example --set out=dist")
        overrides[k.strip()] = v
    table, _ = read_defaults()
    defaults = {k: v for k, v in table.items() if isinstance(v, dict)}
    globals_ = {k: v for k, v in table.items() if not isinstance(v, dict)}
    for kind in rec.STEP_KINDS:
        defaults[kind] = {**globals_, **defaults.get(kind, {})}
    c = console(stderr=True)

    def on_step(r: rec.StepReport) -> None:
        if not (json_out or quiet) and sys.stderr.isatty():
            c.print(f"{r.status:>7}  {r.name} ({r.kind}) {r.seconds:.1f}s")

    result = api.run(
        recipe, vars=overrides, dry_run=dry_run, allow_pickle=allow_pickle, defaults=defaults, on_step=on_step
    )

    def human(r: rec.RunResult) -> None:
        from rich.table import Table

        t = Table(show_edge=False, title=f"{r.recipe}{' (dry run)' if r.dry_run else ''}")
        for col in ("step", "run", "status", "output", "seconds"):
            t.add_column(col, justify="right" if col == "seconds" else "left")
        for s in r.steps:  # a failure's message is printed once, on stderr, below
            t.add_row(s.name, s.kind, s.status, s.output or "-", f"{s.seconds:.1f}")
        console().print(t)

    render("run", result, as_json=json_out, quiet=quiet, human=human)
    failed = [s for s in result.steps if s.status == "failed"]
    if failed:  # on stderr with --json too: stdout holds the document, stderr says what went wrong
        say_error(failed[0].message, failed[0].hint)
        raise typer.Exit(failed[0].exit_code)


def register(app: typer.Typer) -> None:
    app.command("run", epilog=EPILOG)(run)
