"""loractl: manage LoRA adapters -- merge, unmerge, inspect, combine, truncate, convert, check.

The public library API lives in :mod:`loractl.api`; this module re-exports it lazily so that
``import loractl`` (and the CLI's ``--help``) stays cheap and does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_adapter", "merge", "unmerge", "inspect"]


def __getattr__(name: str):  # PEP 562: import the heavy API only when used
    if name in {"load_adapter", "merge", "unmerge", "inspect"}:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
