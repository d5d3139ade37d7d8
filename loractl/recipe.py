"""Recipes: a pipeline of loractl steps described in TOML, validated before anything runs.

```toml
[vars]                      # ${name} in any string; `loractl run --set name=value` overrides
base = "tiny-llama"

[[step]]
name = "small"              # later steps refer to this step's output as "@small"
run = "truncate"            # check | truncate | combine | convert | merge | inspect
adapter = "tiny-llama-lora"
output = "out/small"
rank = 4

[[step]]
run = "check"
adapter = "@small"
target = "vllm"
```

Relative paths are taken from the recipe file's folder. Option names are the command-line
option names (``--shard-size`` is ``shard-size`` or ``shard_size``). Defaults from ``[tool.loractl]``
apply to steps as they do to commands; a step's own values win.
"""

from __future__ import annotations

import inspect as pyinspect
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckFailedError, LoractlError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STEP_KINDS = ("check", "truncate", "combine", "convert", "merge", "inspect")
PATH_KEYS = ("adapter", "adapters", "base")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _api_function(kind: str) -> Callable[..., Any]:
    from . import api

    return getattr(api, kind)


def _is_hub_ref(text: str) -> bool:
    try:
        from .io.hub import is_hub_ref
    except ImportError:  # pragma: no cover - hub support not installed
        return False
    return is_hub_ref(text)


def _params(kind: str) -> dict[str, pyinspect.Parameter]:
    fn = _api_function(kind)
    params = dict(pyinspect.signature(fn).parameters)
    params.pop("progress", None)
    return params


@dataclass
class Step:
    """One validated step."""

    index: int
    name: str
    kind: str
    options: dict[str, Any]
    line: int

    @property
    def output(self) -> str | None:
        out = self.options.get("output")
        return str(out) if out is not None else None


@dataclass
class Recipe:
    path: Path
    steps: list[Step]
    variables: dict[str, str]


@dataclass
class StepReport:
    name: str
    kind: str
    status: str  # "ok", "failed", "skipped", "planned"
    output: str | None
    seconds: float = 0.0
    exit_code: int = 0
    message: str | None = None
    result: Any = None


@dataclass
class RunResult:
    recipe: str
    dry_run: bool
    ok: bool
    steps: list[StepReport] = field(default_factory=list)


def _line_of(text: str, step_index: int, key: str | None = None) -> int:
    """1-based line of the ``step_index``-th ``[[step]]`` table (or of ``key`` inside it)."""
    lines = text.splitlines()
    seen = -1
    start = 0
    for i, line in enumerate(lines):
        if re.match(r"^\s*\[\[\s*step\s*\]\]", line):
            seen += 1
            if seen == step_index:
                start = i
                break
    if key is None:
        return start + 1
    for j in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[j]):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[j]):
            return j + 1
    return start + 1


