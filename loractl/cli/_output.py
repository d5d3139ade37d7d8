"""The one output module: every command's result is rendered here as human text, JSON or nothing.

stdout is for data (one JSON document with ``--json``), stderr for people (progress, notes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def to_data(obj: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):  # NaN and ±inf are not JSON
        return None
    return obj


def emit_json(command: str, data: dict[str, Any]) -> None:
    doc = {"schema_version": SCHEMA_VERSION, "command": command, **data}
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def console(stderr: bool = False):  # -> rich.console.Console
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # in a pipe, never cut names to 80 columns: a table is as wide as its content
    width = None if stream.isatty() else 10_000
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def render(command: str, result: Any, *, as_json: bool, quiet: bool, human: Callable[[Any], None]) -> None:
    """Print ``result``: JSON with ``as_json``, nothing with ``quiet``, else ``human(result)``."""
    if as_json:
        emit_json(command, to_data(result))
    elif not quiet:
        human(result)


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


#: a progress bar with size, speed and time left needs this many columns; narrower terminals get
#: the bar and the percentage (or n of m) only
FULL_PROGRESS_WIDTH = 80


def _progress_columns(unit: str, width: int) -> tuple[list[Any], bool]:
    """rich progress columns that fit a terminal ``width`` columns wide, and whether the bar expands.

    From :data:`FULL_PROGRESS_WIDTH` on: description, bar, size done/total (or n/m), speed, time
    left (at most 50 columns beside the bar, which gets the rest, up to 40). Below: description,
    a bar filling the line, and the percentage (or n/m).
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    text = "[progress.description]{task.description}"
    count = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    if width >= FULL_PROGRESS_WIDTH:
        return [text, BarColumn(bar_width=min(40, width - 50)), *count, TimeRemainingColumn()], False
    done = TaskProgressColumn() if unit == "bytes" else MofNCompleteColumn()
    return [text, BarColumn(bar_width=None), done], True


@contextmanager
def progress_bar(
    description: str, *, enabled: bool, unit: str = "bytes"
) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr, only when stderr is a terminal and ``enabled``.

    ``unit``: ``bytes`` (size and speed) or ``items`` (n of m). The bar is drawn from the first
    update on, which carries the total: never a bar of unknown length. It fits the terminal's
    width (see :func:`_progress_columns`).
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    con = console(stderr=True)
    columns, expand = _progress_columns(unit, con.width)
    with Progress(*columns, console=con, transient=True, expand=expand) as bar:
        task = bar.add_task(description, total=None, visible=False)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, visible=True)

        yield update
