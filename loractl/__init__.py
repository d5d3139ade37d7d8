"""loractl: manage LoRA adapters -- merge, unmerge, inspect, combine, truncate, convert, check.

The public library API lives in :mod:`loractl.api`; this module re-exports it lazily so that
``import loractl`` (and the CLI's ``--help``) stays cheap and does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = (
    "load_adapter",
    "save_adapter",
    "merge",
    "unmerge",
    "inspect",
    "truncate",
    "combine",
    "similarity",
    "amplification",
    "spectrum",
    "convert",
    "check",
    "run",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:  # PEP 562: import the heavy API only when used
    if name in _API or name == "api":
        import loractl.api  # (``from . import api`` asks this function for ``api`` first: a loop)

        api = loractl.api
        return api if name == "api" else getattr(api, name)
    raise AttributeError(name)