def _substitute(value: Any, variables: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            if m[1] not in variables:
                raise UsageError(
                    f"{where}: unknown variable ${{{m[1]}}}", hint="define it in [vars] or with --set"
                )
            return str(variables[m[1]])

        return VAR_RE.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    return value


def load(
    path: str | Path, *, overrides: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None
) -> Recipe:
    """Parse and validate a recipe; nothing runs.

    Args:
        path: the TOML file.
        overrides: ``--set name=value`` pairs (variables).
        defaults: ``[tool.loractl]`` defaults, per command (``{"merge": {"dtype": "bf16"}}``).

    Raises:
        UsageError: unreadable TOML, an unknown step kind or key, a missing required key or input,
            a reference to an unknown or later step, two steps writing the same output; each names
            the recipe's file and line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such recipe") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    unknown_top = set(doc) - {"vars", "step"}
    if unknown_top:
        raise UsageError(
            f"{path}: unknown top-level key {sorted(unknown_top)[0]!r}; a recipe has [vars] and [[step]]"
        )
    variables = {k: str(v) for k, v in (doc.get("vars") or {}).items()}
    for k, v in (overrides or {}).items():
        variables[k] = v
    raw_steps = doc.get("step") or []
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f"{path}: no [[step]] tables: nothing to run")
    folder = path.resolve().parent
    steps: list[Step] = []
    names: dict[str, Step] = {}
    outputs: dict[str, Step] = {}
    for i, raw in enumerate(raw_steps):
        line = _line_of(text, i)
        where = f"{path}:{line}"
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        kind = raw.pop("run", None)
        if kind not in STEP_KINDS:
            raise UsageError(f"{where}: step {i + 1} has run = {kind!r}; one of {', '.join(STEP_KINDS)}")
        name = str(raw.pop("name", f"{kind}{i + 1}"))
        if name in names:
            raise UsageError(f"{where}: two steps are named {name!r}")
        params = _params(kind)
        opts: dict[str, Any] = {
            k.replace("-", "_"): v
            for k, v in (defaults or {}).get(kind, {}).items()
            if k.replace("-", "_") in params
        }
        for key, value in raw.items():
            kline = _line_of(text, i, key)
            if key not in params or key in ("options",):
                raise UsageError(
                    f"{path}:{kline}: step {name!r} ({kind}) has no option {key!r}",
                    hint=f"{kind} takes: {', '.join(k for k in params if k not in ('format',))}",
                )
            opts[key] = _substitute(value, variables, f"{path}:{kline}")
        for pname, p in params.items():
            if p.default is pyinspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                if pname not in opts:
                    raise UsageError(f"{where}: step {name!r} ({kind}) needs {pname!r}")
        for key in PATH_KEYS:
            if key not in opts:
                continue
            values = opts[key] if isinstance(opts[key], list) else [opts[key]]
            resolved = []
            for v in values:
                if not isinstance(v, str):
                    raise UsageError(f'{path}:{_line_of(text, i, key)}: {key} must be a path or "@step"')
                if v.startswith("@"):
                    ref = names.get(v[1:])
                    if ref is None:
                        raise UsageError(
                            f"{path}:{_line_of(text, i, key)}: step {name!r} uses {v!r}, which is not an "
                            "earlier step's name"
                        )
                    if ref.output is None:
                        raise UsageError(
                            f"{path}:{_line_of(text, i, key)}: step {v[1:]!r} ({ref.kind}) writes no output"
                        )
                    resolved.append(ref.output)
                    continue
                p = Path(v)
                full = p if p.is_absolute() else folder / p
                if not full.exists():
                    if _is_hub_ref(v):
                        resolved.append(v)
                        continue
                    raise UsageError(
                        f"{path}:{_line_of(text, i, key)}: step {name!r}: input {v!r} does not exist"
                    )
                resolved.append(str(full))
            opts[key] = resolved if isinstance(opts[key], list) else resolved[0]
        if "output" in opts:
            out = Path(str(opts["output"]))
            full = out if out.is_absolute() else folder / out
            _refuse_inputs(full, path, name, _line_of(text, i, "output"), opts)
            if str(full) in outputs:
                raise UsageError(
                    f"{path}:{_line_of(text, i, 'output')}: steps {outputs[str(full)].name!r} and {name!r} write the same output"
                )
            if full.exists() and not opts.get("force"):
                raise UsageError(
                    f"{path}:{_line_of(text, i, 'output')}: step {name!r}: output {full} already exists",
                    hint="remove it, or set force = true in the step",
                )
            opts["output"] = str(full)
        step = Step(i, name, kind, opts, line)
        names[name] = step
        if step.output:
            outputs[step.output] = step
        steps.append(step)
    return Recipe(path, steps, variables)


def _refuse_inputs(output: Path, recipe: Path, step: str, line: int, opts: Mapping[str, Any]) -> None:
    """A step's output may not be, contain or lie inside the recipe's own file or the step's local
    inputs, ``force`` or not: refused before any step runs."""
    from .io.atomic import refuse_inputs

    inputs = [recipe]
    for key in PATH_KEYS:
        values = opts.get(key)
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, str) and Path(v).is_absolute():  # a local input (resolved above), not a Hub id
                inputs.append(Path(v))
    try:
        refuse_inputs(output, inputs)
    except LoractlError as e:
        raise UsageError(f"{recipe}:{line}: step {step!r}: {e.message}", hint=e.hint) from None


def run(
    recipe: Recipe, *, dry_run: bool = False, on_step: Callable[[StepReport], None] | None = None
) -> RunResult:
    """Run the steps in order; a failed step stops the recipe (finished steps' outputs stay).

    A ``check`` step whose adapter fails its checks fails the recipe with exit code 1.
    """
    from .io.atomic import protecting

    result = RunResult(str(recipe.path), dry_run, ok=True)
    failed = False
    for step in recipe.steps:
        report = StepReport(step.name, step.kind, "planned" if dry_run else "skipped", step.output)
        if dry_run or failed:
            result.steps.append(report)
            continue
        fn = _api_function(step.kind)
        t0 = time.perf_counter()
        try:
            if step.output:  # recipes lay out their own output folders
                Path(step.output).parent.mkdir(parents=True, exist_ok=True)
            with protecting([recipe.path]):  # no step may write over the recipe itself
                out = fn(**step.options)
            report.result = out
            if step.kind == "check" and not out.ok:
                raise CheckFailedError(
                    f"step {step.name!r}: {sum(f.severity == 'error' for f in out.findings)} check finding(s) failed"
                )
            report.status = "ok"
            report.result = out
        except LoractlError as e:
            report.status, report.exit_code, report.message = "failed", e.exit_code, e.message
            failed = True
            result.ok = False
        report.seconds = time.perf_counter() - t0
        result.steps.append(report)
        if on_step is not None:
            on_step(report)
    return result
