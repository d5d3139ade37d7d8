"""Defaults for every command from ``[tool.loractl]`` in ./pyproject.toml or from ./loractl.toml.

```toml
[tool.loractl]          # in pyproject.toml (in loractl.toml: the same keys at the top level)
force = false           # a plain key applies to every command that has the option
[tool.loractl.merge]
dtype = "bf16"          # per command; option names as on the command line (dashes or underscores)
shard-size = "5GB"
```

Options given on the command line win over these defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_defaults(folder: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The raw ``[tool.loractl]`` table (or loractl.toml's top level) and the file it came from."""
    folder = folder or Path.cwd()
    own = folder / "loractl.toml"
    proj = folder / "pyproject.toml"
    for path in (own, proj):
        if not path.is_file():
            continue
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"{path}: not valid TOML ({e})", hint="fix it or remove it") from None
        table = doc if path == own else doc.get("tool", {}).get("loractl")
        if table:
            if not isinstance(table, dict):
                raise UsageError(f"{path}: [tool.loractl] must be a table")
            return table, path
    return {}, None


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
