"""Recipe values are checked against the api's types before anything runs; ${var} parameterises
numbers too; --set paths are the caller's; a failed step is reported once and leaves no folders.

Every bad recipe is exit 2, one `error:` line naming the recipe file, the line and the key (and
perhaps a `hint:`), and nothing is created.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import EXAMPLES
from typer.testing import CliRunner

from loractl import api, recipe
from loractl.cli.app import app
from loractl.errors import UsageError

ADAPTER = "tiny-llama-lora"
TRUNCATE = f'[[step]]\nname = "small"\nrun = "truncate"\nadapter = "{ADAPTER}"\noutput = "out/small"\n'
MERGE = (
    f'[[step]]\nname = "m"\nrun = "merge"\nbase = "tiny-llama"\nadapters = ["{ADAPTER}"]\noutput = "out/m"\n'
)
COMBINE = f'[[step]]\nname = "c"\nrun = "combine"\nadapters = ["{ADAPTER}", "{ADAPTER}"]\noutput = "out/c"\n'
CONVERT = f'[[step]]\nname = "cv"\nrun = "convert"\nadapter = "{ADAPTER}"\noutput = "out/cv"\n'
INSPECT = f'[[step]]\nname = "i"\nrun = "inspect"\nadapters = ["{ADAPTER}"]\n'
CHECK = f'[[step]]\nname = "gate"\nrun = "check"\nadapter = "{ADAPTER}"\n'


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with copies of the examples; the current folder."""
    for name in ("tiny-llama", ADAPTER):
        shutil.copytree(EXAMPLES / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORACTL_DEBUG", raising=False)
    return tmp_path


def loractl(*args: str):
    """``loractl ARGS`` in-process; (exit code, stdout, stderr)."""
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_refused(work: Path, text: str | bytes, line: int, key: str, *args: str) -> str:
    """``loractl run r.toml --dry-run ARGS`` and then without --dry-run: exit 2, one error naming
    r.toml:LINE and KEY, nothing created. Returns stderr."""
    path = work / "r.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    before = listing(work)
    for dry in (["--dry-run"], []):
        code, out, err = loractl("run", "r.toml", *dry, *args)
        lines = err.strip().splitlines()
        assert code == 2, (code, out, err)
        assert out == "" and "Traceback" not in err
        assert 1 <= len(lines) <= 2 and lines[0].startswith(f"error: r.toml:{line}: "), err
        assert all(x.startswith(("error: ", "hint: ")) for x in lines), err
        assert key in lines[0], err
        assert listing(work) == before, "something was created"
    return err


# -- types, choices, TOML oddities -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, key, says",
    [
        (TRUNCATE + 'rank = "4"\n', 6, "rank", "rank must be an integer, not the string '4'"),
        (TRUNCATE + "rank = 4.5\n", 6, "rank", "rank must be an integer, not the number 4.5"),
        (TRUNCATE + "rank = true\n", 6, "rank", "rank must be an integer, not the boolean true"),
        (TRUNCATE + "rank = 4\nenergy = [0.9]\n", 7, "energy", "energy must be a number, not a list"),
        (TRUNCATE + 'rank = 4\nnested = "yes"\n', 7, "nested", "nested must be true or false"),
        (
            TRUNCATE + 'rank = 4\ndylora-convention = "sd"\n',
            7,
            "dylora-convention",
            "one of original, kohya, lycoris",
        ),
        (MERGE + 'receipt = "no"\n', 7, "receipt", "receipt must be true or false, not the string 'no'"),
        (MERGE + 'weights = "0.5"\n', 7, "weights", "weights must be a number or a list of numbers, not the string '0.5'"),
        (MERGE + 'weights = [1, "x"]\n', 7, "weights", "weights item 2 must be a number, not the string 'x'"),
        (MERGE + 'dtype = "bfloat16"\n', 7, "dtype", "dtype is 'bfloat16'; one of auto, bf16, fp16, fp32"),
        (MERGE + "shard-size = true\n", 7, "shard-size", "shard-size must be an integer or a string"),
        (MERGE + 'format = "safetensors"\n', 7, "format", "one of peft, kohya, diffusers, loralib, gguf"),
        (COMBINE + 'method = "average"\n', 6, "method", "method is 'average'; one of cat, svd"),
        (COMBINE + 'majority-sign = "sum"\n', 6, "majority-sign", "one of total, frequency"),
        (COMBINE + 'seed = "0"\n', 6, "seed", "seed must be an integer"),
        (CONVERT + 'to = "onnx"\n', 6, "to", "to is 'onnx'; one of peft"),
        (CONVERT + 'to = "peft"\ndtype = "auto"\n', 7, "dtype", "dtype is 'auto'; one of bf16, fp16, fp32"),
        (CONVERT + 'to = "peft"\npad-rank = "16"\n', 7, "pad-rank", "pad-rank must be an integer"),
        (CONVERT + 'to = "peft"\nalpha = {x = 1}\n', 7, "alpha", "alpha must be a number, not a table"),
        (INSPECT + 'count = "x"\n', 5, "count", "count must be an integer, not the string 'x'"),
        (INSPECT + "count = 1979-05-27\n", 5, "count", "not the TOML date/time 1979-05-27"),
        (INSPECT + "count = 07:32:00\n", 5, "count", "not the TOML date/time 07:32:00"),
        (INSPECT.replace(f'["{ADAPTER}"]', "[]"), 4, "adapters", "adapters is an empty list"),
        (
            CONVERT + 'to = "peft"\nalpha = nan\n',
            7,
            "alpha",
            "alpha must be a number, not the non-finite number nan",
        ),
        (INSPECT + "count = 1e400\n", 5, "count", "count must be an integer, not the non-finite number inf"),
        (CHECK + 'target = "tgi"\n', 5, "target", "target is 'tgi'; one of peft, vllm, llama.cpp, lorax"),
        (CHECK + 'max-rank = "8"\n', 5, "max-rank", "max-rank must be an integer"),
        (CHECK + 'strict = "true"\n', 5, "strict", "strict must be true or false"),
        (
            f'[[step]]\nrun = "inspect"\nname = 3\nadapters = ["{ADAPTER}"]\n',
            3,
            "name",
            "name must be a non-empty string, not the number 3",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_before_anything_runs(
    work: Path, text: str, line: int, key: str, says: str
) -> None:
    err = assert_refused(work, text, line, key)
    assert says in err


def test_a_quoted_number_gets_a_hint_to_unquote_it(work: Path) -> None:
    err = assert_refused(work, TRUNCATE + 'rank = "4"\n', 6, "rank")
    assert "hint: write rank = 4 (without quotes)" in err


def test_non_utf8_bytes_name_the_line(work: Path) -> None:
    text = (TRUNCATE + "rank = 4\n# caf\xe9\n").encode("latin-1")
    err = assert_refused(work, text, 7, "byte 0xe9")
    assert "not UTF-8 text" in err


def test_a_byte_order_mark_is_not_an_error_and_lines_count_without_it(work: Path) -> None:
    (work / "r.toml").write_bytes(b"\xef\xbb\xbf" + (TRUNCATE + "rank = 2\n").encode())
    assert recipe.load(steps=api.STEPS, path=work / "r.toml").steps[0].options["rank"] == 2
    text = b"\xef\xbb\xbf" + (TRUNCATE + "rank = 4\n# \u00e9t\u00e9 ").encode() + b"\xff\n"
    assert "column 7" in assert_refused(work, text, 7, "byte 0xff")  # columns in characters


def test_target_takes_the_spellings_check_takes(work: Path) -> None:
    (work / "r.toml").write_text(CHECK + 'target = "LLAMACPP"\n')
    assert recipe.load(steps=api.STEPS, path=work / "r.toml").steps[0].options["target"] == "LLAMACPP"


def test_invalid_toml_names_the_line(work: Path) -> None:
    assert_refused(work, TRUNCATE + "rank = 4\nrank = 5\n", 7, "not valid TOML")


def test_a_vars_value_that_is_a_date_is_refused(work: Path) -> None:
    err = assert_refused(work, '[vars]\nout = "o"\nwhen = 2024-01-01\n\n' + INSPECT, 3, "when")
    assert "must be a string, number or boolean" in err


def test_both_spellings_of_one_key_are_refused(work: Path) -> None:
    err = assert_refused(work, CONVERT + 'to = "peft"\npad-rank = 16\npad_rank = 16\n', 8, "pad_rank")
    assert "'pad-rank' and 'pad_rank'" in err


# -- ${var} for numbers, --set ------------------------------------------------------------------------


def test_a_whole_variable_parameterises_a_number(work: Path) -> None:
    (work / "r.toml").write_text(TRUNCATE + 'rank = "${r}"\n')
    code, out, err = loractl("run", "r.toml", "--set", "r=2", "--json")
    assert code == 0, err
    step = json.loads(out)["steps"][0]
    assert step["status"] == "ok" and step["result"]["modules"][0]["rank_after"] == 2
    assert {m.rank for m in api.load_adapter(work / "out" / "small").modules.values()} == {2}


def test_a_vars_number_and_a_list_item_variable(work: Path) -> None:
    text = '[vars]\nr = 3\nw = "0.5"\n\n' + TRUNCATE + 'rank = "${r}"\n\n' + MERGE + 'weights = ["${w}"]\n'
    (work / "r.toml").write_text(text)
    r = recipe.load(steps=api.STEPS, path=work / "r.toml")
    assert r.steps[0].options["rank"] == 3 and r.steps[1].options["weights"] == [0.5]


def test_a_variable_that_does_not_convert_names_file_line_and_key(work: Path) -> None:
    err = assert_refused(work, TRUNCATE + 'rank = "${r}"\n', 6, "rank", "--set", "r=four")
    assert "rank = \"${r}\" is 'four', not an integer" in err
    err = assert_refused(work, MERGE + 'dtype = "${d}"\n', 7, "dtype", "--set", "d=bfloat16")
    assert "one of auto, bf16" in err


def test_an_unknown_set_name_is_refused(work: Path) -> None:
    (work / "r.toml").write_text('[vars]\nout = "o"\n\n' + TRUNCATE + 'rank = "${r}"\n')
    before = listing(work)
    code, out, err = loractl("run", "r.toml", "--set", "r=2", "--set", "rnak=2")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "error: --set rnak=2: r.toml has no variable 'rnak'",
        "hint: its variables: out, r",
    ]
    assert listing(work) == before
    code, _, err = loractl("run", "r.toml", "--set", "=2")
    assert code == 2 and "expected name=value" in err


def test_set_paths_are_taken_from_the_current_folder_recipe_paths_from_the_recipe(work: Path) -> None:
    """The recipe lives in recipes/ next to its own copy of the adapter; the caller stands in work/."""
    folder = work / "recipes"
    folder.mkdir()
    shutil.copytree(work / ADAPTER, folder / "own-lora")
    text = '[vars]\nadapter = "own-lora"\nout = "built"\n\n'
    text += '[[step]]\nname = "small"\nrun = "truncate"\nadapter = "${adapter}"\noutput = "${out}/small"\nrank = 2\n'
    path = folder / "r.toml"
    path.write_text(text)
    own = recipe.load(steps=api.STEPS, path=path)  # written in the recipe: from the recipe's folder
    assert own.steps[0].options["adapter"] == str(folder.resolve() / "own-lora")
    assert own.steps[0].output == str(folder.resolve() / "built" / "small")
    given = recipe.load(steps=api.STEPS, path=path, overrides={"adapter": ADAPTER, "out": "mine"})  # typed by the caller
    assert given.steps[0].options["adapter"] == str(work / ADAPTER)
    assert given.steps[0].output == str(work / "mine" / "small")
    code, _, err = loractl("run", str(path), "--set", f"adapter={ADAPTER}", "--set", "out=mine")
    assert code == 0, err
    assert (work / "mine" / "small" / "adapter_model.safetensors").exists() and not (folder / "mine").exists()
    code, _, err = loractl("run", str(path), "--set", "adapter=own-lora", "--set", "out=x")
    assert code == 2 and "input 'own-lora' does not exist" in err  # not in the current folder


# -- failed steps ---------------------------------------------------------------------------------------


FAILS_SECOND = (
    TRUNCATE
    + "rank = 4\n\n"
    + '[[step]]\nname = "too-big"\nrun = "truncate"\nadapter = "@small"\noutput = "deep/er/bigger"\nrank = 8\n\n'
    + INSPECT.replace(f'"{ADAPTER}"', '"@small"')
)


def test_a_failed_step_is_reported_once_with_file_and_line_and_leaves_no_folders(work: Path) -> None:
    (work / "r.toml").write_text(FAILS_SECOND)
    code, out, err = loractl("run", "r.toml")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: r.toml:8: step 'too-big' (truncate): ") and "larger than" in lines[0]
    assert len(lines) <= 2 and all(x.startswith(("error: ", "hint: ")) for x in lines)
    assert (out + err).count("larger than") == 1, out + err  # the table says "failed", not the message
    assert "failed" in out and "skipped" in out
    assert not (work / "deep").exists()  # the folders made for the failed step's output are gone
    assert (work / "out" / "small" / "adapter_model.safetensors").exists()  # a finished step's output stays


def test_run_json_prints_the_error_on_stderr(work: Path) -> None:
    (work / "r.toml").write_text(FAILS_SECOND)
    code, out, err = loractl("run", "r.toml", "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["ok"] is False and [s["status"] for s in doc["steps"]] == ["ok", "failed", "skipped"]
    failed = doc["steps"][1]
    assert failed["message"].startswith("r.toml:8: step 'too-big' (truncate): ") and failed["exit_code"] == 2
    assert failed["hint"] and err.startswith(f"error: {failed['message']}\nhint: {failed['hint']}\n")
    assert not (work / "deep").exists()


def test_a_failed_step_keeps_a_folder_that_existed(work: Path) -> None:
    (work / "deep").mkdir()
    (work / "r.toml").write_text(FAILS_SECOND)
    code, _, _ = loractl("run", "r.toml")
    assert code == 2 and (work / "deep").is_dir() and not (work / "deep" / "er").exists()


def test_the_library_raises_usage_error_with_the_same_message(work: Path) -> None:
    (work / "r.toml").write_text(TRUNCATE + 'rank = "4"\n')
    with pytest.raises(UsageError, match=r"r\.toml:6: step 'small' \(truncate\): rank must be an integer"):
        recipe.load(steps=api.STEPS, path=work / "r.toml")
