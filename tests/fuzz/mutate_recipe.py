"""Mutations of a recipe (loractl run): values, types, references, outputs, variables, syntax.

The recipe is kept as a Python structure, mutated, then written as TOML by :func:`toml`; a few
mutations work on the text (non-UTF-8, a BOM, invalid TOML, deep nesting). :func:`outputs` says
which paths the (mutated) recipe may write, for the oracle.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
import re
from pathlib import Path
from typing import Any

from .values import short

SEED: dict[str, Any] = {
    "vars": {"out": "build"},
    "step": [
        {"name": "small", "run": "truncate", "adapter": "lora", "output": "${out}/adapter-r4", "rank": 4},
        {"name": "gate", "run": "check", "adapter": "@small", "base": "base", "target": "vllm"},
        {"name": "merged", "run": "merge", "base": "base", "adapters": ["@small"], "output": "${out}/merged"},
    ],
}

PATHS = ["lora", "base", ".", "", "/proc/fuzz", "/proc/self/fuzz", "build/a\u0000b", "recipe.toml", "lora/x", "base/sub",
         "kohya.safetensors", "lora2", "x" * 300, "build/é", "org/name", "../x", "${out}", "${nope}", "$${out}",
         "build/\n", "out", "merged", "build/", "~/x"]  # fmt: skip
VALUES: list[Any] = [0, -1, 4.5, 10**9, 2**70, True, "4", "", [4], {"a": 1}, dt.datetime(2024, 1, 2, 3, 4, 5),
                     dt.date(2024, 1, 1), dt.time(1, 2), float("nan"), float("inf"), -0.0, "x" * 1000, [[1]], []]  # fmt: skip
KEYS = ["rank", "target", "weight", "weights", "method", "to", "dtype", "force", "energy", "max_rank", "shard_size",
        "shard-size", "density", "seed", "json", "progress", "format", "allow_partial", "receipt", "options", "foo",
        "--rank", "Rank", "allow_pickle", "device", "normalize", "pad_rank", "nested", "spectrum", "count"]  # fmt: skip


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, dt.datetime, dt.date, dt.time)):
        return v.isoformat() if not isinstance(v, int) else str(v)
    if isinstance(v, float):
        return (
            "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
        )
    if isinstance(v, str):
        return json.dumps(v)  # TOML basic strings take JSON's escapes (\uXXXX, \n, \")
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml(doc: dict[str, Any]) -> str:
    lines = []
    for k, v in doc.items():
        if k == "step" and isinstance(v, list) and all(isinstance(s, dict) for s in v) and v:
            continue
        if isinstance(v, dict) and k == "vars":
            lines.append(f"[{k}]")
            lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in v.items()]
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    steps = doc.get("step")
    if isinstance(steps, list) and steps and all(isinstance(s, dict) for s in steps):
        for s in steps:
            lines += ["", "[[step]]"] + [f"{_key(k)} = {_value(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def mutate(rng: random.Random, path: Path, doc: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Mutate ``doc`` (a copy of the recipe's structure), write it to ``path``; return (kind, detail, doc)."""
    doc = copy.deepcopy(doc)
    steps = doc["step"] if isinstance(doc.get("step"), list) else []
    what = rng.choice(["var", "var", "path", "path", "output", "output", "value", "key", "remove", "ref", "structure",
                       "text"])  # fmt: skip
    step = rng.choice(steps) if steps else {}
    if not isinstance(step, dict):  # an earlier "structure" mutation made a step a string or number
        step = {}
    detail = ""
    if what == "var":
        v = rng.choice(PATHS + VALUES[:6] + [["a"], {"a": "b"}, dt.datetime(2024, 1, 1)])
        if rng.random() < 0.2:
            doc["vars"] = v = rng.choice([5, [], "x"])
        else:
            if not isinstance(doc.get("vars"), dict):  # an earlier mutation made it 5, [] or "x"
                doc["vars"] = {}
            doc["vars"]["out"] = v
        detail = f"out = {short(v)}"
    elif what in ("path", "output"):
        key = "output" if what == "output" else rng.choice(["adapter", "base", "adapters"])
        v = rng.choice(
            PATHS + ["@small", "@gate", "@merged", "@", "@nope", ["lora", "lora2"], [], 5, ["@small", 5]]
        )
        step[key] = v
        detail = f"{step.get('name')}.{key} = {short(v)}"
        if what == "output" and rng.random() < 0.4:
            step["force"] = True
            detail += " (force)"
    elif what == "value":
        key = rng.choice(KEYS[:12])
        step[key] = v = rng.choice(VALUES)
        detail = f"{step.get('name')}.{key} = {short(v)}"
    elif what == "key":
        key = rng.choice(KEYS)
        step[key] = v = rng.choice(VALUES + ["x", True])
        detail = f"{step.get('name')}.{key} = {short(v)}"
    elif what == "remove":
        key = rng.choice(["run", "name", "adapter", "output", "base", "rank", "adapters"])
        step.pop(key, None)
        detail = f"{step.get('name')} without {key}"
    elif what == "ref":
        v = rng.choice(["run", "name"])
        if v == "run":
            step["run"] = rng.choice(
                ["extract", "verify", "unmerge", "similarity", "x", "", 5, "TRUNCATE", ["check"]]
            )
        else:
            step["name"] = rng.choice(["gate", "small", "", 5, "@x", "a b", "x" * 1000])
        detail = f"{v} = {short(step.get(v))}"
    elif what == "structure":
        v = rng.choice(
            ["no-steps", "step-not-table", "steps-not-list", "top-level-key", "many-steps", "same-output"]
        )
        if v == "no-steps":
            doc["step"] = []
        elif v == "step-not-table":
            doc["step"] = [5, "x"]
        elif v == "steps-not-list":
            doc["step"] = {"run": "check", "adapter": "lora"}
        elif v == "top-level-key":
            doc[rng.choice(["foo", "steps", "var"])] = 1
        elif v == "many-steps":
            doc["step"] = steps + [
                {"name": f"c{i}", "run": "check", "adapter": "lora"} for i in range(rng.choice([10, 200]))
            ]
        else:
            for s in steps:
                if "output" in s:
                    s["output"] = "${out}/same"
        detail = v
    else:
        return (*_text(rng, path, doc), doc)
    path.write_text(toml(doc))
    return f"recipe:{what}", detail, doc


