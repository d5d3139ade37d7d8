"""``loractl check``: a CI gate before an adapter reaches a server."""

from __future__ import annotations

from enum import Enum

import typer

from . import _options as opt
from ._errors import handled
from ._output import console, render

EPILOG = """Examples:

\b
  loractl check adapter/ --base base-model/ --target vllm
  loractl check adapter/ --target lorax --max-rank 64 --json
  loractl check adapter.safetensors --target llama.cpp --base llama/ || exit 1
"""


class Target(str, Enum):
    peft = "peft"
    vllm = "vllm"
    llama_cpp = "llama.cpp"
    lorax = "lorax"


@handled
def check(
    adapter: str = typer.Argument(..., help="The adapter to check."),
    base: str = typer.Option(None, "--base", help="The base model: shapes and module coverage."),
    target: Target = typer.Option(None, "--target", help="The runtime it will be served with."),
    max_rank: int = typer.Option(None, "--max-rank", help="Fail when a module's rank is above this."),
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Check an adapter: integrity, NaN/Inf, all-zero modules, shapes and coverage, and what the target accepts.

    Exit 1 with every finding listed when any finding is an error; 0 otherwise.
    """
    from .. import api

    result = api.check(
        adapter,
        base=base,
        target=target.value if target else None,
        max_rank=max_rank,
        format=format,
        allow_pickle=allow_pickle,
        alpha=alpha,
    )

    def human(r) -> None:  # r: checks.CheckResult
        from rich.table import Table

        c = console()
        if not r.findings:
            c.print(f"ok: {r.adapter}: no findings" + (f" for {r.target}" if r.target else ""))
            return
        t = Table(show_edge=False)
        for col in ("severity", "code", "module", "message", "fix"):
            t.add_column(col)
        for f in r.findings:
            t.add_row(f.severity, f.code, f.module or "-", f.message, f.fix or "")
        c.print(t)
        errors = sum(f.severity == "error" for f in r.findings)
        c.print(
            f"{'FAILED' if errors else 'ok'}: {r.adapter}: {errors} error(s), {len(r.findings) - errors} other finding(s)"
        )

    render("check", result, as_json=json_out, quiet=quiet, human=human)
    if not result.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("check", epilog=EPILOG)(check)
