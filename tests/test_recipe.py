"""Recipes (`loractl run`) and [tool.loractl] defaults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, read_st, same_bits

from loractl import api, recipe
from loractl.errors import UsageError


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for name in ("tiny-llama", "tiny-llama-lora"):
        shutil.copytree(EXAMPLES / name, tmp_path / name)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


PIPE = """
[vars]
out = "out"

[[step]]
name = "small"
run = "truncate"
adapter = "tiny-llama-lora"
output = "${out}/small"
rank = 4

[[step]]
name = "served"
run = "convert"
adapter = "@small"
output = "${out}/served"
to = "peft"
pad-rank = 16
normalize = true

[[step]]
name = "merged"
run = "merge"
base = "tiny-llama"
adapters = ["@served"]
output = "${out}/merged"

[[step]]
run = "inspect"
adapters = ["@served"]
base = "tiny-llama"
"""


def test_recipe_runs_steps_in_order_with_references(work: Path) -> None:

    r = recipe.load(steps=api.STEPS, path=write(work / "r.toml", PIPE))
    assert [s.name for s in r.steps] == ["small", "served", "merged", "inspect4"]
    res = recipe.run(r)
    assert res.ok and [s.status for s in res.steps] == ["ok"] * 4
    assert api.load_adapter(work / "out" / "served").modules["model.layers.0.self_attn.q_proj"].rank == 16
    # the recipe's merge equals the same steps done by hand
    api.truncate(work / "tiny-llama-lora", work / "h1", rank=4)
    api.convert(work / "h1", work / "h2", to="peft", pad_rank=16, normalize=True)
    api.merge(work / "tiny-llama", [work / "h2"], work / "h3")
    a, b = read_st(work / "out" / "merged"), read_st(work / "h3")
    assert all(same_bits(a[k], b[k]) for k in a)


def test_dry_run_writes_nothing_and_set_overrides_vars(
    work: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = tmp_path_factory.mktemp("caller")
    monkeypatch.chdir(caller)
    r = recipe.load(steps=api.STEPS, path=write(work / "r.toml", PIPE), overrides={"out": "elsewhere"})
    res = recipe.run(r, dry_run=True)
    assert [s.status for s in res.steps] == ["planned"] * 4
    # a --set path is the caller's: taken from the current folder, not the recipe's
    assert res.steps[0].output == str(caller / "elsewhere" / "small")
    assert not (caller / "elsewhere").exists() and not (work / "out").exists()
    assert not (work / "elsewhere").exists()


@pytest.mark.parametrize(
    "body, message, line",
    [
        (
            '[[step]]\nrun = "truncate"\nadapter = "tiny-llama-lora"\noutput = "o"\nrnak = 4\n',
            "no option 'rnak'",
            5,
        ),
        (
            '[[step]]\nrun = "truncate"\nadapter = "nope"\noutput = "o"\nrank = 4\n',
            "input 'nope' does not exist",
            3,
        ),
        ('[[step]]\nrun = "explode"\n', "run = 'explode'", 1),
        (
            '[[step]]\nrun = "merge"\nbase = "tiny-llama"\nadapters = ["@later"]\noutput = "o"\n',
            "not an earlier step",
            4,
        ),
        ('[[step]]\nrun = "truncate"\nadapter = "tiny-llama-lora"\nrank = 4\n', "needs 'output'", 1),
        ('[[step]]\nrun = "truncate"\nadapter = "${nope}"\noutput = "o"\nrank = 4\n', "unknown variable", 3),
        (
            '[[step]]\nrun = "truncate"\nadapter = "tiny-llama-lora"\noutput = "tiny-llama"\nrank = 4\n',
            "already exists",
            4,
        ),
        ("[[step]\n", "not valid TOML", None),
    ],
)
def test_invalid_recipes_name_the_line_and_run_nothing(work: Path, body: str, message: str, line) -> None:
    path = write(work / "bad.toml", body)
    with pytest.raises(UsageError, match=message) as e:
        recipe.load(steps=api.STEPS, path=path)
    if line is not None:
        assert f"bad.toml:{line}:" in e.value.message
    assert not (work / "o").exists()


def test_failed_step_stops_the_recipe_and_keeps_finished_outputs(work: Path) -> None:
    text = """
