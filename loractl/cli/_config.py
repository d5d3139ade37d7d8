"""Defaults for every command from ``[tool.loractl]`` in ./pyproject.toml or from ./loractl.toml.

```toml
[tool.loractl]          # in pyproject.toml (in loractl.toml: the same keys at the top level)
receipt = false         # a plain key applies to every command that has the option
[tool.loractl.merge]
dtype = "bf16"          # per command; option names as on the command line (dashes or underscores)
shard-size = "5GB"
```

Options given on the command line win over these defaults. A config file is found in the current
folder, which may be a repository just cloned: it may set how loractl works, never what it trusts.
``allow-pickle`` (reading pickles) and ``force`` (replacing an existing output) are refused there:
only the person typing the command can give them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import LoractlError, UsageError

#: options only the command line may give (see the module's docstring)
COMMAND_LINE_ONLY = {
    "allow_pickle": "a config file in the current folder must not turn pickle reading on",
    "force": "a config file in the current folder must not let commands replace existing outputs",
}


def read_defaults(folder: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The raw ``[tool.loractl]`` table (or loractl.toml's top level) and the file it came from."""
    from ..io.files import MAX_TOML_BYTES, loads_toml, read_regular

    folder = folder or Path.cwd()
    own = folder / "loractl.toml"
    proj = folder / "pyproject.toml"
    for path in (own, proj):
        if not path.is_file():  # none here (a folder, a FIFO or a device is not a config file either)
            continue
        try:
            text = read_regular(path, "config file", limit=MAX_TOML_BYTES).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text (byte {e.start})", hint="fix it or remove it") from None
        except LoractlError as e:  # a folder, a FIFO, a link to a device, too large, unreadable
            raise UsageError(e.message, hint="fix it or remove it") from None
        doc = loads_toml(text, path, hint="fix it or remove it")
        tool = doc.get("tool", {}) if path == proj else {}
        table = doc if path == own else tool.get("loractl") if isinstance(tool, dict) else None
        if table:
            if not isinstance(table, dict):
                raise UsageError(f"{path}: [tool.loractl] must be a table")
            _refuse_trust(table, path, text)
            return table, path
    return {}, None


def _refuse_trust(table: dict[str, Any], path: Path, text: str) -> None:
    """Raise on an option of :data:`COMMAND_LINE_ONLY`, at any level of the table."""
    items = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
    items += [(k, v) for sub in table.values() if isinstance(sub, dict) for k, v in sub.items()]
    for key, _value in items:
        why = COMMAND_LINE_ONLY.get(key.replace("-", "_"))
        if why is None:
            continue
        flag = "--" + key.replace("_", "-")
        line = next(
            (
                i
                for i, line in enumerate(text.splitlines(), 1)
                if re.match(rf"""\s*["']?{re.escape(key)}["']?\s*=""", line)
            ),
            None,
        )
        raise UsageError(
            f"{path}{f':{line}' if line else ''}: {key} cannot be set in a config file ({why})",
            hint=f"pass {flag} on the command line instead, and remove it from {path.name}",
        )


def default_map(table: dict[str, Any], command_params: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """click's ``default_map``: {command: {param name: value}} from the config table.

    Raises:
        UsageError: a key that is neither a command nor an option of any command.
    """
    out: dict[str, dict[str, Any]] = {}
    all_params = set().union(*command_params.values()) if command_params else set()
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in command_params:
                raise UsageError(f"[tool.loractl.{key}]: loractl has no command {key!r}")
            for k, v in value.items():
                name = k.replace("-", "_")
                if name not in command_params[key]:
                    raise UsageError(f"[tool.loractl.{key}]: {key} has no option {k!r}")
                out.setdefault(key, {})[name] = v
        else:
            name = key.replace("-", "_")
            if name not in all_params:
                raise UsageError(f"[tool.loractl]: no command has an option {key!r}")
            for cmd, params in command_params.items():
                if name in params:
                    out.setdefault(cmd, {}).setdefault(name, value)
    return out
