"""Cases: copy the seeds, mutate 1-3 things, run 1-4 commands, check each against the oracle.

Case N of seed S is ``random.Random(f"loractl-fuzz:{S}:{N}")``: the same mutations and commands
every time, alone or in a run of thousands (``python -m tests.fuzz --case N --seed S``).
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import mutate_cmd, mutate_files, mutate_gguf, mutate_json, mutate_recipe, mutate_st, oracle, seeds
from .commands import WRITERS, Builder, Command
from .mutate_recipe import SEED as RECIPE_SEED
from .runner import command_env

# family -> weight; file families name the files they may touch
FAMILIES = {
    "st-header": 14, "st-length": 4, "st-size": 5, "st-bytes": 5, "st-retype": 8, "config": 8, "base-config": 3,
    "index": 7, "gguf": 5, "recipe": 8, "file-kind": 5, "output": 10, "disk-full": 4, "argv": 6,
}  # fmt: skip
COMMAND_FAMILIES = ("output", "disk-full", "argv")
# RLIMIT_FSIZE of every command: no legitimate output of these inputs comes near it, and a symlink
# to /dev/zero copied as a tokenizer file stops there instead of filling the disk
DEFAULT_FSIZE = 64 << 20


@dataclass
class Mutation:
    family: str
    kind: str
    target: str  # a file of the case, or "" for a command's mutation
    obj: str  # the case object it belongs to ("" for a command's mutation)
    detail: str


@dataclass
class CommandResult:
    argv: list[str]
    kind: str
    families: list[str]
    code: int
    seconds: float
    problems: list[tuple[str, str]]
    stderr: str
    fsize: int | None = None
    mutations: list[int] = field(default_factory=list)  # indices of the case's mutations it met


@dataclass
class CaseResult:
    seed: int
    case: int
    mutations: list[Mutation]
    commands: list[CommandResult] = field(default_factory=list)
    error: str | None = None  # the harness itself failed on this case

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def repro(seed: int, case: int) -> str:
    return f"python -m tests.fuzz --seed {seed} --case {case} --keep /tmp/fuzz-{seed}-{case}"


def shell(argv: list[str]) -> str:
    return "loractl " + " ".join(shlex.quote(a.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
                                 for a in argv)  # fmt: skip


def _objects(cmd: Command) -> set[str]:
    if cmd.objects:
        return cmd.objects
    out = set()
    for i in cmd.inputs:
        for o in seeds.OBJECTS:
            if i == o or i.startswith(o + "/") or i == o + ".loractl.receipt":
                out.add(o)
    return out


def plan_mutations(
    rng: random.Random, case: Path, only: set[str] | None
) -> tuple[list[Mutation], dict[str, Any]]:
    """Apply the case's file mutations; return them (command mutations are applied later) and the recipe."""
    fams = [f for f in FAMILIES if only is None or f in only]
    n = 0 if (only is None and rng.random() < 0.04) else rng.choice([1, 1, 1, 2, 2, 3])
    muts: list[Mutation] = []
    recipe_doc = RECIPE_SEED
    for _ in range(n):
        fam = rng.choices(fams, [FAMILIES[f] for f in fams])[0]
        if fam in COMMAND_FAMILIES:
            muts.append(Mutation(fam, "", "", "", ""))
            continue
        if fam.startswith("st-"):
            obj = rng.choice(sorted(mutate_files.ST_FILES))
            rel = rng.choice(mutate_files.ST_FILES[obj])
            fn = mutate_st.FAMILIES[fam]
        elif fam == "config":
            obj = rng.choice(sorted(mutate_files.CONFIGS))
            rel, fn = mutate_files.CONFIGS[obj][0], mutate_json.config
        elif fam == "base-config":
            obj = rng.choice(sorted(mutate_files.BASE_CONFIGS))
            rel, fn = mutate_files.BASE_CONFIGS[obj][0], mutate_json.base_config
        elif fam == "index":
            obj = rng.choice(sorted(mutate_files.INDEXES))
            rel, fn = mutate_files.INDEXES[obj][0], mutate_json.index
        elif fam == "gguf":
            obj, rel, fn = "lora.gguf", "lora.gguf", mutate_gguf.mutate
        elif fam == "recipe":
            p = case / seeds.RECIPE
            if not p.is_file() or p.is_symlink():  # a file-kind mutation replaced it (maybe by a FIFO)
                continue
            kind, detail, recipe_doc = mutate_recipe.mutate(rng, p, recipe_doc)
            muts.append(Mutation(fam, kind, seeds.RECIPE, seeds.RECIPE, detail))
            continue
        else:  # file-kind
            obj = rng.choice(sorted(mutate_files.all_files()))
            done = mutate_files.kind(rng, case, obj)
            if done is None:
                continue
            kind, rel, detail = done
            muts.append(Mutation(fam, f"file:{kind}", rel, obj, detail))
            continue
        p = case / rel
        if not p.is_file() or p.is_symlink():  # an earlier mutation replaced it
            continue
        try:
            kind, detail = fn(rng, p)
        except (
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            AttributeError,
            UnicodeDecodeError,
            RecursionError,
            OverflowError,
            struct.error,
        ):
            continue  # an earlier mutation already broke it beyond this mutator's reach
        muts.append(Mutation(fam, kind, rel, obj, detail))
    return muts, recipe_doc


