"""Base models on disk: a transformers or diffusers folder (one file, or shards + index), or one file.

Only headers are read here; tensors are read one at a time by the operations that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputError
from .hub import is_hub_ref, resolve_base
from .names import INDEX_NAMES, SINGLE_NAMES
from .safetensors import SafetensorsFile, TensorInfo

RECEIPT_NAME = "loractl.receipt"


@dataclass
class BaseModel:
    """A base model's weight files and headers.

    Attributes:
        path: the folder or the file given.
        shards: the safetensors files, in order.
        index_name: the index file's name in the folder, if sharded.
        index_metadata: the index's ``metadata`` (``total_size`` is recomputed on write).
        tensors: tensor name -> (shard number, where it lies).
        config: ``config.json`` when present.
        other_files: files of the folder that are not weights (copied by merge), relative paths.
    """

    path: Path
    shards: list[SafetensorsFile]
    index_name: str | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[int, TensorInfo]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    other_files: list[Path] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def parameters(self) -> int:
        return sum(info.numel for _, info in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def file_of(self, name: str) -> SafetensorsFile:
        return self.shards[self.tensors[name][0]]

    def read(self, name: str, out=None):  # -> torch.Tensor
        return self.file_of(name).read(name, out=out)

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> BaseModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _weights_in(folder: Path) -> tuple[list[Path], str | None, dict[str, Any]]:
    for name in INDEX_NAMES:
        idx = folder / name
        if idx.exists():
            try:
                index = json.loads(idx.read_text())
                weight_map = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise FormatError(f"{idx}: not a valid safetensors index (no weight_map)") from None
            shards = list(dict.fromkeys(weight_map.values()))
            for s in shards:
                if not (folder / s).exists():
                    raise InputError(f"{idx}: lists shard {s} which is missing from {folder}")
            return [folder / s for s in shards], name, dict(index.get("metadata") or {})
    for name in SINGLE_NAMES:
        if (folder / name).exists():
            return [folder / name], None, {}
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found, None, {}
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise InputError(
            f"{folder}: holds only pickle weights ({pickles[0]})",
            hint="convert the base to safetensors (transformers: save_pretrained(safe_serialization=True))",
        )
    if found:
        raise InputError(f"{folder}: {len(found)} .safetensors files and no index; which one is the model?")
    raise InputError(f"{folder}: no model weights found (no model.safetensors, index or *.safetensors)")


def open_base(path: str | Path, *, progress: bool = False) -> BaseModel:
    """Open a base model's headers: a local folder or file, or a Hub reference ``org/name[@revision]``
    (downloaded with huggingface_hub: index first, then only the shards it lists).

    Raises:
        InputError: the path is missing or holds no weights; the Hub repo or revision does not exist.
        FormatError: a weights file is corrupt or two shards hold the same tensor.
    """
    if is_hub_ref(path):
        path = resolve_base(path, progress=progress)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder", hint="check the base model path")
    if path.is_dir():
        shard_paths, index_name, index_meta = _weights_in(path)
    else:
        shard_paths, index_name, index_meta = [path], None, {}
    shards: list[SafetensorsFile] = []
    try:
        for p in shard_paths:
            shards.append(SafetensorsFile(p))
    except BaseException:
        for s in shards:
            s.close()
        raise
    base = BaseModel(path=path, shards=shards, index_name=index_name, index_metadata=index_meta)
    for i, s in enumerate(shards):
        for name, info in s.tensors.items():
            if name in base.tensors:
                base.close()
                raise FormatError(
                    f"{s.path}: tensor {name!r} is also in {shards[base.tensors[name][0]].path.name}"
                )
            base.tensors[name] = (i, info)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.exists():
            try:
                base.config = json.loads(cfg.read_text())
            except (OSError, ValueError):
                base.config = {}
        skip = {p.name for p in shard_paths} | {index_name, RECEIPT_NAME}
        base.other_files = sorted(
            p.relative_to(path)
            for p in path.rglob("*")
            if p.is_file() and p.relative_to(path).as_posix() not in skip
        )
    return base
