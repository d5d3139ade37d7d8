"""What every command must do, whatever its inputs (docs/ci.md, the CLI contract):

- exit 0, 1 or 2 (3 is a bug; 130/141 and deaths by signal are wrong here too);
- no traceback; on exit 2, one or two lines on stderr: ``error: ...`` naming a file involved (or
  the option at fault) and an optional ``hint: ...``; no Python warning on stderr;
- no temporary or partial output: no ``.loractl-tmp-``/``.loractl-old-``/spool file anywhere in the
  case, TMPDIR left empty, and after a failure no new file at the output;
- no input changed: every file that existed before (bytes, mode, kind, link target) is unchanged,
  except the output itself when --force replaced it in a successful run;
- nothing written outside the output (and the receipt beside a merged file);
- no hang (the runner kills a command after its timeout).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import unicodedata
from pathlib import Path

from .commands import Command
from .runner import Outcome

CATEGORIES = ("exit-3", "crash", "traceback", "bad-stderr", "leftover", "partial-output", "input-changed",
              "outside-write", "hang")  # fmt: skip
TMP_MARKS = (".loractl-tmp-", ".loractl-old-", ".spool")
WARNING_RE = re.compile(r"^(\S+:\d+: )?[A-Z]\w*(Warning|Error): ", re.M)


def snapshot(root: Path, cache: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Every path under ``root`` (not following symlinks): kind, mode, and sha256 or link target.

    ``cache`` (path -> (inode, size, mtime, ctime, sha256)) spares hashing a file again when none of
    those changed; the kernel sets ctime on every write, and nothing can set it back.
    """
    out: dict[str, tuple] = {}
    cache = {} if cache is None else cache

    def walk(d: Path, rel: str) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            r = f"{rel}{e.name}"
            st = e.stat(follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            if e.is_symlink():
                out[r] = ("link", os.readlink(e.path))
            elif e.is_dir(follow_symlinks=False):
                out[r] = ("dir", mode)
                walk(Path(e.path), r + "/")
            elif e.is_file(follow_symlinks=False):
                key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                hit = cache.get(r)
                if hit is None or hit[0] != key:
                    h = hashlib.sha256()
                    with open(e.path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
                    hit = cache[r] = (key, h.hexdigest())
                out[r] = ("file", mode, st.st_size, hit[1])
            else:
                out[r] = ("special", stat.S_IFMT(st.st_mode), mode)

    walk(root, "")
    return out


def _norm(top: Path, work: Path, p: str) -> str | None:
    """``p`` (as given on the command line, in ``work``) as a path relative to ``top``, or None when
    it lies outside (/proc...). Symlinks are not followed: a write through one is a write where the
    link points, which the snapshot sees there."""
    if not p or "\x00" in p:
        return None
    full = os.path.normpath(os.path.join(str(work), p))
    if full == str(top):
        return "."
    if not full.startswith(str(top) + os.sep):
        return None
    return os.path.relpath(full, str(top))


def _under(rel: str, zone: str) -> bool:
    return zone == "." or rel == zone or rel.startswith(zone + "/")


def _overlaps(a: str, b: str) -> bool:
    return _under(a, b) or _under(b, a)


def _resolved(top: Path, work: Path, p: str) -> str | None:
    """``p`` with the symlinks of its folder resolved, as the kernel does when it creates or renames
    ``p`` (the last part itself is replaced, not followed)."""
    if not p or "\x00" in p:
        return None
    full = os.path.normpath(os.path.join(str(work), p))
    return _norm(top, top, os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full)))


def sets(argv: list[str]) -> dict[str, str]:
    """The ``--set name=value`` pairs of a ``run`` command line (the last one wins)."""
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        v = argv[i + 1] if a == "--set" and i + 1 < len(argv) else a[6:] if a.startswith("--set=") else None
        if v is not None and "=" in v:
            k, val = v.split("=", 1)
            out[k.strip()] = val
    return out