def plan_commands(
    rng: random.Random, case: Path, muts: list[Mutation], recipe_doc: dict[str, Any]
) -> list[Command]:
    mutated = {m.obj for m in muts if m.obj}
    b = Builder(rng, mutated, recipe_doc)
    cmd_muts = [m for m in muts if m.family in COMMAND_FAMILIES]
    if any(m.family == "argv" for m in cmd_muts) and rng.random() < 0.3:
        b.confuse = True
    n = rng.choice([1, 1, 2, 2, 3, 4])
    cmds = [b.build(b.kind()) for _ in range(n)]
    for m in cmd_muts:
        if m.family in ("output", "disk-full"):
            writers = [c for c in cmds if c.kind in WRITERS]
            if not writers:
                cmds.insert(0, b.build(rng.choice(WRITERS)))
                writers = [cmds[0]]
            cmd = rng.choice(writers)
        else:
            cmd = rng.choice(cmds)
        fn = {"output": mutate_cmd.output, "disk-full": mutate_cmd.disk_full, "argv": mutate_cmd.argv}[
            m.family
        ]
        m.kind, m.detail = fn(rng, cmd, case)
        m.target = f"command {cmds.index(cmd) + 1}"
    return cmds


def relevant(cmd_index: int, cmd: Command, muts: list[Mutation]) -> list[int]:
    """The mutations that can explain this command's behaviour: those of the files it reads, and
    its own command mutations."""
    objs = _objects(cmd)
    out = []
    for i, m in enumerate(muts):
        if m.family in COMMAND_FAMILIES:
            if m.target == f"command {cmd_index + 1}":
                out.append(i)
        elif m.obj in objs:
            out.append(i)
    return out


def run_case(seed: int, index: int, root: Path, seeds_dir: Path, runner, timeout: float, only: set[str] | None = None,
             keep: Path | None = None, verbose: bool = False) -> CaseResult:  # fmt: skip
    rng = random.Random(f"loractl-fuzz:{seed}:{index}")
    top = keep if keep is not None else root / f"case-{index}"
    if top.exists():
        shutil.rmtree(top)
    case = top / "w"  # the commands run here, among copies of the seeds
    seeds.copy(seeds_dir, case)
    (top / "tmp").mkdir()  # their TMPDIR
    result = CaseResult(seed, index, [])
    try:
        muts, recipe_doc = plan_mutations(rng, case, only)
        result.mutations = muts
        cmds = plan_commands(rng, case, muts, recipe_doc)
    except Exception as e:  # a bug of the fuzzer: reported, never hidden
        if verbose:
            import traceback

            traceback.print_exc()
        result.error = f"planning: {type(e).__name__}: {e}"
        return result
    if verbose:
        print(f"case {index} (seed {seed}) in {case}")
        for m in result.mutations:
            print(f"  mutation {m.family:<11} {m.kind:<28} {m.target}: {m.detail}")
    env = command_env(top)
    cache: dict[str, tuple] = {}
    for i, cmd in enumerate(cmds):
        before = oracle.snapshot(top, cache)
        o = runner.run(cmd.argv, case, env, timeout, cmd.fsize if cmd.fsize is not None else DEFAULT_FSIZE)
        after = oracle.snapshot(top, cache)
        problems = oracle.check(cmd, top, case, before, after, o)
        rel = relevant(i, cmd, result.mutations)
        families = sorted({result.mutations[j].family for j in rel}) or ["none"]
        result.commands.append(CommandResult(cmd.argv, cmd.kind, families, o.code, round(o.seconds, 3), problems,
                                             o.stderr[-2000:], cmd.fsize, rel))  # fmt: skip
        if verbose:
            print(
                f"  $ {shell(cmd.argv)}"
                + (f"    # RLIMIT_FSIZE={cmd.fsize}" if cmd.fsize is not None else "")
            )
            print(f"    exit {o.code} in {o.seconds:.2f}s" + ("  (killed: hang)" if o.hang else ""))
            for line in o.stderr.strip().splitlines()[:6]:
                print(f"    | {line[:200]}")
            for cat, detail in problems:
                print(f"    !! {cat}: {detail}")
    if keep is None:
        shutil.rmtree(top, ignore_errors=True)
    return result


