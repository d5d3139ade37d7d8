"""The ``loractl`` command: a thin typer app over :mod:`loractl.api`.

Command modules import torch and the library only inside their bodies, so ``loractl --help`` and
shell completion stay fast.
"""

from __future__ import annotations

import typer

from .. import __version__
from . import check as check_cmd
from . import combine as combine_cmd
from . import convert as convert_cmd
from . import extract as extract_cmd
from . import inspect as inspect_cmd
from . import merge as merge_cmd
from . import run as run_cmd
from . import similarity as similarity_cmd
from . import truncate as truncate_cmd
from . import unmerge as unmerge_cmd
from . import verify as verify_cmd
from ._errors import Group
from ._help import Command

app = typer.Typer(
    name="loractl",
    cls=Group,
    help="Merge, unmerge, inspect, combine, truncate, convert, extract, check and verify LoRA adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loractl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Merge, unmerge, inspect, combine, truncate, convert, extract and check LoRA adapters.

    Exit codes: 0 success, 1 a check failed, 2 usage or input error, 3 internal error.
    """


inspect_cmd.register(app)
merge_cmd.register(app)
unmerge_cmd.register(app)
combine_cmd.register(app)
truncate_cmd.register(app)
similarity_cmd.register(app)
convert_cmd.register(app)
extract_cmd.register(app)
run_cmd.register(app)
check_cmd.register(app)
verify_cmd.register(app)
for _info in app.registered_commands:  # plain metavars in --help: BASE ADAPTER..., --weight W
    _info.cls = Command


def main() -> None:
    """Console-script entry point: :func:`run`, then leave the process with its exit code."""
    _leave(run())


def run() -> object:
    """The console script without leaving the process: defaults from [tool.loractl] / loractl.toml,
    then the command line; returns the exit code (what ``SystemExit`` carried)."""
    import os
    import sys

    # torch's OpenMP threads spin at every barrier by default; on a busy machine that burns the CPU the
    # merge needs (measured: 80-95 s instead of 12-15 s for a 1.1B merge at load 4.5). It must be set
    # before torch is imported, and it changes no result.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from ..errors import LoractlError
    from ._config import default_map, read_defaults
    from ._errors import TERMINATED, Terminated, on_sigterm_clean_up, say_error

    on_sigterm_clean_up()
    try:
        try:
            table, _ = read_defaults()
            cmd = typer.main.get_command(app)
            params = {name: {p.name for p in sub.params if p.name} for name, sub in cmd.commands.items()}  # type: ignore[attr-defined]
            dmap = default_map(table, params) if table else {}
        except LoractlError as e:
            say_error(e.message, e.cli_hint)
            return e.exit_code
        try:
            cmd(prog_name="loractl", default_map=dmap)
        except SystemExit as e:
            return e.code
    except Terminated:  # outside a command's body (parsing options): nothing was under way
        sys.stderr.write(TERMINATED + "\n")
        return 143
    finally:  # the command is over: a SIGTERM now just ends the process
        on_sigterm_clean_up(False)
    return 0


def _leave(code: object) -> None:
    """End the process with ``code``, skipping the interpreter's teardown once torch is loaded.

    Tearing down an interpreter that imported torch takes 0.4-0.6 s on the 2-core machine of
    docs/performance.md: a tenth of a 1.1B merge. By the time a command returns, its files are
    written, synced and renamed and its threads joined, so only the standard streams are left to
    flush; ``os._exit`` then skips the rest. Without torch (``--help``, completion, errors found
    early) the normal exit is fast and is kept.
    """
    import os
    import sys

    from ._errors import quiet_stdout

    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): Python prints it and exits 1
        sys.stderr.write(f"{code}\n")
        code = 1
    if "torch" not in sys.modules:
        raise SystemExit(code)
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # reader went away, as `loractl inspect --json | head`
        quiet_stdout()
        code = code or 141  # as in cli/_errors.py: 128 + SIGPIPE, as cat or git
    try:
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    os._exit(code)
