"""What produced an output: the adapters it was made from (path, sha256, weight, format) and the
``loractl.*`` metadata written into every safetensors file loractl makes (CLI.md: "Written
safetensors carry metadata saying what produced them ..., keeping the inputs' own metadata")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .io.safetensors import SafetensorsFile


@dataclass
class AdapterRef:
    """One adapter an output was made from.

    Attributes:
        path: as it was given.
        sha256: of its files (weights, then config), see :func:`file_sha256`.
        weight: its merge weight (1 where weights do not apply).
        format: the format it was read as.
    """

    path: str
    sha256: str
    weight: float
    format: str


def file_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of ``paths`` in order (an adapter's weights then its config)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def refs(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> list[AdapterRef]:
    """The references of ``adapters`` with their weights (1 each when none are given)."""
    ws = list(weights) if weights is not None else [1.0] * len(adapters)
    return [AdapterRef(str(a.path), file_sha256(a.files), w, a.format) for a, w in zip(adapters, ws)]


def metadata(operation: str, sources: Sequence[AdapterRef], keep: Mapping[str, str] | None = None) -> dict[str, str]:
    """``keep`` (an input's own header metadata) without its ``loractl.*`` keys, plus loractl's version,
    the operation and each source adapter's path, sha256 and weight."""
    meta = {k: v for k, v in (keep or {}).items() if not k.startswith("loractl.")}
    meta["loractl.version"] = __version__
    meta["loractl.operation"] = operation
    meta["loractl.adapters"] = json.dumps(
        [{"path": r.path, "sha256": r.sha256, "weight": r.weight} for r in sources], separators=(",", ":")
    )
    return meta


def check_merge_record(shards: Sequence[SafetensorsFile], path: Path, sources: Sequence[AdapterRef]) -> list[str]:
    """Check the merge record loractl writes in every shard it merges (``loractl.operation`` and the
    sha256 and weight of each adapter) against the adapters to unmerge: the honest signal, read from
    headers only, that an unmerge without receipt is undoing the right merge.

    Args:
        shards: the merged model's safetensors files.
        path: the merged model, for messages.
        sources: the adapters to unmerge, in order, with their weights.

    Returns:
        Warnings when the model holds no record of a loractl merge (merged by another tool, or never
        merged: subtraction then cannot be checked).

    Raises:
        InputError: the record names other adapters or weights.
    """
    from .errors import InputError

    ops = {s.metadata.get("loractl.operation") for s in shards}
    got = [(r.sha256, r.weight) for r in sources]
    for s in shards:
        meta = s.metadata
        if meta.get("loractl.operation") != "merge":
            continue
        try:
            recorded = json.loads(meta.get("loractl.adapters", "[]"))
            want = [(str(r["sha256"]), float(r["weight"])) for r in recorded]
        except (ValueError, TypeError, KeyError):
            raise InputError(f"{s.path}: its loractl.adapters metadata is not readable") from None
        if got != want:
            names = ", ".join(f"{Path(str(r.get('path', '?'))).name} ×{r.get('weight')}" for r in recorded)
            raise InputError(
                f"{s.path}: was merged by loractl with other adapters or weights ({names})",
                hint="give the same adapters and --weight values, in the same order, as the merge",
            )
    if "merge" in ops:
        return []
    if "unmerge" in ops:
        why = "was written by loractl unmerge: the adapters it names are already removed"
    else:
        why = "holds no loractl merge record (merged by another tool, or never merged)"
    return [
        f"{path} {why}; that these adapters are merged into it cannot be checked: the output is "
        f"{path} minus their updates"
    ]
