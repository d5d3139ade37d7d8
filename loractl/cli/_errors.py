"""Turns every error into one clear line on stderr and the contract's exit code.

LoractlError -> its own exit code (2 input/usage, 1 check failed); Ctrl-C -> 130 with nothing
left behind; stdout closed by its reader -> 141, quietly (as cat or git); anything else is a bug:
exit 3, one line, the traceback only with LORACTL_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ..errors import LoractlError

F = TypeVar("F", bound=Callable[..., Any])


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


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
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except LoractlError as e:
            _say(f"error: {e.message}")
            if e.hint:
                _say(f"hint: {e.hint}")
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            # the reader of stdout went away (`loractl inspect --json | head`): not an error of
            # loractl's; be quiet and exit as cat or git do, 128 + SIGPIPE.
            quiet_stdout()
            raise typer.Exit(141) from None
        except KeyboardInterrupt:
            _say("interrupted: nothing was written, the inputs are untouched")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug
            if os.environ.get("LORACTL_DEBUG") == "1":
                traceback.print_exc()
            _say(
                f"internal error (a bug in loractl): {type(e).__name__}: {e}; set LORACTL_DEBUG=1 for the traceback"
            )
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]
