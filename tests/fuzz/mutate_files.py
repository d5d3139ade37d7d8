"""Which files of a case each family mutates, and the file-kind family: a file replaced by an
empty one, a folder, a FIFO (a read blocks), a symlink (dangling, to itself, to /dev/zero or
/dev/urandom, to another input), or deleted; a folder replaced by a file or emptied."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

ST_FILES = {
    "base": ["base/model-00001-of-00002.safetensors", "base/model-00002-of-00002.safetensors"],
    "base.safetensors": ["base.safetensors"],
    "lora": ["lora/adapter_model.safetensors"],
    "lora2": ["lora2/adapter_model.safetensors"],
    "kohya.safetensors": ["kohya.safetensors"],
    "loralib.safetensors": ["loralib.safetensors"],
    "merged": ["merged/model-00001-of-00002.safetensors", "merged/model-00002-of-00002.safetensors",
               "merged/loractl.receipt"],
    "merged.safetensors": ["merged.safetensors", "merged.safetensors.loractl.receipt"],
}  # fmt: skip
CONFIGS = {"lora": ["lora/adapter_config.json"], "lora2": ["lora2/adapter_config.json"]}
BASE_CONFIGS = {"base": ["base/config.json"], "merged": ["merged/config.json"]}
INDEXES = {"base": ["base/model.safetensors.index.json"], "merged": ["merged/model.safetensors.index.json"]}
GGUF = {"lora.gguf": ["lora.gguf"]}
OTHER = {"base": ["base/tokenizer.json", "base/generation_config.json"], "merged": ["merged/tokenizer.json"]}
DIRS = {"base": ["base"], "lora": ["lora"], "lora2": ["lora2"], "merged": ["merged"]}


def all_files() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for table in (ST_FILES, CONFIGS, BASE_CONFIGS, INDEXES, GGUF, OTHER, {"recipe.toml": ["recipe.toml"]}):
        for obj, files in table.items():
            out.setdefault(obj, []).extend(files)
    return out


def _remove(p: Path) -> bool:
    """Remove whatever is at ``p``; False if its folder is gone (an earlier mutation replaced it)."""
    if not p.parent.is_dir() or p.parent.is_symlink():
        return False
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    return True


def kind(rng: random.Random, case: Path, obj: str) -> tuple[str, str, str] | None:
    """Replace a file (or folder) of ``obj``; returns (kind, the path, detail), or None if an earlier
    mutation left nothing to replace."""
    if obj in DIRS and rng.random() < 0.2:
        rel = DIRS[obj][0]
        p = case / rel
        what = rng.choice(["dir-as-file", "dir-empty", "dir-deleted", "dir-symlink-loop"])
        if not _remove(p):
            return None
        if what == "dir-as-file":
            p.write_bytes(b"{}")
        elif what == "dir-empty":
            p.mkdir()
        elif what == "dir-symlink-loop":
            os.symlink(p.name, p)
        return what, rel, ""
    rel = rng.choice(all_files()[obj])
    p = case / rel
    what = rng.choice(["empty", "folder", "fifo", "dangling-symlink", "symlink-loop", "dev-zero", "dev-urandom",
                       "deleted", "deleted", "symlink-other"])  # fmt: skip
    if not _remove(p):
        return None
    detail = ""
    if what == "empty":
        p.write_bytes(b"")
    elif what == "folder":
        p.mkdir()
    elif what == "fifo":
        os.mkfifo(p)
    elif what == "dangling-symlink":
        os.symlink("no-such-file", p)
    elif what == "symlink-loop":
        os.symlink(p.name, p)
    elif what == "dev-zero":
        os.symlink("/dev/zero", p)
    elif what == "dev-urandom":
        os.symlink("/dev/urandom", p)
    elif what == "symlink-other":
        target = rng.choice([f for files in all_files().values() for f in files if f != rel])
        os.symlink(os.path.relpath(case / target, p.parent), p)
        detail = f"-> {target}"
    return what, rel, detail
