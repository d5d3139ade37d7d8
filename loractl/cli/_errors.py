"""Turns every error into one clear line on stderr and the contract's exit code.

LoractlError -> its own exit code (2 input/usage, 1 check failed), and so is a usage error of click
(a bad option or value: :class:`Group`); Ctrl-C -> 130 and SIGTERM
(``timeout``, ``docker stop``, a cancelled CI job) -> 143, both with nothing left behind; stdout
closed by its reader -> 141, quietly (as cat or git); anything else is a bug: exit 3, one line, the
traceback only with LORACTL_DEBUG=1. Every line is one line: control characters in a message (a
path holding a newline) are escaped as Python writes them (:func:`one_line`).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import traceback
import unicodedata
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from ..errors import LoractlError

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # older typer: click itself
    from click import exceptions as _click_errors  # type: ignore[no-redef]

_UsageError = _click_errors.UsageError
#: ``loractl`` alone: click prints the help (click >= 8.2 by raising this usage error)
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())

F = TypeVar("F", bound=Callable[..., Any])


#: what may not be printed as it is: control characters, line and paragraph separators, and the
#: surrogates that stand for a file name's bytes that are not UTF-8
_ESCAPED = {"Cc", "Zl", "Zp", "Cs"}


def one_line(text: str) -> str:
    """``text`` with control characters, line separators and undecodable bytes escaped as Python's
    ``repr`` writes them (``\\n``, ``\\x1b``, ``\\udcff``): a path holding a newline can neither
    spread a message over lines nor move the terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _ESCAPED else c for c in text)


def _say(line: str) -> None:
    sys.stderr.write(one_line(line.rstrip()) + "\n")
    sys.stderr.flush()


def say_error(message: str, hint: str | None = None) -> None:
    """``error: MESSAGE`` and ``hint: HINT`` on stderr, each on one line."""
    _say(f"error: {message}")
    if hint:
        _say(f"hint: {hint}")


def _usage_exit(e: Any, command: str) -> typer.Exit:
    """Say click's usage error as loractl says every error: one line and a hint; exit 2."""
    message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
    say_error(message, f"see {e.ctx.command_path if e.ctx else command} --help")
    return typer.Exit(e.exit_code)


class Group(TyperGroup):
    """loractl's command group: a usage error of click (an unknown option or command, a value an
    option refuses, a missing argument) is one line ``error: ...`` and ``hint: see loractl COMMAND
    --help``, exit 2, as every other error is, instead of click's usage block. ``loractl`` alone
    still prints the help."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _NoArgsIsHelp:
            raise
        except _UsageError as e:
            raise _usage_exit(e, "loractl") from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _NoArgsIsHelp:
            raise
        except _UsageError as e:  # click names no context for some (an option's missing value)
            sub = ctx.invoked_subcommand
            raise _usage_exit(e, f"{ctx.command_path} {sub}" if sub else ctx.command_path) from None


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM, so that the clean-up of the output under way runs as for
    Ctrl-C. A BaseException (not a KeyboardInterrupt), so that click does not turn it into "Aborted!"."""


TERMINATED = "terminated (SIGTERM): nothing was written, the inputs are untouched"


def _on_sigterm(signum: int, frame: object) -> None:
    # a second SIGTERM (an impatient supervisor) must not cut the clean-up short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def on_sigterm_clean_up(enable: bool = True) -> None:
    """Turn SIGTERM into :class:`Terminated` in the main thread (where Python runs signal handlers);
    worker threads then finish their tensor and the ``with`` blocks remove the temporaries.
    ``enable=False`` puts back the default (the process just ends)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm if enable else signal.SIG_DFL)


class _NoteHandler(logging.Handler):
    """The library's warnings (``loractl`` logger), e.g. stale temporaries removed, as ``note:`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(f"note: {record.getMessage()}")


def _notes_to_stderr() -> None:
    log = logging.getLogger("loractl")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler(logging.WARNING))
        log.propagate = False


def quiet_stdout() -> None:
    """Point stdout at /dev/null so that nothing more is written to a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def handled(func: F) -> F:
    """Wrap a command body so that errors become one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _notes_to_stderr()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except LoractlError as e:
            say_error(e.message, e.cli_hint)
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            # the reader of stdout went away (`loractl inspect --json | head`): not an error of
            # loractl's; be quiet and exit as cat or git do, 128 + SIGPIPE.
            quiet_stdout()
            raise typer.Exit(141) from None
        except KeyboardInterrupt:
            _say("interrupted: nothing was written, the inputs are untouched")
            raise typer.Exit(130) from None
        except Terminated:
            _say(TERMINATED)
            raise typer.Exit(143) from None
        except Exception as e:  # a bug
            if os.environ.get("LORACTL_DEBUG") == "1":
                traceback.print_exc()
            _say(
                f"internal error (a bug in loractl): {type(e).__name__}: {e}; set LORACTL_DEBUG=1 for the traceback"
            )
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]
