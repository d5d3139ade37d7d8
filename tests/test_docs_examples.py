"""The examples in docs/formats.md, docs/algebra.md and docs/ci.md run, so the docs cannot rot.

Per document, in a fresh copy of ``examples/`` (a folder holding ``tiny-llama/``,
``tiny-llama-lora/`` and ``recipe.toml``), in document order:

- every line of a ```` ```console ```` block that starts with ``$ loractl`` is run, and its exit code
  must be 0, or N when the line ends with a ``# exit N`` comment. Commands run in-process through the
  console-script entry point (``loractl.cli.app.run``, what ``main`` runs, so ``[tool.loractl]`` defaults are read from
  the folder as they would be), which keeps the whole module well under 40 s. ``> FILE`` writes stdout
  to FILE; ``| CMD`` pipes stdout into ``CMD`` run by bash (skipped when CMD's program, e.g. ``jq``, is
  not installed), which must then exit 0. A ``$ jq ...`` line (reading a file an earlier command
  wrote) is run by bash and must exit 0, when jq is installed;
- a ```` ```toml ```` block whose first line is ``# file: NAME`` is written to NAME (recipes and
  ``pyproject.toml`` examples are thus used by the commands that follow); every TOML block must parse,
  ``[tool.loractl]`` tables must name real commands and options, and ``[[step]]`` recipes must load.

docs/ci.md's ```` ```yaml ```` blocks must parse with PyYAML (skipped if it is not installed), and every
``loractl`` command in their ``run:`` / ``script:`` lines must parse against the real CLI.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
RUN_DOCS = ("formats.md", "algebra.md", "ci.md")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
EXIT = re.compile(r"\bexit\s+(\d+)\b")


# ------------------------------------------------------------------------------------------------
# reading the docs
# ------------------------------------------------------------------------------------------------
def fenced_blocks(doc: Path) -> list[tuple[str, str, int]]:
    """``(language, body, line)`` of every fenced block, in document order."""
    text = doc.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang = m[1].strip().split(" ")[0] if m[1].strip() else ""
        out.append((lang, m[2], text.count("\n", 0, m.start()) + 1))
    return out


def _unquoted(text: str, chars: str) -> list[tuple[int, str]]:
    """Positions of ``chars`` outside single and double quotes (``#`` only where a comment starts)."""
    found, quote = [], None
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in chars and (c != "#" or i == 0 or text[i - 1].isspace()):
            found.append((i, c))
    return found


def parse_line(line: str) -> tuple[list[str], str | None, str | None, int]:
    """A ``$ loractl ...`` line as (loractl arguments, ``> FILE`` target, ``| CMD`` consumer, expected exit)."""
    body = line[2:].strip()
    expected = 0
    hashes = _unquoted(body, "#")
    if hashes:
        i = hashes[0][0]
        m = EXIT.search(body[i:])
        if m:
            expected = int(m[1])
        body = body[:i].rstrip()
    redirect = consumer = None
    ops = _unquoted(body, "|>")
    if ops:
        i, op = ops[0]
        rest = body[i + 1 :].strip()
        body = body[:i].rstrip()
        if op == "|":
            if rest.startswith("|"):
                raise AssertionError(f"{line!r}: '||' is not supported in doc examples")
            consumer = rest
        else:
            redirect = rest
            assert redirect and not _unquoted(redirect, "|>"), f"{line!r}: only '> FILE' is supported"
    args = shlex.split(body)
    assert args and args[0] == "loractl", line
    return args[1:], redirect, consumer, expected


def console_lines(body: str) -> list[str]:
    return [ln.rstrip() for ln in body.splitlines() if ln.startswith(("$ loractl ", "$ jq "))]


# ------------------------------------------------------------------------------------------------
# running loractl in-process, as the console script
# ------------------------------------------------------------------------------------------------
def run_loractl(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """``loractl ARGS`` run in ``cwd`` as the console script does (without leaving the process):
    (exit code, stdout, stderr)."""
    from loractl.cli.app import run

    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", ["loractl", *args])
        with redirect_stdout(out), redirect_stderr(err):
            result = run()
            code = result if isinstance(result, int) else (0 if result is None else 1)
    return code, out.getvalue(), err.getvalue()


def run_doc_line(line: str, where: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if line.startswith("$ jq "):
        if shutil.which("jq") is not None:
            res = subprocess.run(["bash", "-c", line[2:]], cwd=cwd, capture_output=True, text=True)
            assert res.returncode == 0, f"{where}: {line}\nexit {res.returncode}: {res.stderr}"
        return
    args, redirect, consumer, expected = parse_line(line)
    code, out, err = run_loractl(args, cwd, monkeypatch)
    assert code == expected, (
        f"{where}: {line}\nexit {code}, the doc says {expected}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    )
    if redirect:
        (cwd / redirect).write_text(out)
    if consumer:
        program = shlex.split(consumer)[0]
        if shutil.which(program) is None:
            return  # e.g. jq not installed: the loractl part was still checked
        res = subprocess.run(["bash", "-c", consumer], input=out, cwd=cwd, capture_output=True, text=True)
        assert res.returncode == 0, (
            f"{where}: {line}\n'{consumer}' exited {res.returncode}: {res.stderr}\n--- loractl stdout\n{out[-3000:]}"
        )


# ------------------------------------------------------------------------------------------------
# TOML blocks
# ------------------------------------------------------------------------------------------------
def check_toml(body: str, where: str, cwd: Path) -> None:
    """Parse a TOML block; write it when it names its file; validate config tables and recipes."""
    from loractl.cli._config import default_map

    doc = tomllib.loads(body)
    first = body.splitlines()[0] if body.strip() else ""
    m = re.match(r"#\s*file:\s*(\S+)\s*$", first)
    name = m[1] if m else None
    table: Any = doc.get("tool", {}).get("loractl") if "tool" in doc else None
    if name == "loractl.toml":
        table = doc
    if table is not None:
        from typer.main import get_command

        from loractl.cli.app import app

        cmd = get_command(app)
        params = {n: {p.name for p in sub.params if p.name} for n, sub in cmd.commands.items()}  # type: ignore[attr-defined]
        default_map(table, params)  # raises on a key that is no command or option
    if name is not None:
        target = cwd / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
        if "step" in doc:
            from loractl import api, recipe

            recipe.load(target, steps=api.STEPS)  # validates steps, options, references and inputs (runs nothing)
    elif "step" in doc:
        assert "vars" in doc or doc["step"], where


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder holding copies of tiny-llama/, tiny-llama-lora/ and recipe.toml, as the docs assume."""
    import torch

    work = tmp_path / "examples"
    work.mkdir()
    for name in ("tiny-llama", "tiny-llama-lora"):
        shutil.copytree(EXAMPLES / name, work / name)
    shutil.copy2(EXAMPLES / "recipe.toml", work / "recipe.toml")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LORACTL_DEBUG", raising=False)
    # the matrices are tiny: one torch thread is several times faster than many on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield work
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", RUN_DOCS)
def test_doc_console_examples_run(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = DOCS / name
    ran = 0
    for lang, body, line in fenced_blocks(doc):
        where = f"docs/{name}:{line}"
        if lang == "toml":
            check_toml(body, where, workdir)
        elif lang == "console":
            for cmd in console_lines(body):
                run_doc_line(cmd, where, workdir, monkeypatch)
                ran += 1
    assert ran >= 3, f"docs/{name}: expected runnable '$ loractl' examples, found {ran}"


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script (continuations joined, split at | || && ; > <)."""
    script = script.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:  # an unterminated quote in a non-loractl line (e.g. a jq program over lines)
            continue
        current: list[str] = []
        for tok in tokens:
            if tok and set(tok) <= set("|&;<>()"):
                if current:
                    commands.append(current)
                current = []
                if tok in (">", ">>", "<", "2>"):
                    current = ["__redirect__"]
            else:
                current.append(tok)
        if current:
            commands.append(current)
    out = []
    for c in commands:
        while c and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", c[0]):  # VAR=value before the command
            c = c[1:]
        if c and c[0] != "__redirect__":
            out.append(c)
    return out


def _scripts(node: Any) -> list[str]:
    """Every ``run:`` (GitHub Actions) and ``script:`` / ``before_script:`` (GitLab CI) string."""
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("run", "script", "before_script", "after_script"):
                found.extend([v] if isinstance(v, str) else [s for s in v if isinstance(s, str)])
            else:
                found.extend(_scripts(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_scripts(v))
    return found


def test_ci_yaml_parses_and_its_loractl_commands_exist() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: docs/ci.md's YAML is not checked")
    from typer.main import get_command

    from loractl.cli.app import app

    cli = get_command(app)
    blocks = [(body, line) for lang, body, line in fenced_blocks(DOCS / "ci.md") if lang in ("yaml", "yml")]
    assert len(blocks) >= 2, "docs/ci.md: expected a GitHub Actions workflow and a GitLab CI job"
    seen: set[str] = set()
    for body, line in blocks:
        doc = yaml.safe_load(body)
        assert isinstance(doc, dict), f"docs/ci.md:{line}: not a YAML mapping"
        if "jobs" in doc:  # GitHub Actions (PyYAML reads the key `on` as True)
            assert "on" in doc or True in doc, f"docs/ci.md:{line}: a workflow needs 'on'"
            for job in doc["jobs"].values():
                assert "runs-on" in job and isinstance(job["steps"], list), f"docs/ci.md:{line}"
        else:  # GitLab CI: at least one job with a script
            assert any(isinstance(v, dict) and "script" in v for v in doc.values()), f"docs/ci.md:{line}"
        for script in _scripts(doc):
            for words in _shell_commands(script):
                if words[0] != "loractl":
                    continue
                assert len(words) > 1 and words[1] in cli.commands, f"docs/ci.md:{line}: {' '.join(words)}"  # type: ignore[attr-defined]
                sub = cli.commands[words[1]]  # type: ignore[attr-defined]
                try:
                    sub.make_context(words[1], list(words[2:]))
                except Exception as e:  # typer's (vendored) click usage errors
                    message = e.format_message() if hasattr(e, "format_message") else str(e)
                    pytest.fail(f"docs/ci.md:{line}: {' '.join(words)}: {message}")
                seen.add(words[1])
    assert {"check", "run"} <= seen, (
        f"docs/ci.md: the CI examples should gate with check and package with run ({seen})"
    )
