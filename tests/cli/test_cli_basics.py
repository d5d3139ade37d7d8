"""The CLI's contract (docs: ../shared/CLI.md): version, help, --json, -q, and
the keys and values of ``inspect --json``."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

import loractl

# every command of CLI.md
COMMANDS = [
    "inspect",
    "merge",
    "unmerge",
    "combine",
    "truncate",
    "similarity",
    "convert",
    "extract",
    "check",
    "verify",
    "run",
]
ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# version and help
# --------------------------------------------------------------------------------------------
def test_version(cli):
    r = cli("--version")
    assert r.code == 0, r.stderr
    assert r.stdout.strip() == f"loractl {loractl.__version__}"
    assert r.stderr == ""


def test_python_m_loractl_version(tools):
    r = tools.run_module(["--version"])
    assert r.code == 0, r.stderr
    assert r.stdout.strip() == f"loractl {loractl.__version__}"
    assert "Traceback" not in r.stderr


def _commands_in_help(text: str) -> list[str]:
    section = text.split("Commands:", 1)[1]
    return [m.group(1) for m in re.finditer(r"^\s{2}([a-z][a-z-]*)\s", section, re.M)]


def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.code == 0, r.stderr
    assert "Commands:" in r.stdout
    assert sorted(_commands_in_help(r.stdout)) == sorted(COMMANDS)


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loractl.cli.app import app\n"
        f"for args in [['--help'], ['--version'], *[[c, '--help'] for c in {COMMANDS!r}]]:\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_ends_with_examples(cli, command):
    r = cli(command, "--help")
    assert r.code == 0, r.stderr
    text = r.stdout
    assert "Examples" in text
    tail = text[text.rindex("Examples") :]
    assert text.rindex("Examples") > text.rindex("Options:"), "the examples are not at the end"
    assert re.search(rf"^\s*loractl {command}\b", tail, re.M), tail


USAGE = {
    "inspect": "ADAPTER...",
    "merge": "BASE ADAPTER...",
    "unmerge": "MERGED ADAPTER...",
    "combine": "ADAPTER...",
    "truncate": "ADAPTER",
    "similarity": "ADAPTER...",
    "convert": "ADAPTER",
    "extract": "BASE TUNED",
    "check": "ADAPTER",
    "verify": "MERGED ADAPTER...",
    "run": "RECIPE",
}
#: what typer shows unless told otherwise: types in angle brackets, required arguments in braces
TYPER_NOISE = re.compile(r"<(str|int|float|path|list\[[a-z]+\])>|\{[a-z_]+\}|\[[a-z_]+\]\.\.\.")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_plain_metavars(cli, command):
    r = cli(command, "--help")
    assert r.code == 0, r.stderr
    text = r.stdout
    assert text.splitlines()[0] == f"Usage: loractl {command} [OPTIONS] {USAGE[command]}"
    body = text[: text.rindex("Examples")]
    assert not TYPER_NOISE.search(body), TYPER_NOISE.search(body)
    assert "<" not in body and "{" not in body, body
    for name in USAGE[command].replace("...", "").split():
        assert re.search(rf"^  {name}(\.\.\.)?\s", body, re.M), body  # the Arguments section
    if "--format" in body:
        assert "--format peft|kohya|diffusers|loralib|gguf" in body


def test_help_formats_are_the_library_formats():
    from loractl.cli._options import FORMATS
    from loractl.formats import FORMATS as LIBRARY

    assert FORMATS == LIBRARY


def test_docs_cli_md_has_plain_metavars():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    assert not TYPER_NOISE.search(text), TYPER_NOISE.search(text)
    assert "$ loractl merge [OPTIONS] BASE ADAPTER..." in text
    assert "--device" not in text


def test_device_is_hidden_until_it_works(cli, inputs, tools, bad_input):
    assert "--device" not in cli("merge", "--help").stdout
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out, "--device", "cpu", "-q")
    assert r.code == 0, r.stderr  # still accepted
    snap = tools.Snapshot([inputs.root])
    bad = inputs.work / "merged-cuda"
    r = cli("merge", inputs.base, inputs.adapter, "-o", bad, "--device", "cuda")
    bad_input(r, output=bad, snapshot=snap, names=["--device cuda"])


# --------------------------------------------------------------------------------------------
# --json and -q
# --------------------------------------------------------------------------------------------
def test_merge_json_is_one_document_on_stdout(inputs, tools):
    out = inputs.work / "merged"
    r = tools.run_module(["merge", inputs.base, inputs.adapter, "-o", out, "--json"])
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)  # fails on anything else on stdout, e.g. a second document
    assert isinstance(doc, dict)
    assert doc["schema_version"] == 1
    assert r.stdout.strip().startswith("{") and r.stdout.strip().endswith("}")
    assert "Traceback" not in r.stderr
    assert doc["modules"] == 14
    assert doc["tensors_changed"] == 14
    assert len(doc["adapters"]) == 1
    assert doc["adapters"][0]["sha256"] and doc["adapters"][0]["weight"] == 1.0
    assert out.is_dir() and (out / "model.safetensors.index.json").exists()


def test_merge_json_in_process(cli, inputs):
    r = cli("merge", inputs.base, inputs.adapter, "-o", inputs.work / "merged", "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["schema_version"] == 1


def test_unmerge_json(cli, inputs):
    merged = inputs.work / "merged"
    assert cli("merge", inputs.base, inputs.adapter, "-o", merged, "-q").code == 0
    r = cli("unmerge", merged, inputs.adapter, "-o", inputs.work / "restored", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1
    assert doc["exact"] is True


def test_quiet_prints_nothing_on_stdout(cli, inputs):
    merged = inputs.work / "merged"
    runs = [
        ("inspect", inputs.adapter, "-q"),
        ("inspect", inputs.adapter, "--base", inputs.base, "--quiet"),
        ("merge", inputs.base, inputs.adapter, "-o", merged, "-q"),
        ("unmerge", merged, inputs.adapter, "-o", inputs.work / "restored", "-q"),
    ]
    for args in runs:
        r = cli(*args)
        assert r.code == 0, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)
    assert merged.is_dir() and (inputs.work / "restored").is_dir()


def test_human_output_of_merge(cli, inputs):
    r = cli("merge", inputs.base, inputs.adapter, "-o", inputs.work / "merged")
    assert r.code == 0, r.stderr
    assert "merged 1 adapter" in r.stdout
    assert r.stdout.strip() and not r.stdout.lstrip().startswith("{")


# --------------------------------------------------------------------------------------------
# inspect --json: contract keys and values computed independently from the files
# --------------------------------------------------------------------------------------------
def _lora_tensors(path) -> dict[str, tuple[list[int], int, str]]:
    """key -> (shape, numel, dtype) of every tensor of a safetensors file, read with safetensors itself."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            shape = list(s.get_shape())
            out[key] = (shape, math.prod(shape), s.get_dtype())
    return out


