"""Odd values, and JSON text that can hold what ``json.dumps`` cannot write (1e400, deep nesting)."""

from __future__ import annotations

import json
import random
from typing import Any


class Raw:
    """A JSON fragment written as is (``Raw("1e400")``, ``Raw("[" * 10**5 + "]" * 10**5)``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def nested(depth: int, inner: str = "1") -> Raw:
    return Raw("[" * depth + inner + "]" * depth)


def nested_obj(depth: int) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth)


ODD_INTS = (0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
            2**64 + 8, 10**30, -(2**63), -(2**63) - 1)  # fmt: skip

RAW_NUMBERS = ("1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1E5", "8.0", "-0", "0.5e-400",
               "123456789012345678901234567890123456789")  # fmt: skip


def odd_value(rng: random.Random, like: Any = None) -> Any:
    """A value of a surprising type or size; sometimes one near ``like``."""
    r = rng.random()
    if like is not None and isinstance(like, int) and not isinstance(like, bool) and r < 0.2:
        return rng.choice(
            [like - 1, like + 1, -like, like * 2, like // 2, like * 2**32, float(like), str(like)]
        )
    choices: list[Any] = [
        rng.choice(ODD_INTS),
        Raw(rng.choice(RAW_NUMBERS)),
        rng.choice([1.5, -0.0, 1e-300, 1e308, 0.1]),
        rng.choice(
            ["", "8", "x", "x" * 5000, "é中\u202e", "\u0000", "../../etc/passwd", "/dev/urandom", "org/name"]
        ),
        None,
        rng.choice([True, False]),
        rng.choice([[], [1], [None], [[1, 2]], ["a", 1]]),
        rng.choice([{}, {"a": 1}, {"": None}]),
        rng.choice([nested(rng.choice([3, 100, 1000, 100_000])), nested_obj(rng.choice([100, 100_000]))]),
    ]
    return rng.choice(choices)


def dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that writes :class:`Raw` fragments verbatim (and NaN/Infinity as Python does)."""
    raws: list[str] = []

    def walk(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    text = json.dumps(walk(obj), indent=indent, ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text


def short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