def _text(rng: random.Random, path: Path, doc: dict[str, Any]) -> tuple[str, str]:
    t = toml(doc)
    what = rng.choice(["nonutf8", "bom", "invalid", "nesting", "nul", "crlf", "utf16", "empty", "duplicate-table",
                       "dotted", "huge-int"])  # fmt: skip
    if what == "nonutf8":
        b = t.encode()
        i = rng.randrange(len(b))
        data = b[:i] + b"\xff" + b[i:]
    elif what == "bom":
        data = b"\xef\xbb\xbf" + t.encode()
    elif what == "invalid":
        data = (
            t + rng.choice(["[[step]\n", "x = \n", "= 1\n", '[vars]\nout = "a"\n', "rank = 4\nrank = 5\n"])
        ).encode()
    elif what == "nesting":
        d = rng.choice([100, 5000, 100_000])
        data = (t + "deep = " + "[" * d + "]" * d + "\n").encode()
    elif what == "nul":
        data = t.replace("build", "bu\x00ild", 1).encode()
    elif what == "crlf":
        data = t.replace("\n", "\r\n").encode()
    elif what == "utf16":
        data = t.encode("utf-16")
    elif what == "empty":
        data = b""
    elif what == "duplicate-table":
        data = (t + "\n[vars]\nout = 'x'\n").encode()
    elif what == "dotted":
        data = (t + "\n[[step]]\nrun = 'check'\nadapter.path = 'lora'\n").encode()
    else:
        data = (
            t
            + "\n[[step]]\nrun = 'truncate'\nadapter = 'lora'\noutput = 'build/h'\nrank = 99999999999999999999\n"
        ).encode()
    path.write_bytes(data)
    return f"recipe:text-{what}", f"{len(data)} bytes"


def outputs(doc: dict[str, Any], sets: dict[str, str]) -> tuple[list[str], bool]:
    """The outputs a recipe may write (as written in it, variables substituted), and whether any step forces."""
    variables: dict[str, str] = {}
    if isinstance(doc.get("vars"), dict):
        # as loractl splices a variable into text (recipe._text_of): a TOML boolean as TOML writes it
        variables = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in doc["vars"].items()}
    variables.update(sets)
    outs, force = [], False
    steps = doc.get("step") if isinstance(doc.get("step"), list) else []
    for s in steps:
        if not isinstance(s, dict):
            continue
        force = force or bool(s.get("force"))
        o = s.get("output")
        if isinstance(o, str):
            outs.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: variables.get(m[1], m[0]), o))
    return outs, force