def test_inspect_json_contract(cli, inputs):
    r = cli("inspect", inputs.adapter, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1
    assert len(doc["adapters"]) == 1
    a = doc["adapters"][0]
    for key in (
        "path",
        "format",
        "kind",
        "rslora",
        "modules",
        "rank",
        "parameters",
        "bytes",
        "dtypes",
        "module_list",
    ):
        assert key in a, key

    tensors = _lora_tensors(inputs.adapter / ADAPTER_FILE)
    bytes_per = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    modules = sorted({k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})

    assert a["path"] == str(inputs.adapter)
    assert a["format"] == "peft"
    assert a["kind"] == "LoRA"
    assert a["rslora"] is False
    assert a["modules"] == 14 == len(modules)
    assert a["rank"] == {"min": 8, "max": 8}
    assert a["parameters"] == sum(n for _, n, _ in tensors.values())
    assert a["bytes"] == sum(n * bytes_per[dt] for _, n, dt in tensors.values())
    assert a["dtypes"] == sorted({dt for _, _, dt in tensors.values()})

    assert sorted(m["name"] for m in a["module_list"]) == modules
    for m in a["module_list"]:
        for key in ("name", "rank", "alpha", "scale", "shape", "dtype"):
            assert key in m, key
        a_shape = tensors[f"{PREFIX}{m['name']}.lora_A.weight"][0]
        b_shape, _, b_dtype = tensors[f"{PREFIX}{m['name']}.lora_B.weight"]
        assert m["rank"] == 8 == a_shape[0] == b_shape[1]
        assert m["alpha"] == 16
        assert m["scale"] == 2.0
        assert m["shape"] == [b_shape[0], a_shape[1]]
        assert m["dtype"] == b_dtype


def test_inspect_json_with_base(cli, inputs):
    r = cli("inspect", inputs.adapter, "--base", inputs.base, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1
    a = doc["adapters"][0]
    # CLI.md lists `base` beside adapters[]; the implementation puts it in each adapter (coverage is per adapter)
    b = a.get("base") if a.get("base") is not None else doc.get("base")
    assert isinstance(b, dict), f"no 'base' object in {sorted(doc)} / {sorted(a)}"
    for key in ("parameters", "bytes", "coverage", "ratio", "storage"):
        assert key in b, key

    base_tensors = {}
    for shard in sorted(inputs.base.glob("*.safetensors")):
        base_tensors.update(_lora_tensors(shard))
    bytes_per = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    base_params = sum(n for _, n, _ in base_tensors.values())
    base_bytes = sum(n * bytes_per[dt] for _, n, dt in base_tensors.values())
    assert b["parameters"] == base_params
    assert b["bytes"] == base_bytes
    assert b["coverage"]["matched"] == 14
    assert b["coverage"]["unmatched"] == []
    assert b["coverage"]["shape_mismatch"] == []
    assert b["ratio"] == pytest.approx(a["bytes"] / base_bytes)
    assert isinstance(b["storage"], dict)


def test_inspect_human_output(cli, inputs):
    r = cli("inspect", inputs.adapter, "--base", inputs.base)
    assert r.code == 0, r.stderr
    assert "model.layers.0.self_attn.q_proj" in r.stdout
    assert "14 modules" in r.stdout


# --------------------------------------------------------------------------------------------
# leaving the process: no interpreter teardown once torch is loaded, nothing lost on the way out
# --------------------------------------------------------------------------------------------
_MAIN_WITH_MARK = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('TEARDOWN-RAN\\n'))\n"
    "sys.argv = ['loractl', *sys.argv[1:]]\n"
    "from loractl.cli.app import main\n"
    "main()\n"
)


