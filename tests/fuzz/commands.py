"""The commands a case runs: each built from the case's inputs, preferring the mutated ones.

A :class:`Command` knows its arguments, which of them are inputs, and which paths it may write
(its output, the receipt beside a merged file, a plot), so that the oracle can tell a legitimate
write from a write outside the output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .seeds import ADAPTERS, BASES, MERGED, RECIPE, RECIPE_USES

KINDS = ("merge", "unmerge", "inspect", "check", "truncate", "combine", "convert", "similarity", "run")
WRITERS = ("merge", "unmerge", "truncate", "combine", "convert", "run")
WEIGHTS = {"merge": 3, "unmerge": 2, "inspect": 2, "check": 3, "truncate": 2, "combine": 2, "convert": 3,
           "similarity": 1, "run": 2}  # fmt: skip
FORMATS = ("peft", "kohya", "loralib", "gguf", "diffusers")
TARGETS = ("peft", "vllm", "llama.cpp", "lorax")


@dataclass
class Command:
    kind: str
    argv: list[str]
    inputs: list[str]  # path arguments that are inputs (as given)
    outputs: list[str] = field(default_factory=list)  # paths it may create or replace (as given)
    force: bool = False
    fsize: int | None = None  # RLIMIT_FSIZE: a full disk
    objects: set[str] = field(default_factory=set)  # the case's objects it reads
    recipe_doc: dict[str, Any] | None = None

    @property
    def output(self) -> str | None:
        return self.outputs[0] if self.outputs else None


def roles(obj: str) -> set[str]:
    if obj in BASES:
        return {"base"}
    if obj in ADAPTERS:
        return {"adapter"}
    if obj in MERGED:
        return {"merged", "base"}
    return {"recipe"}


KIND_ROLES = {
    "merge": {"base", "adapter"}, "unmerge": {"merged", "adapter"}, "inspect": {"adapter", "base"},
    "check": {"adapter", "base"}, "truncate": {"adapter"}, "combine": {"adapter"}, "convert": {"adapter", "base"},
    "similarity": {"adapter", "base"}, "run": {"recipe"},
}  # fmt: skip


class Builder:
    """Builds commands for one case."""

    def __init__(self, rng: random.Random, mutated: set[str], recipe_doc: dict[str, Any]) -> None:
        self.rng = rng
        self.mutated = mutated
        self.recipe_doc = recipe_doc
        self.confuse = False  # pick any object for any role (argv family)

    def kind(self) -> str:
        rng = self.rng
        wanted = set().union(*(roles(o) for o in self.mutated)) if self.mutated else set()
        kinds = (
            [k for k in KINDS if KIND_ROLES[k] & wanted] if wanted and rng.random() < 0.85 else list(KINDS)
        )
        return rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]

    def pick(self, pool: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
        rng = self.rng
        if self.confuse and rng.random() < 0.3:
            pool = (*BASES, *ADAPTERS, *MERGED, RECIPE)
        pool = tuple(p for p in pool if p not in exclude) or pool
        hot = [p for p in pool if p in self.mutated]
        return rng.choice(hot) if hot and rng.random() < 0.8 else rng.choice(pool)

    def out(self, ext: str) -> str:
        return f"out/{self.rng.choice('abc')}{ext}"

    def flags(self, argv: list[str], *options: tuple[float, list[str]]) -> None:
        for p, opt in options:
            if self.rng.random() < p:
                argv += opt

    def build(self, kind: str) -> Command:
        return getattr(self, "_" + kind)()

    # ---------------------------------------------------------------- the commands
    def _merge(self) -> Command:
        rng = self.rng
        base = self.pick(BASES + MERGED)
        adapters = [self.pick(ADAPTERS) for _ in range(rng.choice([1, 1, 2]))]
        out = self.out("" if not base.endswith(".safetensors") else ".safetensors")
        argv = ["merge", base, *adapters, "-o", out]
        if rng.random() < 0.3:
            argv += [x for _ in adapters for x in ("-w", rng.choice(["1", "0.5", "-1", "0"]))]
        self.flags(argv, (0.2, ["--dtype", rng.choice(["bf16", "fp16", "fp32", "auto"])]),
                   (0.15, ["--shard-size", rng.choice(["100KB", "1MB", "50KB", "5GB"])]), (0.2, ["--no-receipt"]),
                   (0.2, ["--allow-partial"]), (0.2, ["--json"]), (0.1, ["-q"]))  # fmt: skip
        return self._writer("merge", argv, [base, *adapters], out, receipt=True)

    def _unmerge(self) -> Command:
        rng = self.rng
        merged = self.pick(MERGED)
        adapter = self.pick(ADAPTERS) if rng.random() < 0.4 else "lora"
        out = self.out(".safetensors" if merged.endswith(".safetensors") else "")
        argv = ["unmerge", merged, adapter, "-o", out]
        inputs = [merged, adapter]
        r = rng.random()
        if r < 0.15:
            argv += ["--no-receipt"]
        elif r < 0.3:
            receipt = rng.choice(["merged/loractl.receipt", "merged.safetensors.loractl.receipt", "lora.gguf",
                                  "base/model-00001-of-00002.safetensors", "no-such-receipt"])  # fmt: skip
            argv += ["--receipt", receipt]
            inputs.append(receipt)
        self.flags(argv, (0.2, ["--json"]), (0.1, ["-w", rng.choice(["1", "0.5", "2"])]))
        return self._writer("unmerge", argv, inputs, out)

    def _inspect(self) -> Command:
        rng = self.rng
        adapters = [self.pick(ADAPTERS) for _ in range(rng.choice([1, 1, 2]))]
        argv = ["inspect", *adapters]
        inputs = list(adapters)
        if rng.random() < 0.4:
            base = self.pick(BASES + MERGED)
            argv += ["--base", base]
            inputs.append(base)
        self.flags(
            argv, (0.3, ["--spectrum"]), (0.4, ["--json"]), (0.1, ["--count", rng.choice(["1", "0", "1000"])])
        )
        return Command("inspect", argv, inputs)

    def _check(self) -> Command:
        rng = self.rng
        adapter = self.pick(ADAPTERS)
        argv = ["check", adapter]
        inputs = [adapter]
        if rng.random() < 0.6:
            argv += ["--target", rng.choice(TARGETS)]
        if rng.random() < 0.5:
            base = self.pick(BASES + MERGED)
            argv += ["--base", base]
            inputs.append(base)
        self.flags(argv, (0.4, ["--json"]), (0.15, ["--max-rank", rng.choice(["4", "8", "64"])]))
        return Command("check", argv, inputs)

    def _ext(self, fmt: str | None, adapter: str) -> str:
        if fmt is None:
            return "" if "." not in adapter else adapter[adapter.index(".") :]
        return {"peft": "", "gguf": ".gguf"}.get(fmt, ".safetensors")

    def _truncate(self) -> Command:
        rng = self.rng
        adapter = self.pick(ADAPTERS)
        to = rng.choice([None, None, None, *FORMATS[:3]])  # (gguf needs a base, which truncate does not take)
        out = self.out(self._ext(to, adapter))
        argv = ["truncate", adapter, "-o", out]
        argv += rng.choice([["--rank", rng.choice(["1", "2", "4", "8", "16"])], ["--energy", rng.choice(["0.5", "0.9", "1"])],
                            ["--sv-ratio", "2"], ["--sv-cumulative", "0.8"], ["--sv-fro", "0.9"]])  # fmt: skip
        if to:
            argv += ["--to", to]
        self.flags(argv, (0.1, ["--nested"]), (0.3, ["--json"]))
        return self._writer("truncate", argv, [adapter], out)

    def _combine(self) -> Command:
        rng = self.rng
        adapters = [self.pick(ADAPTERS) for _ in range(rng.choice([2, 2, 3]))]
        method = rng.choice(
            ["cat", "cat", "svd", "linear", "ties", "dare-linear", "dare-ties", "magnitude-prune"]
        )
        to = rng.choice([None, None, "peft", "kohya"])
        out = self.out(self._ext(to, adapters[0]))
        argv = ["combine", *adapters, "-o", out, "--method", method]
        if method != "cat" and rng.random() < 0.7:
            argv += ["--rank", rng.choice(["4", "8", "16"])]
        if method in ("ties", "dare-linear", "dare-ties", "magnitude-prune"):
            argv += ["--density", rng.choice(["0.5", "0.9"]), "--seed", "0"]
        if to:
            argv += ["--to", to]
        self.flags(
            argv,
            (0.3, [x for _ in adapters for x in ("-w", rng.choice(["1", "0.5", "-1"]))]),
            (0.3, ["--json"]),
        )
        return self._writer("combine", argv, adapters, out)

    def _convert(self) -> Command:
        rng = self.rng
        adapter = self.pick(ADAPTERS)
        to = rng.choice(FORMATS)
        out = self.out(self._ext(to, adapter))
        argv = ["convert", adapter, "-o", out, "--to", to]
        inputs = [adapter]
        if to in ("gguf", "kohya") or rng.random() < 0.3:
            base = self.pick(BASES + MERGED)
            argv += ["--base", base]
            inputs.append(base)
        self.flags(argv, (0.2, ["--dtype", rng.choice(["bf16", "fp16", "fp32"])]), (0.15, ["--normalize"]),
                   (0.15, ["--pad-rank", rng.choice(["8", "16"])]), (0.2, ["--json"]))  # fmt: skip
        if adapter == "loralib.safetensors" and rng.random() < 0.5:
            argv += ["--rank", "8", "--alpha", "16"]
        return self._writer("convert", argv, inputs, out)

    def _similarity(self) -> Command:
        rng = self.rng
        a = self.pick(ADAPTERS)
        if rng.random() < 0.3:
            base = self.pick(BASES + MERGED)
            argv, inputs = ["similarity", a, "--base", base], [a, base]
        else:
            b = self.pick(ADAPTERS)
            argv, inputs = ["similarity", a, b], [a, b]
            self.flags(argv, (0.3, ["--i", rng.choice(["1", "4", "8"])]), (0.3, ["--j", rng.choice(["1", "4", "8"])]),
                       (0.2, ["--grid"]), (0.2, ["--module", rng.choice(["*q_proj", "*", "nothing*"])]),
                       (0.2, ["--factor", "B"]))  # fmt: skip
        self.flags(argv, (0.5, ["--json"]))
        return Command("similarity", argv, inputs)

    def _run(self) -> Command:
        rng = self.rng
        argv = ["run", RECIPE]
        if rng.random() < 0.3:
            argv += ["--set", f"out={rng.choice(['build2', 'out/r', 'build/x/y'])}"]
        self.flags(argv, (0.15, ["--dry-run"]), (0.3, ["--json"]))
        # (the oracle reads the outputs from the recipe and the --set options)
        return Command(
            "run", argv, list(RECIPE_USES), [], objects=set(RECIPE_USES), recipe_doc=self.recipe_doc
        )

    def _writer(
        self, kind: str, argv: list[str], inputs: list[str], out: str, receipt: bool = False
    ) -> Command:
        if self.rng.random() < 0.2:
            argv.append("--force")
        # the receipt of a merged file lies beside it (out/x/ names the file out/x)
        outputs = [out] + ([out.rstrip("/") + ".loractl.receipt"] if receipt and out.rstrip("/") else [])
        return Command(kind, argv, inputs, outputs, force="--force" in argv)
