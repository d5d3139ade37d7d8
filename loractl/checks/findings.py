"""What every rule of ``check`` shares: the :class:`Finding` it returns, the :class:`Context` it reads,
and the result that gathers them."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..formats.gguf import architecture

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..errors import LoractlError
    from ..io.base import BaseModel

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """One thing ``check`` found.

    Attributes:
        code: a stable identifier (``nan-inf``, ``vllm-dora``, ...), for pipelines to match on.
        severity: ``error`` (fails the check), ``warning`` or ``info``.
        module: the adapter module it is about (PEFT name without ``base_model.model.``), if any.
        message: what is wrong, for people; names the file or module.
        fix: a ``loractl`` command line that fixes it (``ADAPTER`` filled in, ``OUT`` to choose), if any.
    """

    code: str
    severity: str
    module: str | None
    message: str
    fix: str | None = None


@dataclass
class CheckResult:
    """What ``check`` found.

    Attributes:
        ok: no finding is an error (with ``strict``: no error and no warning).
        adapter: the adapter path given.
        target: the runtime checked for (``peft``, ``vllm``, ``llama.cpp``, ``lorax``), or None.
        findings: every finding, errors first, in the order the rules ran.
        strict: warnings fail the check too.
    """

    ok: bool
    adapter: str
    target: str | None
    findings: list[Finding] = field(default_factory=list)
    strict: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def failures(self) -> list[Finding]:
        """The findings that make ``ok`` False: errors, and with ``strict`` warnings too."""
        failing = ("error", "warning") if self.strict else ("error",)
        return [f for f in self.findings if f.severity in failing]


@dataclass
class Context:
    """What the rules read: the adapter, the base (if given) and how the user named them."""

    path: str  # as given (for fix command lines)
    adapter: Adapter
    base: BaseModel | None
    base_arg: str | None
    alpha: float | None = None  # --alpha given, repeated in fix command lines

    @property
    def arch(self) -> str | None:
        """``config.json``'s ``architectures[0]`` of the base, or None."""
        if self.base is None:
            return None
        return architecture(self.base.config, text_first=False)

    def cmd(self, *args: str) -> str:
        """A ``loractl`` command line on this adapter: ``loractl VERB ADAPTER args...``."""
        verb, *rest = args
        alpha = ["--alpha", repr(self.alpha)] if self.alpha is not None else []
        return " ".join(["loractl", verb, shlex.quote(self.path), *alpha, *rest])

    @property
    def base_for_cmd(self) -> str:
        return shlex.quote(self.base_arg) if self.base_arg is not None else "BASE"

    @property
    def source(self) -> str:
        """The adapter's weights file (or its path), as messages name it."""
        a = self.adapter
        return str(a.files[0]) if a.files else str(a.path)


#: a rule: the findings of one question about the adapter
Rule = Callable[[Context], list[Finding]]


def leaf(name: str) -> str:
    """The last component of a module name (``q_proj`` of ``model.layers.0.self_attn.q_proj``)."""
    return name.rsplit(".", 1)[-1]


def few(names: list[str], n: int = 3) -> str:
    """The first ``n`` names quoted, and how many more."""
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def text(e: LoractlError) -> str:
    """An error's message with its hint, as one finding's message."""
    return f"{e.message} ({e.cli_hint})" if e.cli_hint else e.message