def _main(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _MAIN_WITH_MARK, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_exit_skips_teardown_after_torch_and_keeps_output_and_codes(inputs):
    # torch loaded, success: the whole (block-buffered, piped) JSON document arrives, exit 0, and
    # the interpreter's teardown (atexit, module finalisers) did not run.
    ok = _main(["inspect", inputs.adapter, "--json"])
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["adapters"][0]["modules"] == 14
    assert "TEARDOWN-RAN" not in ok.stderr
    # torch loaded, input error: still exit 2 with the one-line message.
    bad = _main(["merge", inputs.base, inputs.adapter, "-o", inputs.base])
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert "TEARDOWN-RAN" not in bad.stderr
    # no torch (--version): the normal exit, teardown included.
    ver = _main(["--version"])
    assert ver.returncode == 0 and ver.stdout.strip() == f"loractl {loractl.__version__}"
    assert "TEARDOWN-RAN" in ver.stderr


def test_exit_when_the_reader_of_stdout_has_gone(inputs):
    # `loractl inspect --json | head -c 0`: the pipe is closed long before loractl (still starting
    # up) writes; exit 141 as cat or git, and nothing on stderr.
    proc = subprocess.Popen(
        [sys.executable, "-c", _MAIN_WITH_MARK, "inspect", str(inputs.adapter), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert err == "" and code == 141, (code, err)
