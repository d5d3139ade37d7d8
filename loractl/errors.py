"""The one exception hierarchy. Each class knows the exit code the CLI maps it to.

0 success, 1 a check failed, 2 usage or input error, 3 internal error (a bug).
"""

from __future__ import annotations

import re

#: options that are switches: in the library they are ``name=True`` (``--no-receipt``: ``receipt=False``)
_SWITCHES = {
    "force": "force=True",
    "allow-partial": "allow_partial=True",
    "allow-pickle": "allow_pickle=True",
    "strict": "strict=True",
    "nested": "nested=True",
    "normalize": "normalize=True",
    "grid": "grid=True",
    "no-receipt": "receipt=False",
    "dry-run": "dry_run=True",
}
#: options whose keyword is not their name
_KEYWORDS = {"weight": "weights", "set": "vars"}
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-o)(?![\w-])(?: (?P<value>[A-Z][A-Z0-9_]*)\b)?")


def keyword_hint(hint: str) -> str:
    """A hint written for the command line, as a library user reads it: options become keyword
    arguments (``--force`` → ``force=True``, ``--weight`` → ``weights=…``, ``-o`` → ``output=…``).
    A ``loractl ...`` command line quoted in the hint is left as it is."""
    parts = re.split(r"(`?loractl [^;`]*`?)", hint)
    for i in range(0, len(parts), 2):  # the odd parts are command lines
        parts[i] = _OPTION.sub(_keyword, parts[i])
    return "".join(parts)


def _keyword(m: re.Match[str]) -> str:
    opt, value = m[1], m["value"]
    if opt == "-o":
        return "output" + (f" {value}" if value else "")
    name = opt[2:]
    if name in _SWITCHES:
        return _SWITCHES[name] + (f" {value}" if value else "")
    return _KEYWORDS.get(name, name.replace("-", "_")) + "=" + (value or "…")


class LoractlError(Exception):
    """Base class of every error loractl raises on purpose.

    Attributes:
        message: what is wrong, naming the file and the tensor or module.
        cli_hint: what to do, naming command-line options (``--force``), as the CLI prints it.
        hint: the same naming keyword arguments (``force=True``), for library users.
    """

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cli_hint = hint

    @property
    def hint(self) -> str | None:
        return keyword_hint(self.cli_hint) if self.cli_hint else None

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
