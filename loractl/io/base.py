"""Base models on disk: a transformers or diffusers folder (one file, or shards + index), or one file.

Only headers are read here; tensors are read one at a time by the operations that need them.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, InputError
from .files import read_json
from .hub import WEIGHT_SUFFIXES, is_hub_ref, resolve_base
from .names import INDEX_NAMES, SINGLE_NAMES
from .safetensors import SafetensorsFile, TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    from .quantized import QuantizedTensor

RECEIPT_NAME = "loractl.receipt"
#: the longest file name (in bytes) a shard may have: NAME_MAX of common filesystems
MAX_NAME_BYTES = 255

#: The files of a base folder that merge copies beside the weights: what transformers and diffusers
#: save with a model (configs, tokenizer and processor files, chat templates, the model's own code
#: for ``trust_remote_code``, card and licence). Names are matched in lower case; docs/merge.md
#: lists them. Nothing else is copied: no other weights (``pytorch_model.bin`` holds the *unmerged*
#: model), no hidden files or folders (``.git``, ``.cache``), nothing unknown.
COPIED_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "tekken.json",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "audio_tokenizer_config.json",
        "chat_template.json",
        "chat_template.jinja",
        "readme.md",
        "use_policy.md",
    }
)
COPIED_PATTERNS = (
    "vocab.*",  # vocab.json, vocab.txt
    "tokenizer.*",  # tokenizer.model, tokenizer.model.v3
    "*.model",  # sentencepiece: spiece.model, sentencepiece.bpe.model...
    "*.tiktoken",
    "*.spm",
    "*.py",  # configuration_*.py, modeling_*.py, tokenization_*.py of trust_remote_code models
    "license*",
    "licence*",
    "notice*",
)
#: folders copied, with the files copied from them
COPIED_FOLDERS = {"additional_chat_templates": ("*.jinja",)}


def is_copied(
    name: str, patterns: tuple[str, ...] = COPIED_PATTERNS, names: frozenset[str] = COPIED_NAMES
) -> bool:
    """Is ``name`` (a file directly in a base folder) one merge copies? Never weights or hidden files."""

    low = name.lower()
    if low.startswith(".") or low.endswith(WEIGHT_SUFFIXES):
        return False
    return low in names or any(fnmatch.fnmatchcase(low, p) for p in patterns)


def link_root(folder: Path) -> Path:
    """The folder a link in ``folder`` may point into and still be copied: ``folder`` itself, or, for a
    snapshot of the Hugging Face cache (``models--org--name/snapshots/<rev>/``), the repo's folder,
    whose ``blobs/`` hold every file the snapshot links to."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


@dataclass
class FolderFiles:
    """What a base folder holds besides its weights, sorted into what merge copies and what it leaves out.

    Attributes:
        copied: relative paths to copy, each with the real file its bytes are read from (a link
            inside the folder is copied as the file it points to, so the output stands alone).
        left_out: names not copied (not on the list; hidden names are not mentioned).
        links_out: names that are links pointing outside the folder: skipped, their target never read.
    """

    copied: dict[Path, Path] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    links_out: list[str] = field(default_factory=list)


def _sort_entry(root: Path, path: Path, rel: Path, out: FolderFiles) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(path))
        if root != real and root not in real.parents:
            out.links_out.append(rel.as_posix())
            return
        try:
            st = os.stat(real)
        except OSError:
            out.left_out.append(rel.as_posix())
            return
        path = real
    if not stat.S_ISREG(st.st_mode):  # a folder, a fifo, a device
        out.left_out.append(rel.as_posix() + ("/" if stat.S_ISDIR(st.st_mode) else ""))
        return
    out.copied[rel] = path


