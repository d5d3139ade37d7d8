"""The one exception hierarchy. Each class knows the exit code the CLI maps it to.

0 success, 1 a check failed, 2 usage or input error, 3 internal error (a bug).
"""

from __future__ import annotations


class LoractlError(Exception):
    """Base class of every error loractl raises on purpose."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LoractlError):
    """A bad option or a combination of options that makes no sense."""


class InputError(LoractlError):
    """A missing, unreadable, corrupt or unsuitable input file."""


class FormatError(InputError):
    """An input whose layout is not one loractl can read, or is broken."""


class ShapeMismatchError(InputError):
    """An adapter that does not fit the base model it is applied to."""


class UnsupportedAdapterError(InputError):
    """An adapter kind that loractl recognises but will not apply (e.g. LoHa, PiSSA into the original base)."""


class OutputError(LoractlError):
    """An output that may not be written (exists without --force, is an input, disk full...)."""


class NotYetAvailableError(UsageError):
    """A command of the contract whose implementation has not landed yet."""


class CheckFailedError(LoractlError):
    """The command ran and a check failed."""

    exit_code = 1


class Interrupted(LoractlError):
    """Ctrl-C: the run was interrupted; nothing partial was left behind."""

    exit_code = 130