def zones(cmd: Command, top: Path, work: Path) -> tuple[list[str], bool]:
    """Where ``cmd`` may write (relative to ``top``), and whether it may replace what is there."""
    if cmd.kind == "run":
        from .mutate_recipe import outputs

        outs, force = outputs(cmd.recipe_doc or {}, sets(cmd.argv))
    else:
        outs, force = list(cmd.outputs), cmd.force
    rels = {r for o in outs for r in (_norm(top, work, o), _resolved(top, work, o)) if r is not None}
    inputs = {r for i in cmd.inputs for r in (_norm(top, work, i), _resolved(top, work, i)) if r is not None}
    # an output that is, holds or lies inside an input may never be written
    return sorted(r for r in rels if not any(_overlaps(r, i) for i in inputs)), force


def check(
    cmd: Command, top: Path, work: Path, before: dict[str, tuple], after: dict[str, tuple], o: Outcome
) -> list[tuple[str, str]]:
    """The broken rules, as (category, detail). ``before`` and ``after`` are snapshots of ``top``,
    which holds ``work`` (where the command ran, with the inputs) and ``tmp`` (its TMPDIR)."""
    bad: list[tuple[str, str]] = []
    err = o.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if o.hang:
        bad.append(("hang", f"killed after {o.seconds:.0f} s"))
    elif o.code == 3:
        bad.append(("exit-3", lines[0] if lines else "(no stderr)"))
    elif o.code not in (0, 1, 2):
        bad.append(("crash", f"exit {o.code}" + (f": {lines[-1]}" if lines else "")))
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in o.stdout:
        tb = [ln for ln in lines if not ln.startswith(" ")]
        bad.append(("traceback", tb[-1] if tb else "traceback"))
    if o.code == 2 and not o.hang:
        problem = _stderr_problem(cmd, work, lines, o.stdout)
        if problem:
            bad.append(("bad-stderr", problem))
    m = WARNING_RE.search(err)
    if m and o.code in (0, 1, 2) and "Traceback" not in err:
        line = err[m.start() :].splitlines()[0]
        if not line.startswith("error:"):
            bad.append(("bad-stderr", f"python warning: {line}"))
    # files
    allowed, force = zones(cmd, top, work)
    # a recipe keeps its finished steps' outputs whatever happens to a later step (a step's own
    # partial output would carry a temporary name, which the leftover rule catches)
    ok_exit = o.code == 0 or cmd.kind == "run"
    inputs = [r for r in (_norm(top, work, i) for i in cmd.inputs) if r is not None]
    for rel in sorted(set(before) | set(after)):
        b, a = before.get(rel), after.get(rel)
        in_zone = any(_under(rel, z) for z in allowed)
        # a marker in the name of the output the user asked for is theirs; anywhere else it is ours
        own = next((z for z in allowed if _under(rel, z)), None)
        tail = rel if own is None or own == "." else rel[len(own) :]
        if a is not None and b is None and any(m in tail for m in TMP_MARKS):
            bad.append(("leftover", rel))
            continue
        if a is not None and b is None and rel.startswith("tmp/"):
            bad.append(("leftover", f"in TMPDIR: {rel}"))
            continue
        if a == b:
            continue
        if b is not None:  # something that existed changed or went away
            if in_zone and force and ok_exit:
                continue
            if b[0] == "dir" and a is not None and a[0] == "dir":
                continue  # a folder's mode or listing: its entries are checked one by one
            what = "removed" if a is None else "changed"
            if any(_under(rel, i) for i in inputs):
                bad.append(("input-changed", f"{rel} {what}"))
            else:
                bad.append(("outside-write", f"{rel} {what} (existed before, not an input)"))
            continue
        # a new path
        if in_zone:
            if not ok_exit:
                bad.append(("partial-output", f"{rel} left after exit {o.code}"))
            continue
        if cmd.kind == "run" and a[0] == "dir" and any(z.startswith(rel + "/") for z in allowed):
            continue  # a recipe makes its outputs' folders
        bad.append(("outside-write", f"{rel} created"))
    return _dedupe(bad)