def folder_files(folder: Path, skip: set[str]) -> FolderFiles:
    """Sort the files of a base folder (but the ``skip`` names: weights, index, receipt) by :func:`is_copied`."""
    root = link_root(folder)
    out = FolderFiles()
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name in skip:
            continue
        path = folder / name
        if name in COPIED_FOLDERS and path.is_dir():
            real = Path(os.path.realpath(path))
            if root != real and root not in real.parents:
                out.links_out.append(name + "/")
                continue
            for sub in sorted(os.listdir(real)):
                if sub.startswith("."):
                    continue
                if is_copied(sub, COPIED_FOLDERS[name], frozenset()):
                    _sort_entry(root, real / sub, Path(name) / sub, out)
                else:
                    out.left_out.append(f"{name}/{sub}")
            continue
        if is_copied(name):
            _sort_entry(root, path, Path(name), out)
        else:
            out.left_out.append(name + ("/" if path.is_dir() else ""))
    return out


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
        other_files: the files merge copies (see :data:`COPIED_NAMES`), relative paths.
        files: those files with the real file each is read from, and what is left out (:class:`FolderFiles`).
    """

    path: Path
    shards: list[SafetensorsFile]
    index_name: str | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[int, TensorInfo]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    other_files: list[Path] = field(default_factory=list)
    files: FolderFiles = field(default_factory=FolderFiles)

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def parameters(self) -> int:
        return sum(info.numel for _, info in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    @cached_property
    def quantized(self) -> dict[str, QuantizedTensor]:
        """The weights stored quantized (bitsandbytes 4-bit, FP8 with scales), by weight name; found
        and checked once (:func:`loractl.io.quantized.find`)."""
        from .quantized import find

        return find(self)

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


def read_index(idx: Path) -> tuple[list[str], dict[str, Any]]:
    """The shard names an index lists (in order of first mention) and its ``metadata``.

    A shard must be named by a plain file name in the index's folder that ends in ``.safetensors``
    (as transformers and diffusers write them): no folder part, no ``..``, no absolute path, never
    loractl's own receipt, at most :data:`MAX_NAME_BYTES` bytes.

    Raises:
        InputError: the index is not a readable regular file.
        FormatError: not JSON, no ``weight_map`` object of shard names, ``metadata`` not an object, or
            a shard name that is not a plain ``.safetensors`` file name.
    """
    index = read_json(idx, "safetensors index")
    if not isinstance(index, dict):
        raise FormatError(f"{idx}: not a safetensors index (not a JSON object)")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        what = "missing" if "weight_map" not in index else f"{type(weight_map).__name__}, not an object"
        raise FormatError(f"{idx}: not a valid safetensors index (weight_map is {what})")
    if not weight_map:
        raise FormatError(f"{idx}: weight_map lists no tensors")
    metadata = index.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise FormatError(f"{idx}: metadata is {type(metadata).__name__}, not an object")
    for tensor, shard in weight_map.items():
        problem = _shard_name_problem(shard)
        if problem:
            raise FormatError(
                f"{idx}: weight_map[{tensor!r}] {problem}",
                hint="an index names shards by file name in its own folder (model-00001-of-00002.safetensors)",
            )
    return list(dict.fromkeys(weight_map.values())), dict(metadata)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _shard_name_problem(shard: object) -> str | None:
    """What is wrong with a shard name of an index (the end of a sentence), or None."""
    if not isinstance(shard, str):
        return f"is {'null' if shard is None else type(shard).__name__}, not a shard file name"
    if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
        return f"= {_short(shard)} is not a plain file name in the index's folder"
    if len(shard.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is a shard name of {len(shard)} characters, longer than a file name may be"
    if shard == RECEIPT_NAME:
        return f"= {shard!r} is loractl's receipt, not a shard"
    if not shard.endswith(".safetensors"):
        return f"= {_short(shard)} is not a .safetensors file"
    return None


#: files only a LoRA adapter folder holds
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "pytorch_lora_weights.safetensors",
)
#: key fragments that only LoRA factors have
_LORA_FRAGMENTS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_down.",
    ".lora_up.",
    ".lora.down.",
    ".lora.up.",
    "lora_embedding_A",
    "lora_embedding_B",
    ".lora_magnitude_vector",
    ".alpha",
)


def looks_like_base(folder: Path) -> bool:
    """Does ``folder`` hold a base model (an index or model weights, and no adapter files)?"""
    if any((folder / n).exists() for n in ADAPTER_FILES):
        return False
    return any((folder / n).exists() for n in (*INDEX_NAMES, *SINGLE_NAMES))


def _not_an_adapter(path: Path) -> None:
    """Refuse an adapter given where a base model is expected (the arguments swapped)."""
    found = [n for n in ADAPTER_FILES if (path / n).exists()] if path.is_dir() else []
    if found:
        raise InputError(
            f"{path}: is a LoRA adapter ({found[0]}), not a base model",
            hint="were the arguments swapped? the model comes first, then the adapters (loractl merge BASE ADAPTER -o OUT)",
        )


def _weights_in(folder: Path) -> tuple[list[Path], str | None, dict[str, Any]]:
    _not_an_adapter(folder)
    for name in INDEX_NAMES:
        idx = folder / name
        if idx.exists():
            shards, metadata = read_index(idx)
            for s in shards:
                if not (folder / s).exists():
                    raise InputError(f"{idx}: lists shard {s} which is missing from {folder}")
            return [folder / s for s in shards], name, metadata
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
    elif path.suffix == ".json":
        raise InputError(
            f"{path}: is a JSON file, not model weights",
            hint=f"pass the folder that holds the model ({path.parent}), or its .safetensors file",
        )
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
    if base.tensors and all(any(f in name for f in _LORA_FRAGMENTS) for name in base.tensors):
        base.close()
        raise InputError(
            f"{path}: holds only LoRA factors ({next(iter(base.tensors))!r}): an adapter, not a base model",
            hint="were the arguments swapped? the model comes first, then the adapters (loractl merge BASE ADAPTER -o OUT)",
        )
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.exists():
            try:
                config = read_json(cfg, "config.json")
                if not isinstance(config, dict):
                    raise FormatError(f"{cfg}: not a JSON object")
            except BaseException:
                base.close()
                raise
            base.config = config
        skip = {p.name for p in shard_paths} | {index_name or "", RECEIPT_NAME}
        base.files = folder_files(path, skip)
        base.other_files = sorted(base.files.copied)
    return base
