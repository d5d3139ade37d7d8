"""A model written in its base's layout: which tensors go to which file (the base's shards, or new ones
of a given size), the index, the permission bits, and the files of the folder that are not weights.

Nothing here computes a tensor: :mod:`loractl.io.stream` writes the files this module lays out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .atomic import copy_file
from .safetensors import FLOAT_DTYPES, dtype_nbytes

if TYPE_CHECKING:  # pragma: no cover
    from .base import BaseModel

#: ``--dtype`` choices -> the safetensors dtype written (None: the base's own)
DTYPES = {"auto": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.I)


def parse_size(text: str) -> int:
    """``5GB`` (decimal, as transformers), ``2GiB``, ``500MB`` or a byte count.

    Raises:
        UsageError: not a size, or not positive.
    """
    m = SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot read size {text!r}", hint="use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    num, unit = float(m[1]), m[2].upper()
    power = "BKMGT".index(unit[0]) if unit and unit[0] in "KMGT" else 0
    base = 1024 if "I" in unit else 1000
    size = int(num * base**power)
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


@dataclass
class OutTensor:
    """One tensor of the output: its name, the base shard it comes from, the dtype and shape written."""

    name: str
    src: int  # shard number in the source
    dtype: str  # dtype name written
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return dtype_nbytes(self.dtype, self.shape)


#: the output's files in order, each with its tensors in order
Files = list[tuple[str, list[OutTensor]]]


def shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def layout(base: BaseModel, out_dtype: str | None, shard_size: int | None, *, keep_quantized: bool = False) -> Files:
    """Output file names and their tensors: the base's own layout, or re-sharded to ``shard_size``.

    Quantized weights (:attr:`BaseModel.quantized`) are written dequantized (``out_dtype``, default
    each weight's :attr:`~loractl.io.quantized.QuantizedTensor.merge_dtype`) with their real shape,
    and their quantization statistics are left out; with ``keep_quantized`` they keep their stored dtype
    and shape, and their statistics (scales) stay.

    Raises:
        UsageError: ``shard_size`` for a single-file base.
    """
    from .quantized import aux_keys

    quantized = base.quantized
    aux = aux_keys(quantized)
    files: Files = []
    for i, s in enumerate(base.shards):
        items = []
        for info in s.tensors.values():  # in file order
            if keep_quantized and (info.name in aux or info.name in quantized):
                items.append(OutTensor(info.name, i, info.dtype, info.shape))
                continue
            if info.name in aux:
                continue
            if info.name in quantized:
                q = quantized[info.name]
                items.append(OutTensor(info.name, i, out_dtype or q.merge_dtype, tuple(q.shape)))
                continue
            dt = out_dtype if (out_dtype and info.dtype in FLOAT_DTYPES) else info.dtype
            items.append(OutTensor(info.name, i, dt, info.shape))
        files.append((s.path.name, items))
    if shard_size is None:
        return files
    if not base.is_dir:
        raise UsageError("--shard-size needs a base folder (a single-file base is written as one file)")
    return reshard(files, "diffusion_pytorch_model" if base.shards[0].path.name.startswith("diffusion_pytorch_model") else "model", shard_size)


def reshard(files: Files, stem: str, shard_size: int) -> Files:
    """The same tensors in order, in new files of at most ``shard_size`` bytes (a larger tensor alone)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for _, items in files:
        for t in items:
            if groups[-1] and size + t.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    return [(shard_name(stem, i, len(groups)), g) for i, g in enumerate(groups)]


def write_index(folder: Path, base: BaseModel, files: Files, extra: dict[str, Any], mode: int) -> None:
    """The index of a sharded output (none for one file from a base without one): the base's index
    metadata with the new ``total_size`` and ``extra``, keeping the base index's permission bits."""
    if len(files) == 1 and base.index_name is None:
        return
    name = base.index_name or "model.safetensors.index.json"
    meta = dict(base.index_metadata)
    meta["total_size"] = sum(t.nbytes for _, items in files for t in items)
    meta.update(extra)
    weight_map = {t.name: fname for fname, items in files for t in items}
    (folder / name).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n")
    os.chmod(folder / name, mode_of(base.path / name) if base.index_name else mode)


def mode_of(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def shard_mode(base: BaseModel) -> int:
    """The permission bits the output's weight files (and receipt) get: the base's shards' (the
    strictest of them, should they differ), so a 0600 base does not become a 0644 merged model."""
    mode = 0o777
    for s in base.shards:
        mode &= mode_of(s.path)
    return mode


def copy_other_files(base: BaseModel, folder: Path, config: dict[str, Any] | None = None) -> None:
    """Copy the files of the base folder that a model folder needs (io.base.COPIED_NAMES), each with
    its own permission bits; a link inside the folder is copied as the file it points to, one pointing
    outside is never followed (io.base.folder_files). ``config``: the config.json to write instead of
    the base's (a dequantized model's loses its ``quantization_config``: transformers would otherwise
    load the bf16 weights as quantized layers)."""
    os.chmod(folder, mode_of(base.path) | 0o700)
    for rel, src in base.files.copied.items():
        dst = folder / rel
        if not dst.parent.exists():
            dst.parent.mkdir(parents=True)
            os.chmod(dst.parent, mode_of(src.parent) | 0o700)
        if config is not None and rel.as_posix() == "config.json":
            dst.write_text(json.dumps(config, indent=2) + "\n")
            os.chmod(dst, mode_of(src))
        else:
            copy_file(src, dst)


def copy_notes(base: BaseModel, output: Path) -> list[str]:
    """What the output's folder does not get from the base folder, and why."""
    notes = []
    if base.files.links_out:
        notes.append(
            f"not copied to {output}: {', '.join(base.files.links_out)}: a link to outside {base.path} "
            "(never followed)"
        )
    left = base.files.left_out
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        notes.append(f"not copied to {output} (not part of a model folder; see docs/merge.md): {shown}")
    return notes
