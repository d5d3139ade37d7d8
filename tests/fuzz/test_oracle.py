"""The fuzzer's oracle catches what it must (so that a green fuzz run means something), and lets
pass what the contract allows. No loractl runs here: outcomes and file changes are made by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from .commands import Command
from .oracle import check, snapshot
from .runner import Outcome


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    top, work = tmp_path / "case", tmp_path / "case" / "w"
    (work / "lora").mkdir(parents=True)
    (work / "lora" / "adapter_model.safetensors").write_bytes(b"weights")
    (work / "lora" / "adapter_config.json").write_text("{}")
    (work / "out").mkdir()
    (top / "tmp").mkdir()
    return top, work


def _convert(*extra: str, out: str = "out/a") -> Command:
    argv = [
        "convert",
        "lora",
        "-o",
        out,
        "--to",
        "peft",
        "--i",
        "8",
        *extra,
    ]  # (--i: not convert's, but short)
    return Command("convert", argv, ["lora"], [out], "--force" in extra)


def _run(top: Path, work: Path, cmd: Command, o: Outcome, act=lambda: None) -> set[str]:
    before = snapshot(top)
    act()
    return {cat for cat, _ in check(cmd, top, work, before, snapshot(top), o)}


def test_a_clean_success_and_a_clean_refusal_pass(case):
    top, work = case
    ok = Outcome(0, "", "", 0.1)
    assert _run(top, work, _convert(), ok, lambda: (work / "out/a").mkdir()) == set()
    refused = Outcome(2, "", "error: lora: not a LoRA adapter\nhint: check the path\n", 0.1)
    assert _run(top, work, _convert(), refused) == set()


@pytest.mark.parametrize(
    "code,stderr,expected",
    [
        (3, "internal error (a bug in loractl): KeyError: 'x'\n", {"exit-3"}),
        (-11, "", {"crash"}),
        (130, "interrupted\n", {"crash"}),
        (1, "Traceback (most recent call last):\n  File x\nKeyError: 'x'\n", {"traceback"}),
        (
            2,
            "Usage: loractl convert [OPTIONS]\nTry 'loractl convert -h'\n\nError: No such option\n",
            {"bad-stderr"},
        ),
        (2, "error: something is wrong\n", {"bad-stderr"}),  # names no file nor option
        (2, "error: loractl failed\n", {"bad-stderr"}),  # 'lora' is a word of its own or nothing
        (2, "error: lora/adapter_config.json: r is 0\n", set()),
        (2, "error: --to: unknown format 'x'\n", set()),
        (2, "error: module 'q': i=8, j=4 must be within the ranks 4 and 4\n", set()),
        (2, "error: lora: bad\nerror: and more\n", {"bad-stderr"}),
        (2, "error: lora: a\nhint: b\nhint: c\n", {"bad-stderr"}),
        (2, "", {"bad-stderr"}),
        (0, "/x/gguf_reader.py:1: RuntimeWarning: overflow encountered\n", {"bad-stderr"}),
    ],
)
def test_exit_codes_and_stderr(case, code, stderr, expected):
    top, work = case
    assert _run(top, work, _convert(), Outcome(code, "", stderr, 0.1)) == expected


def test_an_output_with_a_newline_is_named_escaped_on_one_line(case):
    top, work = case
    cmd = _convert(out="out/a\nb")
    escaped = Outcome(2, "", "error: out/a\\nb: the folder out/a does not exist\n", 0.1)
    spread = Outcome(2, "", "error: out/a\nb: the folder out/a does not exist\n", 0.1)
    assert _run(top, work, cmd, escaped) == set()
    assert _run(top, work, cmd, spread) == {"bad-stderr"}


def test_a_hang_is_reported(case):
    top, work = case
    assert _run(top, work, _convert(), Outcome(-9, "", "", 20.0, hang=True)) == {"hang"}


def test_file_rules(case):
    top, work = case
    ok, failed = Outcome(0, "", "", 0.1), Outcome(2, "", "error: lora: bad\n", 0.1)
    changed = _run(top, work, _convert(), ok, lambda: (work / "lora/adapter_config.json").write_text("{ }"))
    assert changed == {"input-changed"}
    assert _run(top, work, _convert(), ok, lambda: (work / "stray").write_text("x")) == {"outside-write"}
    assert _run(top, work, _convert(), ok, lambda: (top / "beside").write_text("x")) == {"outside-write"}
    left = _run(top, work, _convert(), failed, lambda: (work / "out/.a.loractl-tmp-1-ab").mkdir())
    assert left == {"leftover"}
    assert _run(top, work, _convert(), ok, lambda: (top / "tmp/spill").write_text("x")) == {"leftover"}
    assert _run(top, work, _convert(), failed, lambda: (work / "out/a").mkdir()) == {"partial-output"}


def test_force_replaces_the_output_but_never_an_input(case):
    top, work = case
    ok = Outcome(0, "", "", 0.1)
    (work / "out/a").write_text("old")
    # without --force an existing output must stay; with it, a successful run may replace it
    assert _run(top, work, _convert(), ok, lambda: (work / "out/a").write_text("new")) == {"outside-write"}
    assert _run(top, work, _convert("--force"), ok, lambda: (work / "out/a").write_text("newer")) == set()
    # -o an input --force: still an input
    cmd = _convert("--force", out="lora")
    assert _run(top, work, cmd, ok, lambda: (work / "lora/adapter_config.json").write_text("[]")) == {
        "input-changed"
    }


def test_a_recipe_may_write_its_outputs_and_their_folders(case):
    top, work = case
    doc = {"vars": {"out": "build"}, "step": [{"run": "truncate", "adapter": "lora", "output": "${out}/r4"}]}
    cmd = Command(
        "run", ["run", "recipe.toml", "--set", "out=dist"], ["recipe.toml", "lora"], [], recipe_doc=doc
    )

    def write():
        (work / "dist/r4").mkdir(parents=True)
        (work / "dist/r4/adapter_model.safetensors").write_bytes(b"x")

    assert _run(top, work, cmd, Outcome(0, "", "", 0.1), write) == set()
    assert _run(top, work, cmd, Outcome(0, "", "", 0.1), lambda: (work / "build").mkdir()) == {
        "outside-write"
    }
