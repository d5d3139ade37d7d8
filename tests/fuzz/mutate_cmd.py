"""Mutations of a command rather than of a file.

Families:
    output     the output clashes: an input, inside an input, a folder holding the inputs, an
               existing file without --force, under a regular file, a missing folder, /proc, a
               symlink to an input, a name too long, not UTF-8...
    disk-full  the command's writes fail past N bytes (RLIMIT_FSIZE: EFBIG, as a full disk)
    argv       odd option values (NaN weights, rank 0, a shard size of -1GB...), a base given as
               the adapter and the like
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from .commands import Command

LONG = "a" * 300


def _set_output(cmd: Command, new: str) -> None:
    i = cmd.argv.index("-o")
    cmd.argv[i + 1] = new
    receipt = len(cmd.outputs) > 1 and cmd.outputs[1].endswith(".loractl.receipt")
    cmd.outputs = [new] + ([new.rstrip("/") + ".loractl.receipt"] if receipt and new.rstrip("/") else [])


def output(rng: random.Random, cmd: Command, case: Path) -> tuple[str, str]:
    if cmd.kind == "run":
        v = rng.choice(["lora", "base", ".", "/proc/fuzz", "lora/x", "kohya.safetensors", "", LONG, "out/\udcff",
                        "merged", "tmp", "recipe.toml"])  # fmt: skip
        cmd.argv += ["--set", f"out={v}"]
        return "output:run-set", repr(v)
    inputs = [i for i in cmd.inputs if (case / i).exists()] or cmd.inputs
    what = rng.choice(["input", "input", "inside-input", "contains-inputs", "other-object", "exists", "exists-dir",
                       "under-file", "no-parent", "proc", "symlink-to-input", "symlink-parent", "dangling-symlink",
                       "long-name", "trailing-slash", "empty", "dash", "non-utf8", "newline", "tmp-name", "receipt"])  # fmt: skip
    if what == "input":
        i = rng.choice(inputs)
        new = rng.choice([i, "./" + i, i + "/" if (case / i).is_dir() else i, str(case / i), f"out/../{i}"])
    elif what == "inside-input":
        i = rng.choice(inputs)
        if (case / i).is_dir():
            inner = sorted(p.name for p in (case / i).iterdir())
            new = f"{i}/{rng.choice(inner + ['new', 'new.safetensors'])}"
        else:
            new = f"{i}/x"
    elif what == "contains-inputs":
        new = rng.choice([".", str(case), "out/..", "./"])
    elif what == "other-object":
        new = rng.choice(
            ["kohya.safetensors", "lora.gguf", "lora2", "merged", "base.safetensors", "recipe.toml"]
        )
    elif what == "exists":
        new = "out/exists.safetensors"
        (case / new).write_bytes(b"not yours")
    elif what == "exists-dir":
        new = "out/existing"
        (case / new).mkdir(exist_ok=True)
        (case / new / "keep.txt").write_text("not yours")
    elif what == "under-file":
        (case / "out/file").write_bytes(b"x")
        new = rng.choice(["out/file/x", "kohya.safetensors/x", "recipe.toml/x.safetensors"])
    elif what == "no-parent":
        new = "out/no/such/x"
    elif what == "proc":
        new = rng.choice(["/proc/fuzz-out", "/proc/self/fuzz-out", "/proc/1/x.safetensors"])
    elif what == "symlink-to-input":
        i = rng.choice(inputs)
        (case / "out/link").unlink(missing_ok=True)
        os.symlink(Path("..") / i, case / "out/link")
        new = "out/link"
    elif what == "symlink-parent":
        d = rng.choice([i for i in inputs if (case / i).is_dir()] or ["lora"])
        (case / "out/dirlink").unlink(missing_ok=True)
        os.symlink(Path("..") / d, case / "out/dirlink")
        new = rng.choice(
            ["out/dirlink/new", "out/dirlink/adapter_model.safetensors", "out/dirlink/config.json"]
        )
    elif what == "dangling-symlink":
        (case / "out/dangling").unlink(missing_ok=True)
        os.symlink("nowhere/at/all", case / "out/dangling")
        new = "out/dangling"
    elif what == "long-name":
        new = rng.choice([f"out/{LONG}", f"out/{LONG}/x", "out/" + "d/" * 2100 + "x"])
    elif what == "trailing-slash":
        new = "out/x/"
    elif what == "empty":
        new = ""
    elif what == "dash":
        new = "-"
    elif what == "non-utf8":
        new = "out/\udcff\udcfe.safetensors"
    elif what == "newline":
        new = "out/a\nb"
    elif what == "tmp-name":
        new = "out/.x.loractl-tmp-1-abcd"
    else:  # receipt: the receipt beside a merged file, or inside a merged folder
        new = rng.choice(["merged.safetensors.loractl.receipt", "merged/loractl.receipt"])
    if rng.random() < 0.35 and "--force" not in cmd.argv:
        cmd.argv.append("--force")
        cmd.force = True
    _set_output(cmd, new)
    return f"output:{what}", f"-o {new!r}" + (" --force" if cmd.force else "")


def disk_full(rng: random.Random, cmd: Command, case: Path) -> tuple[str, str]:
    cmd.fsize = rng.choice([0, 1, 100, 4096, rng.randrange(8, 400_000), rng.randrange(8, 400_000)])
    return "disk-full", f"writes fail past {cmd.fsize} bytes"


# option -> odd values click accepts (its type is right), and values it does not
ODD_OPTIONS = {
    "--weight": (["nan", "inf", "-inf", "0", "-1", "1e308", "-0.0", "1e-320"], ["x", "1,2", ""]),
    "--rank": (["0", "-1", "999999", str(2**63), "1"], ["4.5", "x", ""]),
    "--energy": (["0", "1.5", "-1", "nan", "inf"], ["x"]),
    "--sv-ratio": (["0", "-1", "nan", "inf", "1"], []),
    "--sv-fro": (["0", "2", "nan"], []),
    "--density": (["0", "1", "2", "-0.5", "nan"], ["x"]),
    "--i": (["0", "-1", "1000", str(2**63)], ["x"]),
    "--j": (["0", "-1", "1000"], []),
    "--max-rank": (["-1", "0", str(2**64)], []),
    "--pad-rank": (["0", "1", "100000", str(2**40)], []),
    "--shard-size": (["0", "1", "1B", "-1GB", "1e400GB", "x", "5XB", "", "0.5KB", "nan GB", "inf"], []),
    "--count": (["0", "-1", str(2**64)], []),
    "--module": (["[", "", "\\", "*" * 1000], []),
    "--seed": (["-1", str(2**64)], []),
    "--format": (["x", "gguf", "kohya", "peft", "loralib", "diffusers", ""], []),
    "--to": (["x", ""], []),
    "--alpha": (["nan", "0", "-1", "inf"], []),
}
APPLIES = {
    "merge": ["--weight", "--shard-size", "--format"], "unmerge": ["--weight", "--format"],
    "inspect": ["--count", "--format"], "check": ["--max-rank", "--format"],
    "truncate": ["--rank", "--energy", "--sv-ratio", "--sv-fro", "--format", "--to"],
    "combine": ["--weight", "--rank", "--density", "--seed", "--format", "--to"],
    "convert": ["--pad-rank", "--rank", "--alpha", "--format", "--to"],
    "similarity": ["--i", "--j", "--module", "--format"], "run": [],
}  # fmt: skip


def argv(rng: random.Random, cmd: Command, case: Path) -> tuple[str, str]:
    opts = APPLIES[cmd.kind]
    if not opts or rng.random() < 0.1:
        if cmd.kind == "run":
            v = rng.choice(["--set=x", "--set==x", "--set=out", "--set=nope=1", "--set=out=${out}"])
            cmd.argv.append(v)
            return "argv:set", v
        cmd.argv.append(
            rng.choice(["--allow-pickle", "--subfolder=x", "--json"])
            if cmd.kind != "similarity"
            else "--json"
        )
        return "argv:flag", cmd.argv[-1]
    opt = rng.choice(opts)
    ok, bad = ODD_OPTIONS[opt]
    typed = bool(ok) and (not bad or rng.random() < 0.85)
    v = rng.choice(ok if typed else bad)
    if opt == "--weight" and rng.random() < 0.3:  # as many weights as adapters, plus one
        n = sum(1 for a in cmd.argv if a in ("-w", "--weight")) + 1
        cmd.argv += ["--weight", "1"] * n
        return "argv:weights-count", f"{n} more --weight"
    if opt in cmd.argv:
        cmd.argv[cmd.argv.index(opt) + 1] = v
    else:
        cmd.argv += [opt, v]
    return ("argv:odd" if typed else "argv:type"), f"{opt} {v!r}"
