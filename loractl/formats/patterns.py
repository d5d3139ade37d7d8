"""PEFT's ``rank_pattern`` / ``alpha_pattern`` matching, never taking exponential time.

PEFT (``peft.utils.other.get_pattern_key``) picks the first pattern key k with
``re.match(rf"(.*\\.)?({k})$", module_name)``. The keys come from ``adapter_config.json``, so they
are untrusted: with Python's backtracking ``re``, a key such as ``(.*)*Z`` takes forever on a
module name of 40 characters.

Whether a regular pattern matches does not depend on the order in which a backtracking engine
tries its alternatives, so there are two exact ways to answer, and :func:`matches` picks one per
pattern: ``re`` itself when a static bound on its backtracking (:func:`_paths`) is small, which
is the case for every pattern seen in practice (names, ``re.escape`` of names, a ``\\d+`` or an
alternation); otherwise a Thompson NFA (a Pike VM without captures) over the pattern as ``re``
parses it, which gives the same yes or no in O(len(pattern) · len(name)) steps. A pattern that
needs ``re`` (a backreference, a lookaround, an atomic group or possessive repeat, the IGNORECASE
/ ASCII / LOCALE flags, whose case folding is ``re``'s own) and could backtrack for long is
refused with :class:`PatternError` rather than run.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

#: the most NFA states one pattern may expand to (``a{1000}{1000}`` would be a million)
MAX_STATES = 20_000
#: the bound on backtracking paths under which ``re`` runs a pattern
MAX_PATHS = 1_000_000
#: module names up to this length are assumed when bounding a pattern's paths once for all names
NAME_LENGTH = 256
_SUPPORTED_FLAGS = re.UNICODE | re.DOTALL | re.MULTILINE | re.VERBOSE
_REPEATS = tuple(
    op for op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)) if op is not None
)
_HUGE = float("inf")


class PatternError(ValueError):
    """A pattern that is not a regular expression, or one loractl will not run (it could hang)."""


def peft_regex(key: str) -> str:
    """The regular expression PEFT's ``get_pattern_key`` matches a module name against."""
    return rf"(.*\.)?({key})$"


def matches(key: str, module: str) -> bool:
    """``re.match(peft_regex(key), module) is not None``, without exponential backtracking.

    Raises:
        PatternError: ``key`` is not a valid regular expression, or it needs ``re`` and could
            backtrack for too long.
    """
    m = _compile(key)
    if m.nfa is None or (len(module) <= NAME_LENGTH and m.cheap):
        if len(module) > NAME_LENGTH and not m.cheap_for(len(module)):
            raise PatternError(
                f"uses a backreference, lookaround or flag that needs Python's re, and could take "
                f"forever on the {len(module)}-character module name"
            )
        return m.regex.match(module) is not None
    return m.nfa.match(module)


@dataclass(frozen=True)
class _Matcher:
    regex: re.Pattern[str]
    tree: Any
    cheap: bool  # re's backtracking is bounded by MAX_PATHS on names up to NAME_LENGTH
    nfa: _Program | None  # None: the pattern needs re

    def cheap_for(self, n: int) -> bool:
        return _paths(self.tree, n + 1) <= MAX_PATHS


@functools.lru_cache(maxsize=1024)
def _compile(key: str) -> _Matcher:
    pattern = peft_regex(key)
    try:
        regex = re.compile(pattern)
        tree = _p.parse(pattern, 0)
    except re.error as e:
        raise PatternError(f"not a valid regular expression ({e})") from None
    except (RecursionError, OverflowError, MemoryError):
        raise PatternError("too deeply nested or too large a regular expression") from None
    cheap = _paths(tree, NAME_LENGTH + 1) <= MAX_PATHS
    nfa: _Program | None
    try:
        if tree.state.flags & ~_SUPPORTED_FLAGS:
            raise _Unsupported
        nfa = _Program(tree, tree.state.flags)
    except _Unsupported:
        nfa = None
    if nfa is None and not cheap:
        raise PatternError(
            "uses a backreference, lookaround or flag that needs Python's re, together with nested "
            "or many repeats or alternatives: matching it could take forever"
        )
    return _Matcher(regex, tree, cheap, nfa)


class _Unsupported(Exception):
    pass


def _paths(node: Any, n: int) -> float:
    """An upper bound on the ways a backtracking engine can match ``node`` against a name of n - 1
    characters: a sequence multiplies, an alternation adds, a repeat sums c^k over its counts k
    (at most n): with a choice inside and many counts that is exponential, and :data:`_HUGE`."""
    if isinstance(node, tuple):
        node = [node]
    total = 1.0
    for op, av in node:
        if op in _REPEATS:
            lo, hi, sub = av
            c = _paths(sub, n)
            top = n if hi == _c.MAXREPEAT else min(hi, n)
            if c <= 1:
                ways = float(max(top - lo + 1, 1))
            elif top > 40 or lo > 40:
                return _HUGE
            else:
                ways = float(sum(c**k for k in range(lo, max(top, lo) + 1)))
            total *= ways
        elif op is _c.SUBPATTERN:
            total *= _paths(av[-1], n)
        elif op is _c.BRANCH:
            total *= sum(_paths(alt, n) for alt in av[1])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            total *= _paths(av[1], n)
        elif op is getattr(_c, "ATOMIC_GROUP", None):
            total *= _paths(av, n)
        elif op is _c.GROUPREF_EXISTS:
            total *= sum(_paths(alt, n) for alt in av[1:] if alt is not None)
        if total > MAX_PATHS:
            return _HUGE
    return total


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: _word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _word(ch),
}


