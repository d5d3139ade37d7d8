"""The valid inputs every case starts from, built once per run from examples/ (by loractl itself).

A case folder holds a copy of all of them:

    base/                  the example's 2-shard Llama base (index, config, tokenizer)
    base.safetensors       the same tensors as one file
    lora/                  the example PEFT adapter (r=8)
    lora2/                 a second PEFT adapter (lora truncated to r=4)
    kohya.safetensors      lora in kohya/sd-scripts layout     (convert --to kohya)
    loralib.safetensors    lora in loralib layout              (convert --to loralib)
    lora.gguf              lora as a llama.cpp GGUF adapter    (convert --to gguf --base)
    merged/                base + lora, with merged/loractl.receipt
    merged.safetensors     base.safetensors + lora, with merged.safetensors.loractl.receipt
    recipe.toml            examples/recipe.toml pointing at lora and base, writing under build/
    out/                   an empty folder for outputs

A case runs its commands in CASE/w (these copies) with TMPDIR=CASE/tmp, and the oracle watches all
of CASE: a write beside the inputs' folder is seen too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from . import st

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

BASES = ("base", "base.safetensors")
ADAPTERS = ("lora", "lora2", "kohya.safetensors", "loralib.safetensors", "lora.gguf")
MERGED = ("merged", "merged.safetensors")
RECIPE = "recipe.toml"
RECIPE_USES = ("recipe.toml", "lora", "base")  # what the seed recipe reads
OBJECTS = (*BASES, *ADAPTERS, *MERGED, RECIPE)

RECIPE_TEXT = """\
# examples/recipe.toml, pointed at this folder's inputs
[vars]
out = "build"

[[step]]
name = "small"
run = "truncate"
adapter = "lora"
output = "${out}/adapter-r4"
rank = 4

[[step]]
name = "gate"
run = "check"
adapter = "@small"
base = "base"
target = "vllm"

[[step]]
name = "merged"
run = "merge"
base = "base"
adapters = ["@small"]
output = "${out}/merged"
"""

# (output, argv) run in order inside the seeds folder
BUILD = (
    ("lora2", ["truncate", "lora", "-o", "lora2", "--rank", "4", "-q"]),
    (
        "kohya.safetensors",
        ["convert", "lora", "-o", "kohya.safetensors", "--to", "kohya", "--base", "base", "-q"],
    ),
    ("loralib.safetensors", ["convert", "lora", "-o", "loralib.safetensors", "--to", "loralib", "-q"]),
    ("lora.gguf", ["convert", "lora", "-o", "lora.gguf", "--to", "gguf", "--base", "base", "-q"]),
    ("merged", ["merge", "base", "lora", "-o", "merged", "-q"]),
    ("merged.safetensors", ["merge", "base.safetensors", "lora", "-o", "merged.safetensors", "-q"]),
)


class SeedError(RuntimeError):
    pass


def build(dest: Path, runner, env: dict[str, str], timeout: float) -> Path:
    """Make the seeds folder ``dest`` (with ``runner``, which runs loractl commands)."""
    dest.mkdir(parents=True)
    shutil.copytree(EXAMPLES / "tiny-llama", dest / "base")
    shutil.copytree(EXAMPLES / "tiny-llama-lora", dest / "lora")
    st.write(dest / "base.safetensors", st.concat(sorted((dest / "base").glob("model-*.safetensors"))))
    (dest / RECIPE).write_text(RECIPE_TEXT)
    for name, argv in BUILD:
        o = runner.run(argv, dest, env, timeout)
        if o.code != 0 or not (dest / name).exists():
            raise SeedError(
                f"building seed {name}: loractl {' '.join(argv)} exited {o.code}: {o.stderr.strip()}"
            )
    (dest / "out").mkdir()
    return dest


def copy(seeds: Path, case_dir: Path) -> None:
    shutil.copytree(seeds, case_dir, symlinks=True)


def digest(root: Path) -> str:
    """One hash of every file's path, mode and bytes under ``root`` (the seeds must never change)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            h.update(str(p.relative_to(root)).encode() + oct(p.lstat().st_mode).encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()
