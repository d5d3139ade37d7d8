"""Reading an operation's inputs the same way in every command: one builder of reader options, one
gate on what an adapter may hold, the forms arguments may take (one path or a list, one weight or a
list), and the paths no output may touch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter
from .errors import InputError, UsageError
from .formats import ReadOptions

if TYPE_CHECKING:  # pragma: no cover
    from .io.base import BaseModel

#: one adapter or several: a path, a loaded :class:`Adapter`, or a sequence of them
Adapters = str | Path | Adapter | Sequence[str | Path | Adapter]
#: one merge weight or one per adapter
Weights = float | Sequence[float] | None


def read_options(base: BaseModel | None = None, **options: Any) -> ReadOptions:
    """Reader options for every adapter of one operation: ``options`` as :class:`ReadOptions` takes
    them, and, with a ``base``, its tensor names and config (kohya names resolve against them, GGUF
    needs the architecture)."""
    opts = ReadOptions(**options)
    if base is not None:
        opts.base_keys = list(base.tensors)
        opts.base_config = base.config
    return opts


def load_adapter(
    path: str | Path,
    format: str | None = None,
    allow_pickle: bool = False,
    options: ReadOptions | None = None,
) -> Adapter:
    """Read an adapter in any supported layout, refusing one whose tensors hold NaN or Inf.

    Args:
        path: a PEFT folder, a weights file or a Hub reference.
        format: force a format instead of detecting it.
        allow_pickle: accept pickle files (read with ``torch.load(weights_only=True)``).
        options: reader options (base names for kohya, rank/alpha for loralib...); ``allow_pickle``
            is added to them.

    Raises:
        InputError: missing, unreadable, corrupt or non-finite adapter.
    """
    from .formats import load_adapter as read

    options = options or ReadOptions()
    options.allow_pickle = options.allow_pickle or allow_pickle
    adapter = read(path, format=format, options=options)
    bad = adapter.nonfinite()
    if bad:
        source = adapter.files[0] if adapter.files else adapter.path
        first = bad[0]
        saved = first.tensor in adapter.modules_to_save
        what = f"tensor {first.tensor!r}" if saved else f"module {first.module!r} tensor {first.tensor}"
        raise InputError(
            f"{source}: {what} holds {first.nan + first.inf} NaN/Inf values",
            hint="the adapter is broken (diverged training?); it cannot be used",
        )
    return adapter


def load_adapters(adapters: Adapters, format: str | None, options: ReadOptions) -> list[Adapter]:
    """Every adapter of ``adapters`` (paths read with ``options``, loaded ones kept as they are)."""
    return [a if isinstance(a, Adapter) else load_adapter(a, format=format, options=options) for a in as_list(adapters)]


def as_list(items: Any) -> list[Any]:
    """One item (a path or an :class:`Adapter`) or a sequence of them, as a list: a lone string is one
    path, not a sequence of characters."""
    if isinstance(items, (str, Path, Adapter)):
        return [items]
    return list(items)


def weights_for(weights: Weights, n: int) -> list[float]:
    """One merge weight per adapter: all 1 when none is given, a lone number for a lone adapter.

    Raises:
        UsageError: a count that is not the adapters', or a weight that is not a finite number.
    """
    if weights is None or (not isinstance(weights, (int, float)) and len(weights) == 0):
        return [1.0] * n
    given = [weights] if isinstance(weights, (int, float)) else list(weights)
    if len(given) != n:
        raise UsageError(f"{len(given)} --weight values for {n} adapters", hint="give one --weight per adapter")
    for w in given:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise UsageError(f"--weight {w!r} is not a finite number")
    return [float(w) for w in given]


def protected_paths(
    *, base: BaseModel | None = None, adapters: Sequence[Adapter] = (), also: Sequence[str | Path | None] = ()
) -> list[Path]:
    """Every path an operation reads, which no output may be, contain or lie inside, with or without
    ``force`` (:func:`loractl.io.atomic.check_output`): the base (its folder or file and its weight
    files), each adapter as given and the files it was read from (a PEFT adapter given as a file
    was read with the ``adapter_config.json`` beside it), and ``also`` (a receipt read, a base given
    only for names). A recipe's own file is added by :func:`loractl.io.atomic.protecting`."""
    out: list[Path] = []
    if base is not None:
        out += [base.path, *(s.path for s in base.shards)]
    for a in adapters:
        out += [Path(a.path), *a.files]
    out += [Path(p) for p in also if p is not None]
    return out
