"""Commands of the contract whose implementation has not landed yet: they say so and exit 2."""

from __future__ import annotations

import typer

from ._errors import handled

PENDING = {
    "check": "A CI gate: integrity, NaN/Inf, shapes, coverage, and what a serving runtime accepts.",
}


def _make(name: str):
    @handled
    def command(ctx: typer.Context) -> None:
        from ..errors import NotYetAvailableError

        raise NotYetAvailableError(f"loractl {name} is not yet available in this version")

    command.__doc__ = f"{PENDING[name]} (not yet available: exits 2)"
    return command


def register(app: typer.Typer) -> None:
    for name in PENDING:
        app.command(
            name,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            epilog="Not yet available in this version.",
        )(_make(name))
