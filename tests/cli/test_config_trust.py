"""A config file or a recipe cannot widen what loractl trusts (issue #11, "Trust").

`./loractl.toml` or `[tool.loractl]` sit in the current folder, which may be a repository just
cloned; a recipe may come from anywhere. Neither may turn pickle reading on: only `--allow-pickle`
on the command line can (for `loractl run` it then applies to every step). Nor may a config file
set `force`, which would let every command replace existing outputs without the user asking.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loractl.cli.app import run as console_script


@pytest.fixture
def here(inputs, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder: inputs.root, holding tiny-llama/, tiny-llama-lora/ and pickle-lora/."""
    pk = inputs.root / "pickle-lora"
    pk.mkdir()
    shutil.copyfile(inputs.adapter / "adapter_config.json", pk / "adapter_config.json")
    torch.save(load_file(str(inputs.adapter / "adapter_model.safetensors")), pk / "adapter_model.bin")
    monkeypatch.chdir(inputs.root)
    monkeypatch.delenv("LORACTL_DEBUG", raising=False)
    return inputs.root


def loractl(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str):
    """The console script in-process (defaults read from the current folder, as `loractl` does)."""
    monkeypatch.setattr(sys, "argv", ["loractl", *args])
    code = console_script()
    out, err = capsys.readouterr()
    return code, out, err


MERGE_PICKLE = ("merge", "tiny-llama", "pickle-lora", "-o", "out")


@pytest.mark.parametrize(
    "file, text, line, key",
    [
        ("loractl.toml", "allow-pickle = true\n", 1, "allow-pickle"),
        ("loractl.toml", '[merge]\ndtype = "fp32"\nallow_pickle = true\n', 3, "allow_pickle"),
        ("pyproject.toml", "[tool.loractl]\nallow-pickle = true\n", 2, "allow-pickle"),
        ("pyproject.toml", "[tool.loractl.merge]\nallow-pickle = false\n", 2, "allow-pickle"),
    ],
)
def test_allow_pickle_in_a_config_file_is_refused(
    here: Path, capsys, monkeypatch, tools, file: str, text: str, line: int, key: str
) -> None:
    (here / file).write_text(text)
    snap = tools.Snapshot([here])
    code, out, err = loractl(capsys, monkeypatch, *MERGE_PICKLE)
    tools.check_bad_input(
        tools.Outcome(code, out, err), output=here / "out", snapshot=snap, names=[f"{file}:{line}"]
    )
    assert err.splitlines()[0].startswith(
        f"error: {here / file}:{line}: {key} cannot be set in a config file"
    )
    assert "hint: pass --allow-pickle on the command line" in err
    # the flag itself still works, from the command line only
    (here / file).unlink()
    code, _, err = loractl(capsys, monkeypatch, *MERGE_PICKLE, "--allow-pickle")
    assert code == 0, err


def test_force_in_a_config_file_is_refused(here: Path, capsys, monkeypatch, tools) -> None:
    code, _, err = loractl(capsys, monkeypatch, "merge", "tiny-llama", "tiny-llama-lora", "-o", "out")
    assert code == 0, err
    (here / "pyproject.toml").write_text("[tool.loractl]\nforce = true\n")
    snap = tools.Snapshot([here])
    code, out, err = loractl(capsys, monkeypatch, "merge", "tiny-llama", "tiny-llama-lora", "-o", "out")
    tools.check_bad_input(
        tools.Outcome(code, out, err),
        output=here / "out",
        snapshot=snap,
        output_existed=True,
        names=["force"],
    )
    assert "force cannot be set in a config file" in err and "hint: pass --force on the command line" in err


def test_a_config_file_cannot_turn_pickles_on_for_a_recipe(here: Path, capsys, monkeypatch, tools) -> None:
    (here / "r.toml").write_text('[[step]]\nrun = "inspect"\nadapters = ["pickle-lora"]\n')
    (here / "loractl.toml").write_text("[inspect]\nallow-pickle = true\n")
    snap = tools.Snapshot([here])
    code, out, err = loractl(capsys, monkeypatch, "run", "r.toml")
    assert code == 2 and out == "" and "allow-pickle cannot be set in a config file" in err
    snap.assert_unchanged()


def test_allow_pickle_in_a_recipe_step_is_refused(here: Path, capsys, monkeypatch, tools) -> None:
    (here / "r.toml").write_text(
        '[[step]]\nname = "look"\nrun = "inspect"\nadapters = ["pickle-lora"]\nallow_pickle = true\n'
    )
    snap = tools.Snapshot([here])
    code, out, err = loractl(capsys, monkeypatch, "run", "r.toml", "--dry-run")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "error: r.toml:5: step 'look' (inspect): allow_pickle cannot be set in a recipe",
        "hint: pass --allow-pickle to loractl run: it then applies to every step",
    ]
    snap.assert_unchanged()


def test_run_allow_pickle_applies_to_every_step(here: Path, capsys, monkeypatch, tools) -> None:
    (here / "r.toml").write_text(
        '[[step]]\nname = "small"\nrun = "truncate"\nadapter = "pickle-lora"\noutput = "built/small"\nrank = 4\n\n'
        '[[step]]\nname = "merged"\nrun = "merge"\nbase = "tiny-llama"\nadapters = ["pickle-lora", "@small"]\n'
        'output = "built/merged"\nweights = [1, -1]\n'
    )
    snap = tools.Snapshot([here])
    code, out, err = loractl(capsys, monkeypatch, "run", "r.toml")  # without the flag: refused, nothing left
    assert code == 2
    assert err.startswith("error: r.toml:1: step 'small' (truncate): ") and "adapter_model.bin" in err
    assert "--allow-pickle" in err and not (here / "built").exists()
    snap.assert_unchanged()
    code, out, err = loractl(capsys, monkeypatch, "run", "r.toml", "--allow-pickle")
    assert code == 0, err
    assert (here / "built" / "small" / "adapter_model.safetensors").exists()
    assert (here / "built" / "merged").is_dir()
