"""The shape of the package: no two modules of loractl import each other, directly or around a loop.

Read from the source (``ast``), so a cycle is found whether or not its imports ever run: an import
inside a function (a "lazy" import, often added to dodge the ImportError a cycle causes at import
time) counts as much as one at the top of the module. Imports under ``if TYPE_CHECKING:`` do not
count: they never run.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import loractl

ROOT = Path(loractl.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of loractl: dotted name -> file (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["loractl", *path.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str, path: Path, *, lazy: bool) -> dict[str, int]:
    """The loractl modules ``module`` imports -> the line of the first such import.

    With ``lazy``, imports inside functions and classes count too; without, only those that run
    when the module is imported (at the top level, also under ``if``/``try``).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in MODULES and target != module:
            found.setdefault(target, line)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if _is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    add(
                        f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source,
                        node.lineno,
                    )
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not lazy:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    visit(block)

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return found


def _cycle(lazy: bool, skip_ancestors: bool) -> str | None:
    """One import cycle among loractl's modules, spelled out with the lines of its imports; None if none."""
    graph = {m: _imports(m, p, lazy=lazy) for m, p in MODULES.items()}
    if skip_ancestors:  # `from . import __version__` in a submodule: its package has run before it anyway
        graph = {
            m: {t: n for t, n in edges.items() if not m.startswith(t + ".")} for m, edges in graph.items()
        }
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        loop = e.args[1][::-1]  # graphlib lists it against the direction of the imports
        return " -> ".join(f"{a} (line {graph[a][b]} imports {b})" for a, b in zip(loop, loop[1:]))
    return None


def test_the_module_walk_sees_known_imports() -> None:
    """The walk itself: it finds imports at the top, inside functions, and skips TYPE_CHECKING ones."""
    assert "loractl.io.safetensors" in _imports("loractl.io.base", MODULES["loractl.io.base"], lazy=False)
    api_lazy = _imports("loractl", MODULES["loractl"], lazy=True)
    assert "loractl.api" in api_lazy and "loractl.api" not in _imports(
        "loractl", MODULES["loractl"], lazy=False
    )
    assert "loractl.errors" in _imports("loractl.io.hub", MODULES["loractl.io.hub"], lazy=False)
    # io/quant names io/base's BaseModel in annotations only, under `if TYPE_CHECKING:`
    assert "TYPE_CHECKING" in MODULES["loractl.io.quant"].read_text()
    assert "loractl.io.base" not in _imports("loractl.io.quant", MODULES["loractl.io.quant"], lazy=True)


def test_no_import_cycle_when_modules_are_imported() -> None:
    assert _cycle(lazy=False, skip_ancestors=False) is None


def test_io_base_and_io_hub_depend_one_way() -> None:
    """io/base opens Hub references with io/hub; io/hub takes the layout names from io/names, not io/base."""
    assert "loractl.io.hub" in _imports("loractl.io.base", MODULES["loractl.io.base"], lazy=False)
    assert "loractl.io.base" not in _imports("loractl.io.hub", MODULES["loractl.io.hub"], lazy=True)


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    """A lazy import hides a cycle from Python, not from the reader: none either.

    Only a module importing from its own package is let through (``from . import __version__``
    in ``loractl.api`` while ``loractl/__init__.py`` re-exports the api lazily, PEP 562): Python
    runs a package before any of its modules, so that edge adds no order of its own.
    """
    assert _cycle(lazy=True, skip_ancestors=True) is None


#: the longest a function of loractl may be, in lines from ``def`` to its last line (issue #12)
MAX_FUNCTION_LINES = 100


def test_no_function_is_longer_than_a_screenful() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == [], "\n".join(long)


def test_the_length_rule_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    node = ast.parse(f"def f():\n{body}\n").body[0]
    assert node.end_lineno - node.lineno + 1 == MAX_FUNCTION_LINES + 1
