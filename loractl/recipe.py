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

Option names are the command-line option names (``--shard-size`` is ``shard-size`` or
``shard_size``); each value must have the type of the api function's parameter (``rank = 4``, not
``"4"``) and be one of its choices where it has them. A value that is exactly ``"${name}"`` takes
that type (``rank = "${r}"``). Relative paths are taken from the recipe file's folder, except a path
that starts with a variable given by ``--set``: that one is the caller's, from the current folder.
Defaults from ``[tool.loractl]`` apply to steps as they do to commands; a step's own values win.
``allow-pickle`` cannot be set in a recipe: ``loractl run --allow-pickle`` gives it to every step.
"""

from __future__ import annotations

import datetime
import inspect as pyinspect
import math
import os
import re
import time
import types
from collections import abc
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import CheckFailedError, LoractlError, UsageError

STEP_KINDS = ("check", "truncate", "combine", "convert", "merge", "inspect")
PATH_KEYS = ("adapter", "adapters", "base")
#: options a recipe or a config file may not turn on: only the person at the command line can
#: (``--allow-pickle``; for ``loractl run`` it then applies to every step)
TRUSTED_BY_FLAG = ("allow_pickle",)
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _is_hub_ref(text: str) -> bool:
    try:
        from .io.hub import is_hub_ref
    except ImportError:  # pragma: no cover - hub support not installed
        return False
    return is_hub_ref(text)


def _params(fn: Callable[..., Any]) -> dict[str, pyinspect.Parameter]:
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
    functions: Mapping[str, Callable[..., Any]] = field(default_factory=dict)  # step kind -> api function


@dataclass
class StepReport:
    name: str
    kind: str
    status: str  # "ok", "failed", "skipped", "planned"
    output: str | None
    seconds: float = 0.0
    exit_code: int = 0
    message: str | None = None
    hint: str | None = None
    result: Any = None


@dataclass
class RunResult:
    recipe: str
    dry_run: bool
    ok: bool
    steps: list[StepReport] = field(default_factory=list)


def _key_line(text: str, header: str, index: int, key: str | None = None) -> int:
    """1-based line of the ``index``-th table whose header matches ``header`` (``[[step]]``,
    ``[vars]``), or of ``key = ...`` inside it (``key`` as written, dashes or underscores)."""
    lines = text.splitlines()
    seen = -1
    start = 0
    for i, line in enumerate(lines):
        if re.match(header, line):
            seen += 1
            if seen == index:
                start = i
                break
    if key is None:
        return start + 1
    for j in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[j]):
            break
        if re.match(rf"""^\s*["']?{re.escape(key)}["']?\s*=""", lines[j]):
            return j + 1
    return start + 1


_STEP_HEADER = r"^\s*\[\[\s*step\s*\]\]"
_VARS_HEADER = r"^\s*\[\s*vars\s*\]"


def _line_of(text: str, step_index: int, key: str | None = None) -> int:
    """1-based line of the ``step_index``-th ``[[step]]`` table (or of ``key`` inside it)."""
    return _key_line(text, _STEP_HEADER, step_index, key)


# --------------------------------------------------------------------------------------------
# values: ${var} substitution, then the type the api function's annotation asks for
# --------------------------------------------------------------------------------------------
class _Bad(Exception):
    """A value that does not fit its option; the caller names the file, line and key.

    ``suggest``: the value as it should be written (``4`` for ``"4"``), when there is one.
    """

    def __init__(self, reason: str, suggest: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.suggest = suggest

    def hint(self, key: str) -> str | None:
        return f"write {key} = {self.suggest} (without quotes)" if self.suggest is not None else None


def _choices(kind: str, key: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The values an enum-like option takes, from the constants the api itself checks against:
    (what the api accepts, what an error message lists)."""
    from . import checks
    from .formats import FORMATS
    from .io.layout import DTYPES
    from .ops.combine import COMBINE_METHODS
    from .ops.truncate import DYLORA_CONVENTIONS

    if key == "target":  # check() also takes llamacpp, llama-cpp... in any case
        return checks.TARGETS + tuple(checks._TARGET_ALIASES), checks.TARGETS
    if key == "dtype":
        dtypes = tuple(DTYPES) if kind == "merge" else tuple(k for k in DTYPES if k != "auto")
        return dtypes, dtypes
    table: dict[str, tuple[str, ...]] = {
        "format": FORMATS,
        "to": FORMATS,
        "method": COMBINE_METHODS,
        "majority_sign": ("total", "frequency"),
        "dylora_convention": DYLORA_CONVENTIONS,
    }
    return (table[key], table[key]) if key in table else None


def _members(hint: Any) -> list[Any]:
    """The types of a union annotation (``int | None`` -> [int, NoneType])."""
    if get_origin(hint) in (Union, types.UnionType):
        return [m for a in get_args(hint) for m in _members(a)]
    return [hint]


def _sequence_of(members: list[Any]) -> Any | None:
    """The element type of a ``Sequence[X]`` / ``list[X]`` member, or None."""
    for m in members:
        if get_origin(m) in (list, Sequence, abc.Sequence):
            return get_args(m)[0] if get_args(m) else Any
    return None


def _wanted(members: list[Any]) -> str:
    """What a value of this annotation looks like, in TOML words."""
    words = []
    if bool in members:
        words.append("true or false")
    if int in members:
        words.append("an integer")
    if float in members and int not in members:
        words.append("a number")
    if Path in members:
        words.append("a path")
    elif str in members:
        words.append("a string")
    elem = _sequence_of(members)
    if elem is not None:
        inner = _wanted(_members(elem))
        words.append(
            "a list of "
            + {"a number": "numbers", "a path": "paths", "an integer": "integers"}.get(inner, inner)
        )
    return " or ".join(words) or "a value loractl can take from a recipe"


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if math.isfinite(value) else f"the non-finite number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return f"the TOML date/time {value.isoformat()}"
    return type(value).__name__


def _from_text(text: str, members: list[Any]) -> Any:
    """A ``${var}`` value (text) as the annotated type, or _Bad."""
    if str in members or Path in members:
        return text
    if bool in members and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if int in members and re.fullmatch(r"\s*[+-]?\d+\s*", text):
        return int(text)
    if float in members:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise _Bad(f"is {text!r}, not {_wanted(members)}")


def _typed(value: Any, hint: Any, *, whole_var: bool = False) -> Any:
    """``value`` checked against the annotation ``hint``; a whole ``${var}`` text is converted.

    TOML values must already have the type (``rank = 4``, not ``rank = "4"``); an integer is
    accepted where a float is; booleans are never numbers.
    """
    members = _members(hint)
    if whole_var and isinstance(value, str):
        return _from_text(value, members)
    if isinstance(value, bool):
        if bool in members:
            return value
    elif isinstance(value, int):
        if int in members:
            return value
        if float in members:
            return float(value)
    elif isinstance(value, float):
        if float in members and math.isfinite(value):
            return value
    elif isinstance(value, str):
        if str in members or Path in members:
            return value
    suggest = None
    if isinstance(value, str):
        try:
            suggest = _text_of(_from_text(value, members))
        except _Bad:
            pass
    raise _Bad(f"must be {_wanted(members)}, not {_toml_type(value)}", suggest)


def _text_of(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _substitute(value: str, variables: Mapping[str, Any], where: str) -> tuple[Any, bool]:
    """``value`` with every ``${name}`` replaced; (result, whether ``value`` was exactly one ``${name}``).

    A whole ``"${name}"`` gives the variable's own value (a number stays a number); inside a longer
    string a variable is spliced in as text.
    """

    def known(name: str) -> Any:
        if name not in variables:
            raise UsageError(
                f"{where}: unknown variable ${{{name}}}", hint="define it in [vars] or with --set"
            )
        return variables[name]

    whole = VAR_RE.fullmatch(value)
    if whole:
        return known(whole[1]), True
    return VAR_RE.sub(lambda m: _text_of(known(m[1])), value), False


def _starts_with_cli_var(value: str, cli_names: Collection[str]) -> bool:
    """Whether ``value`` begins with a ``${name}`` given by ``--set`` (then a path is the caller's)."""
    m = VAR_RE.match(value)
    return bool(m and m.start() == 0 and m[1] in cli_names)


def _variables_used(steps: list[Any]) -> set[str]:
    used: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, str):
            used.update(VAR_RE.findall(v))
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(steps)
    return used


def _decode(path: Path, data: bytes) -> str:
    """The recipe's text; a byte order mark (Windows editors) is dropped.

    Raises:
        UsageError: bytes that are not UTF-8, naming the line and column.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        col = len(data[start : e.start].decode("utf-8", "replace")) + 1
        raise UsageError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col})",
            hint="save the recipe as UTF-8",
        ) from None


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The recipe's text and its TOML document, with only ``[vars]`` and ``[[step]]`` at the top."""
    from .io.files import MAX_TOML_BYTES, loads_toml, read_regular

    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such recipe")
    text = _decode(path, read_regular(path, "recipe", limit=MAX_TOML_BYTES))
    doc = loads_toml(text, path)
    unknown_top = set(doc) - {"vars", "step"}
    if unknown_top:
        raise UsageError(
            f"{path}: unknown top-level key {sorted(unknown_top)[0]!r}; a recipe has [vars] and [[step]]"
        )
    return text, doc


def _variables(path: Path, text: str, doc: dict[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """``[vars]`` (strings, numbers, booleans) with the ``--set`` values, each the name of a variable
    the recipe defines or uses."""
    raw = doc.get("vars") or {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: vars must be a table: [vars]")
    variables: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(v, (str, int, float)):  # bool is an int
            raise UsageError(
                f"{path}:{_key_line(text, _VARS_HEADER, 0, k)}: [vars] {k} must be a string, number or "
                f"boolean, not {_toml_type(v)}"
            )
        variables[k] = v
    known = set(variables) | _variables_used(doc.get("step") or [])
    for k, v in overrides.items():
        if k not in known:
            listed = ", ".join(sorted(known))
            raise UsageError(
                f"--set {k}={v}: {path} has no variable {k!r}",
                hint=f"its variables: {listed}" if listed else "it uses no ${name} variables",
            )
        variables[k] = v
    return variables


def _defaults_for(
    kind: str, table: Mapping[str, Any], params: Mapping[str, Any], hints: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``[tool.loractl]`` defaults that apply to a step of ``kind``, checked as a step's values."""
    opts: dict[str, Any] = {}
    for k, v in table.items():
        key = k.replace("-", "_")
        if key not in params:
            continue
        if key in TRUSTED_BY_FLAG:
            raise UsageError(
                f"[tool.loractl]: {k} cannot be set in a config file", hint=f"pass --{k.replace('_', '-')}"
            )
        try:
            opts[key] = _checked(kind, key, v, hints[key])
        except _Bad as e:
            raise UsageError(f"[tool.loractl.{kind}]: {k} {e.reason}", hint=e.hint(k)) from None
    return opts


def load(
    path: str | Path,
    *,
    steps: Mapping[str, Callable[..., Any]],
    overrides: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
) -> Recipe:
    """Parse and validate a recipe; nothing runs.

    Every value is checked against the type of the api function's parameter it goes to (``rank``
    an integer, ``weights`` a list of numbers, ``dtype`` one of its choices...). A string that is
    exactly ``"${name}"`` is replaced by the variable's value and converted to that type
    (``rank = "${r}"`` with ``--set r=2``). Relative paths written in the recipe are taken from the
    recipe's folder; a path that starts with a variable given by ``--set`` is taken from the
    current folder, where the user typed it.

    Args:
        path: the TOML file.
        steps: the function of each step kind (``loractl.api.STEPS``): its parameters and their
            annotations are what a step may say.
        overrides: ``--set name=value`` pairs (variables); each must be a variable of the recipe.
        defaults: ``[tool.loractl]`` defaults, per command (``{"merge": {"dtype": "bf16"}}``).
        allow_pickle: accept pickle adapters in every step (``loractl run --allow-pickle``); a
            recipe cannot turn this on itself.

    Raises:
        UsageError: unreadable or non-UTF-8 TOML, an unknown step kind or key, a value of the wrong
            type or not among its choices, ``allow-pickle`` in a step, a missing required key or
            input, a reference to an unknown or later step, two steps writing the same output, an
            unknown ``--set`` name; each names the recipe's file and line.
    """
    path = Path(path)
    text, doc = _read_toml(path)
    raw_steps = doc.get("step") or []
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f"{path}: no [[step]] tables: nothing to run")
    variables = _variables(path, text, doc, overrides or {})
    reader = _StepReader(path, text, variables, set(overrides or {}), defaults or {}, allow_pickle, steps)
    for i, raw in enumerate(raw_steps):
        reader.read(i, raw)
    _refuse_other_steps_inputs(path, reader.steps)
    return Recipe(path, reader.steps, {k: _text_of(v) for k, v in variables.items()}, steps)


@dataclass
class _StepReader:
    """Reads the ``[[step]]`` tables of one recipe in order, each against the steps before it."""

    path: Path
    text: str
    variables: Mapping[str, Any]
    cli_names: Collection[str]
    defaults: Mapping[str, Any]
    allow_pickle: bool
    functions: Mapping[str, Callable[..., Any]]
    steps: list[Step] = field(default_factory=list)
    names: dict[str, Step] = field(default_factory=dict)
    outputs: dict[str, Step] = field(default_factory=dict)

    def at(self, i: int, key: str | None = None) -> str:
        """``file:line`` of step ``i`` (or of its ``key``)."""
        return f"{self.path}:{_line_of(self.text, i, key)}"

    def read(self, i: int, raw: Any) -> None:
        """Validate step ``i`` and add it."""
        if not isinstance(raw, dict):
            raise UsageError(f"{self.at(i)}: step {i + 1} must be a table: [[step]]")
        spelled = self._spelled(i, raw)
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        kind = raw.pop("run", None)
        if kind not in STEP_KINDS:
            raise UsageError(f"{self.at(i)}: step {i + 1} has run = {kind!r}; one of {', '.join(STEP_KINDS)}")
        name = raw.pop("name", f"{kind}{i + 1}")
        if not isinstance(name, str) or not name.strip():
            raise UsageError(
                f"{self.at(i, spelled['name'])}: step {i + 1}: name must be a non-empty string, not {_toml_type(name)}"
            )
        if name in self.names:
            raise UsageError(f"{self.at(i)}: two steps are named {name!r}")
        opts, from_cli = self._options(i, kind, name, raw, spelled)
        for key in PATH_KEYS:
            if key in opts:
                opts[key] = self._inputs(i, name, key, opts[key], from_cli.get(key), spelled)
        if "output" in opts:
            opts["output"] = self._output(i, name, opts, (from_cli.get("output") or [False])[0], spelled)
        step = Step(i, name, kind, opts, _line_of(self.text, i))
        self.names[name] = step
        if step.output:
            self.outputs[step.output] = step
        self.steps.append(step)

    def _spelled(self, i: int, raw: dict[str, Any]) -> dict[str, str]:
        """Option name -> the key as written (for its line); the same option twice is an error."""
        spelled: dict[str, str] = {}
        for k in raw:
            key = k.replace("-", "_")
            if key in spelled:
                raise UsageError(f"{self.at(i, k)}: step {i + 1} sets {spelled[key]!r} and {k!r}")
            spelled[key] = k
        return spelled

    def _options(
        self, i: int, kind: str, name: str, raw: dict[str, Any], spelled: dict[str, str]
    ) -> tuple[dict[str, Any], dict[str, list[bool]]]:
        """The step's options, checked against the api function's parameters and their types, and
        for each which items start with a ``--set`` variable."""
        fn = self.functions[kind]
        params = _params(fn)
        hints = _hints(fn)
        label = f"step {name!r} ({kind})"
        opts = _defaults_for(kind, self.defaults.get(kind, {}), params, hints)
        from_cli: dict[str, list[bool]] = {}
        for key, value in raw.items():
            k = spelled[key]
            kwhere = self.at(i, k)
            if key in TRUSTED_BY_FLAG:
                raise UsageError(
                    f"{kwhere}: {label}: {k} cannot be set in a recipe",
                    hint=f"pass --{key.replace('_', '-')} to loractl run: it then applies to every step",
                )
            if key not in params or key in ("options",):
                takes = ", ".join(p.replace("_", "-") for p in params if p not in ("format", *TRUSTED_BY_FLAG))
                raise UsageError(f"{kwhere}: {label} has no option {k!r}", hint=f"{kind} takes: {takes}")
            try:
                opts[key], from_cli[key] = _value(kind, key, value, hints[key], self.variables, self.cli_names, kwhere)
            except _Bad as e:
                raise UsageError(f"{kwhere}: {label}: {k} {e.reason}", hint=e.hint(k)) from None
        if self.allow_pickle and "allow_pickle" in params:
            opts["allow_pickle"] = True
        for pname, p in params.items():
            if p.default is pyinspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                if pname not in opts:
                    raise UsageError(f"{self.at(i)}: {label} needs {pname!r}")
        return opts, from_cli

    def _inputs(
        self, i: int, name: str, key: str, value: Any, cli_flags: list[bool] | None, spelled: dict[str, str]
    ) -> Any:
        """A path option resolved: ``@step`` to that step's output, relative paths from the recipe's
        folder (or the current one, for a path that starts with a ``--set`` variable), Hub references kept."""
        where = self.at(i, spelled.get(key, key))
        values = value if isinstance(value, list) else [value]
        if not values:
            raise UsageError(f"{where}: step {name!r}: {key} is an empty list")
        resolved = []
        for v, given in zip(values, cli_flags or [False] * len(values)):
            if not isinstance(v, (str, Path)):
                raise UsageError(f'{where}: {key} must be a path or "@step"')
            v = str(v)
            if v.startswith("@"):
                ref = self.names.get(v[1:])
                if ref is None:
                    raise UsageError(f"{where}: step {name!r} uses {v!r}, which is not an earlier step's name")
                if ref.output is None:
                    raise UsageError(f"{where}: step {v[1:]!r} ({ref.kind}) writes no output")
                resolved.append(ref.output)
                continue
            p = Path(v)
            full = p if p.is_absolute() else (Path.cwd() if given else self.path.resolve().parent) / p
            try:
                found = os.path.lexists(full) and full.exists()
            except (OSError, ValueError) as e:  # a name too long, a NUL: no such input
                raise UsageError(f"{where}: step {name!r}: input {v!r} cannot be read ({getattr(e, 'strerror', None) or e})") from None
            if found:
                resolved.append(str(full))
            elif _is_hub_ref(v):
                resolved.append(v)
            else:
                raise UsageError(f"{where}: step {name!r}: input {v!r} does not exist")
        return resolved if isinstance(value, list) else resolved[0]

    def _output(self, i: int, name: str, opts: dict[str, Any], from_cli: bool, spelled: dict[str, str]) -> str:
        """The step's output, refused when it is an input, another step's output, or exists without force."""
        line = _line_of(self.text, i, spelled.get("output", "output"))
        where = f"{self.path}:{line}"
        out = Path(str(opts["output"]))
        full = out if out.is_absolute() else (Path.cwd() if from_cli else self.path.resolve().parent) / out
        _refuse_inputs(full, self.path, name, line, opts)
        _check_output_path(full, self.path, name, line)
        if str(full) in self.outputs:
            raise UsageError(f"{where}: steps {self.outputs[str(full)].name!r} and {name!r} write the same output")
        if full.exists() and not opts.get("force"):
            raise UsageError(
                f"{where}: step {name!r}: output {full} already exists",
                hint="remove it, or set force = true in the step",
            )
        return str(full)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    return get_type_hints(fn)


def _checked(kind: str, key: str, value: Any, hint: Any) -> Any:
    """One scalar or list value against its annotation and, for enum-like options, its choices."""
    elem = _sequence_of(_members(hint))
    if isinstance(value, list):
        if elem is None:
            raise _Bad(f"must be {_wanted(_members(hint))}, not a list")
        out_items = []
        for n, v in enumerate(value, 1):
            try:
                out_items.append(_typed(v, elem))
            except _Bad as e:
                raise _Bad(f"item {n} {e.reason}") from None
        return out_items
    out = _typed(value, hint)
    choices = _choices(kind, key)
    if choices is not None and out is not None:
        accepted, shown = choices
        if (out.lower() if key == "target" else out) not in accepted:
            raise _Bad(f"is {out!r}; one of {', '.join(shown)}")
    return out


def _value(
    kind: str,
    key: str,
    value: Any,
    hint: Any,
    variables: Mapping[str, Any],
    cli_names: Collection[str],
    where: str,
) -> tuple[Any, list[bool]]:
    """A step's value: ``${var}`` substituted, checked against ``hint``; and, per item, whether it
    starts with a ``--set`` variable (a path then taken from the current folder).

    Raises:
        _Bad: the value does not fit (the caller names the file, line and key).
    """
    is_list = isinstance(value, list)
    members = _members(hint)
    item_hint = _sequence_of(members) if is_list else hint
    if item_hint is None:
        raise _Bad(f"must be {_wanted(members)}, not a list")
    items: list[Any] = []
    given: list[bool] = []
    for item in value if is_list else [value]:
        given.append(isinstance(item, str) and _starts_with_cli_var(item, cli_names))
        if isinstance(item, str):
            source = item
            item, whole = _substitute(item, variables, where)
            if whole:
                try:
                    item = _typed(item, item_hint, whole_var=isinstance(item, str))
                except _Bad as e:
                    if isinstance(item, str) or not {str, Path} & set(_members(item_hint)):
                        raise _Bad(f'{"item " if is_list else "= "}"{source}" {e.reason}') from None
                    item = _text_of(item)  # a [vars] number where a path or name goes
        items.append(item)
    return _checked(kind, key, items if is_list else items[0], hint), given


def _missing_parents(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, outermost first."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing[::-1]


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed step created, innermost first, if they are still empty."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:  # not empty (a file the step did not make) or already gone: leave it
            return


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
        raise UsageError(f"{recipe}:{line}: step {step!r}: {e.message}", hint=e.cli_hint) from None


def _refuse_other_steps_inputs(recipe: Path, steps: Sequence[Step]) -> None:
    """No step's output may be, contain or lie inside a local input of any step (a later step's
    base as well as its own), other than an output of the recipe (``@step``, or a path a step
    writes): refused before any step runs."""
    from .io.atomic import refuse_inputs

    outputs = {s.output for s in steps if s.output}
    inputs: list[Path] = []
    for s in steps:
        for key in PATH_KEYS:
            values = s.options.get(key)
            for v in values if isinstance(values, list) else [values]:
                if isinstance(v, str) and Path(v).is_absolute() and v not in outputs:
                    inputs.append(Path(v))
    for s in steps:
        if s.output:
            try:
                refuse_inputs(Path(s.output), inputs)
            except LoractlError as e:
                raise UsageError(f"{recipe}:{s.line}: step {s.name!r}: {e.message}", hint=e.cli_hint) from None


def _check_output_path(output: Path, recipe: Path, step: str, line: int) -> None:
    """A step's output must have a name the filesystem takes, and a folder that is (or can be made)
    a folder: refused before any step runs."""
    from .io.atomic import check_folder, check_name

    try:
        check_name(output)
        check_folder(output, made=True)
    except LoractlError as e:
        raise UsageError(f"{recipe}:{line}: step {step!r}: {e.message}", hint=e.cli_hint) from None


def run(
    recipe: Recipe, *, dry_run: bool = False, on_step: Callable[[StepReport], None] | None = None
) -> RunResult:
    """Run the steps in order; a failed step stops the recipe (finished steps' outputs stay).

    A ``check`` step whose adapter fails its checks fails the recipe with exit code 1. A failed
    step's message names the recipe file and the step's line; the folders created for its output
    are removed again.
    """
    from .io.atomic import make_folders, protecting

    result = RunResult(str(recipe.path), dry_run, ok=True)
    failed = False
    for step in recipe.steps:
        report = StepReport(step.name, step.kind, "planned" if dry_run else "skipped", step.output)
        if dry_run or failed:
            result.steps.append(report)
            continue
        fn = recipe.functions[step.kind]
        t0 = time.perf_counter()
        created: list[Path] = []
        try:
            if step.output:  # recipes lay out their own output folders
                created = _missing_parents(Path(step.output).parent)
                make_folders(Path(step.output))
            with protecting([recipe.path]):  # no step may write over the recipe itself
                out = fn(**step.options)
            report.result = out
            if step.kind == "check" and not out.ok:
                raise CheckFailedError(f"{len(out.failures)} check finding(s) failed")
            report.status = "ok"
        except LoractlError as e:
            report.status, report.exit_code = "failed", e.exit_code
            report.message = f"{recipe.path}:{step.line}: step {step.name!r} ({step.kind}): {e.message}"
            report.hint = e.cli_hint
            failed = True
            result.ok = False
        finally:
            if report.status != "ok":
                _remove_empty(created)
        report.seconds = time.perf_counter() - t0
        result.steps.append(report)
        if on_step is not None:
            on_step(report)
    return result
