"""Turns every error into one clear line on stderr and the contract's exit code.

LoractlError -> its own exit code (2 input/usage, 1 check failed); Ctrl-C -> 130 and SIGTERM
(``timeout``, ``docker stop``, a cancelled CI job) -> 143, both with nothing left behind; stdout
closed by its reader -> 141, quietly (as cat or git); anything else is a bug: exit 3, one line, the
traceback only with LORACTL_DEBUG=1.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ..errors import LoractlError

F = TypeVar("F", bound=Callable[..., Any])


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


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
            _say(f"error: {e.message}")
            if e.cli_hint:
                _say(f"hint: {e.cli_hint}")
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
