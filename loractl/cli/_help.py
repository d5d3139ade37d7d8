"""How ``--help`` (and docs/cli.md, generated from it) shows arguments and options: plain metavars.

typer prints ``Usage: loractl merge [OPTIONS] {base} {adapters}...`` and types such as
``adapters... <list[str]>`` or ``--weight <list[float]>``. loractl's commands use
:class:`Command`, which shows ``Usage: loractl merge [OPTIONS] BASE ADAPTER...``, ``BASE`` and
``ADAPTER...`` in the argument list, and one metavar per option: its own ``metavar=`` if given,
the choices of an enum option (``--dtype auto|bf16|fp16|fp32``), else the name in
:data:`METAVARS` (the same for every command), else the option's name in capitals.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperOption

from ._options import FORMAT_CHOICES

#: the metavar of an option, by parameter name, in every command
METAVARS = {
    "output": "OUT",
    "weight": "W",
    "shard_size": "SIZE",
    "rank": "R",
    "pad_rank": "R",
    "max_rank": "R",
    "count": "N",
    "seed": "N",
    "density": "D",
    "energy": "F",
    "sv_ratio": "P",
    "sv_cumulative": "F",
    "sv_fro": "F",
    "module": "GLOB",
    "plot": "FILE.png",
    "receipt": "FILE",
    "subfolder": "FOLDER",
    "format": FORMAT_CHOICES,
    "to": FORMAT_CHOICES,
}


class _Argument(TyperArgument):
    @property
    def display_name_raw(self) -> str:  # also in click's errors: "Missing argument 'BASE'"
        return self.metavar or (self.name or "").upper()

    def _rich_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _Option(TyperOption):
    def display_type_rich(self, ctx: Any) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if self.type_descriptor.is_choice:
            return self.display_type(ctx).strip("<>")
        name = self.name or ""
        return METAVARS.get(name) or name.upper().replace("_", "-")


class Command(TyperCommand):
    """A typer command whose help shows plain metavars (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:  # typer builds its own parameter objects; give them our display
            if type(p) is TyperArgument:
                p.__class__ = _Argument
            elif type(p) is TyperOption:
                p.__class__ = _Option