[[step]]
name = "small"
run = "truncate"
adapter = "tiny-llama-lora"
output = "small"
rank = 4

[[step]]
name = "too-big"
run = "truncate"
adapter = "@small"
output = "bigger"
rank = 8

[[step]]
run = "inspect"
adapters = ["@small"]
"""
    res = recipe.run(recipe.load(steps=api.STEPS, path=write(work / "r.toml", text)))
    assert not res.ok
    assert [s.status for s in res.steps] == ["ok", "failed", "skipped"]
    assert res.steps[1].exit_code == 2 and "larger than" in res.steps[1].message
    assert (work / "small" / "adapter_model.safetensors").exists() and not (work / "bigger").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loractl", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_run_exit_code_and_json_summary(work: Path) -> None:
    write(work / "r.toml", PIPE)
    p = _cli("run", "r.toml", "--json", cwd=work)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema_version"] == 1 and doc["ok"] is True and len(doc["steps"]) == 4
    bad = _cli("run", "r.toml", cwd=work)  # outputs exist now: refused before anything runs
    assert bad.returncode == 2 and "already exists" in bad.stderr and "Traceback" not in bad.stderr


def test_tool_loractl_defaults_apply_and_the_command_line_wins(work: Path) -> None:
    write(work / "pyproject.toml", '[tool.loractl.merge]\ndtype = "fp32"\nreceipt = false\n')
    p = _cli("merge", "tiny-llama", "tiny-llama-lora", "-o", "m1", "--json", cwd=work)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["dtype"] == "fp32" and doc["receipt"] is None
    assert {str(t.dtype) for t in read_st(work / "m1").values()} == {"torch.float32"}
    p = _cli("merge", "tiny-llama", "tiny-llama-lora", "-o", "m2", "--dtype", "bf16", "--json", cwd=work)
    assert json.loads(p.stdout)["dtype"] == "bf16"
    write(
        work / "loractl.toml", 'receipt = true\n[merge]\ndtype = "auto"\n'
    )  # loractl.toml wins over pyproject
    p = _cli("merge", "tiny-llama", "tiny-llama-lora", "-o", "m2", "--force", "--json", cwd=work)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dtype"] == "auto"
    write(work / "loractl.toml", '[merge]\ndtpye = "bf16"\n')
    p = _cli("merge", "tiny-llama", "tiny-llama-lora", "-o", "m3", cwd=work)
    assert p.returncode == 2 and "no option 'dtpye'" in p.stderr


def test_the_example_recipe_runs(tmp_path: Path) -> None:
    """examples/recipe.toml: truncate, check for vLLM, merge (CI also runs it through the CLI)."""
    r = recipe.load(steps=api.STEPS, path=EXAMPLES / "recipe.toml", overrides={"out": str(tmp_path / "out")})
    assert [s.kind for s in r.steps] == ["truncate", "check", "merge"]
    res = recipe.run(r)
    assert res.ok, [(s.name, s.message) for s in res.steps]
    assert res.steps[1].result.ok and res.steps[1].result.target == "vllm"
    assert (tmp_path / "out" / "merged" / "model.safetensors.index.json").exists()


def test_a_failed_check_step_keeps_its_findings(work: Path) -> None:
    text = """
[[step]]
name = "gate"
run = "check"
adapter = "tiny-llama-lora"
max-rank = 4
"""
    res = recipe.run(recipe.load(steps=api.STEPS, path=write(work / "r.toml", text)))
    assert not res.ok and res.steps[0].status == "failed" and res.steps[0].exit_code == 1
    assert {f.code for f in res.steps[0].result.findings} == {"rank-too-large"}