def _dedupe(bad: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One finding per category and a count for the rest (a partial folder is one problem, not twenty)."""
    out: dict[str, list[str]] = {}
    for cat, detail in bad:
        out.setdefault(cat, []).append(detail)
    return [(cat, d[0] + (f" (+{len(d) - 1} more)" if len(d) > 1 else "")) for cat, d in out.items()]


def _stderr_problem(cmd: Command, case: Path, lines: list[str], stdout: str) -> str | None:
    if not lines:
        if cmd.kind == "run" and "--json" in cmd.argv and _failed_step_in(stdout):
            return (
                None  # docs/ci.md: run --json reports a failed step in the JSON (status, exit_code, message)
            )
        return "exit 2 with nothing on stderr"
    if not lines[0].startswith("error:"):
        return f"first line is not 'error: ...': {lines[0][:100]}" + (
            f" ({len(lines)} lines)" if len(lines) > 2 else ""
        )
    if len(lines) > 2:
        return f"{len(lines)} lines on stderr"
    if len(lines) == 2 and not lines[1].startswith("hint:"):
        return f"second line is not 'hint: ...': {lines[1][:100]}"
    if not _names_something(cmd, case, lines[0]):
        return f"names no file: {lines[0][:140]}"
    return None


def _failed_step_in(stdout: str) -> bool:
    import json

    try:
        doc = json.loads(stdout)
    except ValueError:
        return False
    steps = doc.get("steps") if isinstance(doc, dict) else None
    return isinstance(steps, list) and any(
        isinstance(s, dict) and s.get("status") == "failed" and s.get("message") for s in steps
    )


def _index_files(folder: Path) -> set[str]:
    """The files a (maybe mutated) shard index names: an error may name the one it could not read."""
    import json

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_symlink() or not index.is_file() or index.stat().st_size > 50 << 20:
            return set()  # a FIFO or /dev/zero would block or fill the fuzzer itself
        wm = json.loads(index.read_text()).get("weight_map")
        return {v for v in wm.values() if isinstance(v, str) and v.strip("/.")}
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()


def _names_something(cmd: Command, case: Path, line: str) -> bool:
    """Whether the error line names a file involved (a path argument, its basename, a file inside
    it, a shard its index names) or, for a usage error, the option or the value at fault."""
    names: set[str] = set()
    for a in [*cmd.inputs, *cmd.outputs]:
        names.add(a)
        names.add(a.rstrip("/").rsplit("/", 1)[-1])
        names.add(_escaped(a))  # a path with a newline is shown escaped (to stay on one line)
        names.add(_escaped(a.rstrip("/").rsplit("/", 1)[-1]))
        p = case / a if a and "\x00" not in a else None
        try:
            if p is not None and p.is_dir() and not p.is_symlink():
                names.update(x.name for x in p.iterdir())
                names.update(_index_files(p))
        except OSError:
            pass
    if cmd.kind == "run":  # a recipe's errors name it, a step's files, or a variable
        names.update({"recipe.toml", "build", "step"})
    words: set[str] = set()
    for a in cmd.argv[1:]:
        if a.startswith("-"):
            opt = a.split("=", 1)[0]
            names.add(opt)
            if len(opt.lstrip("-")) > 2:  # --sv-fro named as sv_fro or sv-fro
                words.update({opt.lstrip("-"), opt.lstrip("-").replace("-", "_")})
            else:  # --i named as i=8
                names.add(opt.lstrip("-") + "=")
        else:
            names.update({repr(a), f"'{a}'"})  # a value, quoted: unknown format ''
    names -= {"", ".", "/"}
    # as a word: 'lora' is named by "lora/adapter_config.json: ..." but not by "loractl ..."
    return any(re.search(_word(n), line) for n in names | words) or str(case) in line


def _escaped(text: str) -> str:
    """``text`` as an error line shows it: control characters, line separators and lone surrogates
    (undecodable bytes of a file name) escaped as Python's repr writes them."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") else c for c in text)


def _word(name: str) -> str:
    before = r"(?<![\w-])" if re.match(r"[\w-]", name) else ""
    after = r"(?![\w-])" if re.search(r"[\w-]$", name) else ""
    return before + re.escape(name) + after