# ---------------------------------------------------------------- the report
def signature(cat: str, detail: str) -> str:
    """A failure's kind, with paths, numbers and names blurred, to group the same bug together."""
    s = re.sub(r"/[^\s:'\"]*case-\d+", "CASE", detail)
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", s)
    s = re.sub(r"\d+", "N", s)
    return f"{cat}: {s[:110]}"


def report(results: list[CaseResult], seed: int, examples: int = 3) -> tuple[str, dict[str, Any]]:
    cats = oracle.CATEGORIES
    table: dict[tuple[str, str], dict[str, int]] = {}
    sigs: dict[str, list[tuple[CaseResult, CommandResult, str]]] = {}
    n_cmd = n_bad = 0
    errors = [r for r in results if r.error]
    for r in results:
        for c in r.commands:
            n_cmd += 1
            n_bad += bool(c.problems)
            for fam in c.families:
                row = table.setdefault((fam, c.kind), {"commands": 0, "ok": 0, **{k: 0 for k in cats}})
                row["commands"] += 1
                row["ok"] += not c.problems
                for cat in {p[0] for p in c.problems}:
                    row[cat] += 1
            for cat, detail in c.problems:
                sigs.setdefault(signature(cat, detail), []).append((r, c, detail))
    short = {"commands": "cmds", "ok": "ok", "exit-3": "exit3", "crash": "crash", "traceback": "trace",
             "bad-stderr": "stderr", "leftover": "left", "partial-output": "partial", "input-changed": "input",
             "outside-write": "outside", "hang": "hang"}  # fmt: skip
    cols = ["commands", "ok", *cats]
    out = [f"{len(results)} cases, {n_cmd} commands, {n_bad} commands broke a rule "
           f"({sum(1 for r in results if any(c.problems for c in r.commands))} cases)"]  # fmt: skip
    out.append("")
    out.append(f"{'family':<12} {'command':<11}" + "".join(f"{short[c]:>8}" for c in cols))
    for fam, kind in sorted(table):
        row = table[(fam, kind)]
        out.append(f"{fam:<12} {kind:<11}" + "".join(f"{row[c] or '.':>8}" for c in cols))
    totals = {c: 0 for c in cats}
    for r in results:
        for c in r.commands:
            for cat in {p[0] for p in c.problems}:
                totals[cat] += 1
    out.append(
        f"{'all':<12} {'(commands)':<11}{n_cmd:>8}{n_cmd - n_bad:>8}"
        + "".join(f"{totals[c] or '.':>8}" for c in cats)
    )
    out.append("(a command counts in the row of every mutation family that touched what it read)")
    if sigs:
        out.append("")
        out.append(f"{len(sigs)} kinds of failure (most frequent first), each with reproducers:")
        for sig, hits in sorted(sigs.items(), key=lambda kv: -len(kv[1])):
            cases = sorted({h[0].case for h in hits})
            out.append(f"\n[{len(hits)} commands, {len(cases)} cases] {sig}")
            seen = set()
            for r, c, detail in hits:
                if r.case in seen:
                    continue
                seen.add(r.case)
                muts = (
                    "; ".join(
                        f"{m.family}/{m.kind} {m.target}: {m.detail}"
                        for m in (r.mutations[j] for j in c.mutations)
                    )
                    or "none of the case's mutations touched what it read"
                )
                out.append(f"  {repro(seed, r.case)}")
                out.append(
                    f"      {shell(c.argv)}" + (f"   # RLIMIT_FSIZE={c.fsize}" if c.fsize is not None else "")
                )
                out.append(f"      exit {c.code}: {detail[:200]}")
                out.append(f"      mutations: {muts[:300]}")
                if len(seen) >= examples:
                    break
    for r in errors:
        out.append(f"HARNESS ERROR case {r.case}: {r.error}")
    summary = {
        "cases": len(results), "commands": n_cmd, "failed_commands": n_bad, "harness_errors": len(errors),
        "totals": totals, "signatures": {s: len(h) for s, h in sigs.items()},
        "table": [{"family": f, "command": k, **v} for (f, k), v in sorted(table.items())],
    }  # fmt: skip
    return "\n".join(out), summary


def load(path: Path) -> list[CaseResult]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        out.append(CaseResult(
            d["seed"], d["case"], [Mutation(**m) for m in d["mutations"]],
            [CommandResult(**{**c, "problems": [tuple(p) for p in c["problems"]]}) for c in d["commands"]], d["error"],
        ))  # fmt: skip
    return out


def dump(results: list[CaseResult], path: Path) -> None:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps(r.to_json()) + "\n")