class _Program:
    """A Thompson NFA: instructions ``("char", test)``, ``("split", a, b)``, ``("jmp", a)``,
    ``("at", kind)`` and ``("match",)``, run by :meth:`match` as a Pike VM."""

    def __init__(self, tree: Any, flags: int) -> None:
        self.flags = flags
        self.code: list[list[Any]] = []
        self._emit_seq(tree)
        self.code.append(["match"])

    # -- compiling ------------------------------------------------------------------------
    def _add(self, *ins: Any) -> int:
        if len(self.code) >= MAX_STATES:
            raise PatternError(f"expands to more than {MAX_STATES} states")
        self.code.append(list(ins))
        return len(self.code) - 1

    def _emit_seq(self, seq: Any) -> None:
        for op, av in seq:
            self._emit(op, av)

    def _emit(self, op: Any, av: Any) -> None:
        if op is _c.LITERAL:
            ch = chr(av)
            self._add("char", lambda c, ch=ch: c == ch)
        elif op is _c.NOT_LITERAL:
            ch = chr(av)
            self._add("char", lambda c, ch=ch: c != ch)
        elif op is _c.ANY:
            dotall = bool(self.flags & re.DOTALL)
            self._add("char", (lambda c: True) if dotall else (lambda c: c != "\n"))
        elif op is _c.IN:
            self._add("char", _charset(av))
        elif op is _c.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & ~_SUPPORTED_FLAGS:
                raise _Unsupported
            saved = self.flags
            self.flags = (self.flags | add_flags) & ~del_flags
            self._emit_seq(sub)
            self.flags = saved
        elif op is _c.BRANCH:
            self._branch(av[1])
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            self._repeat(*av)
        elif op is _c.AT:
            self._add("at", av, bool(self.flags & re.MULTILINE))
        else:  # GROUPREF, ASSERT, ASSERT_NOT, GROUPREF_EXISTS, ATOMIC_GROUP, POSSESSIVE_REPEAT...
            raise _Unsupported

    def _branch(self, alts: list[Any]) -> None:
        jumps: list[int] = []
        for i, alt in enumerate(alts):
            if i < len(alts) - 1:
                split = self._add("split", 0, 0)
                self.code[split][1] = len(self.code)
                self._emit_seq(alt)
                jumps.append(self._add("jmp", 0))
                self.code[split][2] = len(self.code)
            else:
                self._emit_seq(alt)
        for j in jumps:
            self.code[j][1] = len(self.code)

    def _repeat(self, lo: int, hi: int, sub: Any) -> None:
        for _ in range(lo):
            self._emit_seq(sub)
        if hi == _c.MAXREPEAT:
            loop = self._add("split", 0, 0)
            self.code[loop][1] = len(self.code)
            self._emit_seq(sub)
            self._add("jmp", loop)
            self.code[loop][2] = len(self.code)
            return
        splits: list[int] = []
        for _ in range(hi - lo):
            split = self._add("split", 0, 0)
            self.code[split][1] = len(self.code)
            splits.append(split)
            self._emit_seq(sub)
        for s in splits:
            self.code[s][2] = len(self.code)

    # -- running --------------------------------------------------------------------------
    def _at(self, kind: Any, multiline: bool, s: str, i: int) -> bool:
        n = len(s)
        if kind is _c.AT_BEGINNING or kind is _c.AT_BEGINNING_LINE:
            return i == 0 or (multiline and s[i - 1] == "\n")
        if kind is _c.AT_BEGINNING_STRING:
            return i == 0
        if kind is _c.AT_END or kind is _c.AT_END_LINE:
            if multiline:
                return i == n or s[i] == "\n"
            return i == n or (i == n - 1 and s[i] == "\n")
        if kind is _c.AT_END_STRING:
            return i == n
        if kind in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
            before = i > 0 and _word(s[i - 1])
            after = i < n and _word(s[i])
            return (before != after) == (kind is _c.AT_BOUNDARY)
        raise PatternError(f"unknown anchor {kind}")  # pragma: no cover

    def _closure(self, states: list[int], s: str, i: int) -> tuple[list[int], bool]:
        """The "char" states reachable from ``states`` without consuming, and whether "match" is."""
        seen: set[int] = set()
        out: list[int] = []
        stack = list(reversed(states))
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self.code[pc]
            op = ins[0]
            if op == "char":
                out.append(pc)
            elif op == "match":
                matched = True
            elif op == "jmp":
                stack.append(ins[1])
            elif op == "split":
                stack.append(ins[2])
                stack.append(ins[1])
            elif op == "at" and self._at(ins[1], ins[2], s, i):
                stack.append(pc + 1)
        return out, matched

    def match(self, s: str) -> bool:
        states, matched = self._closure([0], s, 0)
        for i, ch in enumerate(s):
            if matched:
                return True
            nxt = [pc + 1 for pc in states if self.code[pc][1](ch)]
            if not nxt:
                return False
            states, matched = self._closure(nxt, s, i + 1)
        return matched


def _charset(items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    chars: set[str] = set()
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            chars.add(chr(av))
        elif op is _c.RANGE:
            lo, hi = av
            tests.append(lambda c, lo=lo, hi=hi: lo <= ord(c) <= hi)
        elif op is _c.CATEGORY:
            if av not in _CATEGORIES:
                raise _Unsupported
            tests.append(_CATEGORIES[av])
        else:
            raise _Unsupported

    def test(c: str) -> bool:
        hit = c in chars or any(t(c) for t in tests)
        return hit != negate

    return test
