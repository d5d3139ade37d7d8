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
    strict: bool = typer.Option(
        False, "--strict", help="Fail on warnings too (an untrained module, patterns a runtime ignores...)."
    ),
    format: str = opt.FORMAT,
    allow_pickle: bool = opt.ALLOW_PICKLE,
    alpha: float = opt.ALPHA,
    json_out: bool = opt.JSON,
    quiet: bool = opt.QUIET,
) -> None:
    """Check an adapter: integrity, NaN/Inf, all-zero modules, shapes and coverage, and what the target accepts.

    Exit 1 with every finding listed when any finding is an error (with --strict: or a warning); 0 otherwise.
    """
    from .. import api

    result = api.check(
        adapter,
        base=base,
        target=target.value if target else None,
        max_rank=max_rank,
        format=format,
        allow_pickle=allow_pickle,
        strict=strict,
        alpha=alpha,
    )

    def human(r) -> None:  # r: checks.CheckResult
        c = console()
        if not r.findings:
            c.print(f"ok: {r.adapter}: no findings" + (f" for {r.target}" if r.target else ""))
            return
        c.print(findings_table(r.findings, c.width))
        errors = sum(f.severity == "error" for f in r.findings)
        warnings = sum(f.severity == "warning" for f in r.findings)
        c.print(
            f"{'ok' if r.ok else 'FAILED'}: {r.adapter}: {errors} error(s), {warnings} warning(s), "
            f"{len(r.findings) - errors - warnings} other finding(s)"
            + (" (--strict: warnings fail)" if r.strict else "")
        )

    render("check", result, as_json=json_out, quiet=quiet, human=human)
    if not result.ok:
        raise typer.Exit(1)


#: the narrowest the message column of the findings table may get before the findings are listed
#: one below the other instead
MESSAGE_MIN_WIDTH = 24


def findings_table(findings, width: int):  # -> rich renderable
    """The findings as a table whose module names and fix commands are never cut or wrapped: the
    message column wraps. When the terminal is too narrow for that, one block per finding:
    ``severity  code  module`` (the module on a line of its own if need be), the message wrapped
    below it, and ``fix: ...``, each whole on its own line."""
    import textwrap

    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    cols = {
        "severity": [f.severity for f in findings],
        "code": [f.code for f in findings],
        "module": [f.module or "-" for f in findings],
        "fix": [f.fix or "" for f in findings],
    }
    whole = sum(max(len(c), *map(len, v)) for c, v in cols.items())
    if whole + MESSAGE_MIN_WIDTH + 3 * len(cols) + 1 <= width:  # 3: padding and rule of each column
        t = Table(show_edge=False)
        for col in ("severity", "code", "module", "message", "fix"):
            if col == "message":
                t.add_column(col, ratio=1, min_width=MESSAGE_MIN_WIDTH)
            else:
                t.add_column(col, no_wrap=True, min_width=max(len(col), *map(len, cols[col])))
        for f in findings:  # Text: no rich markup in messages ("[lora_A]" is not a style)
            t.add_row(*map(Text, (f.severity, f.code, f.module or "-", f.message, f.fix or "")))
        return t
    lines: list[str] = []
    for f in findings:
        head = f"{f.severity}  {f.code}"
        if f.module and len(head) + 2 + len(f.module) <= width:
            lines.append(f"{head}  {f.module}")
        else:
            lines += [head] + ([f"    {f.module}"] if f.module else [])
        lines += textwrap.wrap(f.message, width - 4, initial_indent="    ", subsequent_indent="    ")
        if f.fix:
            lines.append(f"    fix: {f.fix}")
    return Group(*(Text(line, no_wrap=True, overflow="ignore") for line in lines))


def register(app: typer.Typer) -> None:
    app.command("check", epilog=EPILOG)(check)
