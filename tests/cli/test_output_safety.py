"""Issue #11 "Trust", output side: loractl never loses or corrupts data where it writes.

1. no output may be, contain or lie inside an input (base, adapters and the files they were read
   from, a receipt, the recipe), with or without --force, however the path is spelled;
2. every file merge writes (the receipt beside a single-file output, the spool) is checked like
   the output, and nothing the base holds can land on loractl's own files;
3. merge copies only what a model folder needs, never follows a link out of the base folder, and
   keeps the base's file modes;
5. a merge that changes nothing, and an unmerge that undoes another merge, are refused; an unmerge
   that cannot be checked says so.

Each refusal: exit 2, one `error:` line naming the path, nothing written or left behind, and every
input file's bytes *and mode* unchanged (:class:`Tree`). Signals (bullet 4) are in test_signals.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loractl.io.receipt import RECEIPT_VERSION

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


class Tree:
    """Every entry under some paths: its type, permission bits, and bytes (sha256) or link target;
    symlinks are recorded, not followed."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.state = self._take()
        assert self.state, "nothing to record"

    def _take(self) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for root in self.paths:
            entries = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
            for p in entries:
                st = os.lstat(p)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    out[str(p)] = ("link", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[str(p)] = ("dir", mode)
                elif not stat.S_ISREG(st.st_mode):  # a fifo: never opened
                    out[str(p)] = ("other", mode)
                else:
                    out[str(p)] = ("file", mode, hashlib.sha256(p.read_bytes()).hexdigest())
        return out

    def assert_unchanged(self) -> None:
        now = self._take()
        changed = sorted(k for k in set(now) | set(self.state) if now.get(k) != self.state.get(k))
        assert not changed, f"inputs changed: {changed}"


def _refused(r, *, names, tree: Tree, output: Path | None = None, existed: bool = False, tools=None) -> None:
    msg = f"exit {r.code}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"
    assert r.code == 2, msg
    assert "Traceback" not in r.stdout + r.stderr, msg
    lines = r.stderr_lines
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), msg
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), msg
    for n in names:
        assert str(n) in lines[0], f"the error does not name {n}\n{msg}"
    if output is not None:
        if not existed:
            assert not os.path.lexists(output), msg
        assert tools.leftovers(output.parent) == [], msg
    tree.assert_unchanged()


def _single_file_base(inputs) -> Path:
    single = inputs.root / "tiny-llama.safetensors"
    tensors = {}
    for shard in (SHARD1, SHARD2):
        tensors.update(load_file(str(inputs.base / shard)))
    save_file(tensors, str(single), metadata={"format": "pt"})
    return single


# --------------------------------------------------------------------------------------------
# 1. an output that is, contains or lies inside an input
# --------------------------------------------------------------------------------------------
def test_convert_onto_its_base_is_refused_even_with_force(cli, inputs, tools):
    """`convert AD -o BASE --to peft --base BASE --force` replaced the base with the adapter."""
    tree = Tree(inputs.root)
    r = cli("convert", inputs.adapter, "-o", inputs.base, "--to", "peft", "--base", inputs.base, "--force")
    _refused(r, names=[inputs.base], tree=tree, output=inputs.base, existed=True, tools=tools)
    assert "is an input" in r.stderr


def test_convert_into_its_base_folder_is_refused(cli, inputs, tools):
    """`convert AD -o BASE/a.gguf --base BASE` wrote into the base folder (no --force needed)."""
    tree = Tree(inputs.root)
    out = inputs.base / "a.gguf"
    r = cli("convert", inputs.adapter, "-o", out, "--to", "gguf", "--base", inputs.base)
    _refused(r, names=[out, inputs.base], tree=tree, output=out, tools=tools)
    assert "lies inside an input" in r.stderr


@pytest.mark.parametrize("command", ["truncate", "merge", "convert", "combine"])
def test_the_config_of_an_adapter_given_as_a_file_is_protected(cli, inputs, tools, command):
    """`truncate ad/adapter_model.safetensors -o ad/adapter_config.json --rank 4 --force` turned the
    config into a folder: the adapter was read with that config, so it is an input too."""
    weights = inputs.adapter / ADAPTER_FILE
    out = inputs.adapter / "adapter_config.json"
    tree = Tree(inputs.root)
    args = {
        "truncate": ["truncate", weights, "-o", out, "--rank", "4"],
        "merge": ["merge", inputs.base, weights, "-o", out],
        "convert": ["convert", weights, "-o", out, "--to", "peft"],
        "combine": ["combine", weights, weights, "-o", out],
    }[command]
    r = cli(*args, "--force")
    _refused(r, names=[out], tree=tree, output=out, existed=True, tools=tools)


@pytest.mark.parametrize("spelling", ["dotdot", "symlinked-parent", "hard-link"])
def test_an_input_spelled_another_way_is_still_an_input(cli, inputs, tools, spelling):
    """Paths are compared resolved (`..`, symlinks) and by (device, inode): a hard link to the
    adapter's weights is the adapter's weights."""
    weights = inputs.adapter / ADAPTER_FILE
    if spelling == "dotdot":
        out = inputs.work / ".." / "in" / inputs.adapter.name / ADAPTER_FILE
    elif spelling == "symlinked-parent":
        (inputs.work / "alias").symlink_to(inputs.adapter, target_is_directory=True)
        out = inputs.work / "alias" / ADAPTER_FILE
    else:
        out = inputs.work / "linked.safetensors"
        os.link(weights, out)
    tree = Tree(inputs.root)
    r = cli("truncate", weights, "-o", out, "--rank", "4", "--force")
    _refused(r, names=[out], tree=tree, output=out, existed=True, tools=tools)
    assert os.path.samefile(out, weights)


def test_an_output_folder_holding_an_input_is_refused(cli, inputs, tools):
    """--force on a folder that contains the adapter would delete the adapter with the old output."""
    tree = Tree(inputs.root)
    r = cli("truncate", inputs.adapter, "-o", inputs.root, "--rank", "4", "--force")
    _refused(r, names=[inputs.root], tree=tree, output=inputs.root, existed=True, tools=tools)
    assert "contains an input" in r.stderr


def test_unmerge_over_the_receipt_it_reads_is_refused(cli, inputs, tools):
    single = _single_file_base(inputs)
    merged = inputs.work / "m.safetensors"
    assert cli("merge", single, inputs.adapter, "-o", merged).code == 0
    receipt = inputs.work / "m.safetensors.loractl.receipt"
    assert receipt.exists()
    tree = Tree(inputs.root, inputs.work)
    r = cli("unmerge", merged, inputs.adapter, "-o", receipt, "--force")
    _refused(r, names=[receipt], tree=tree, output=receipt, existed=True, tools=tools)


def _recipe(folder: Path, output: str, inputs) -> Path:
    recipe = folder / "recipe.toml"
    recipe.write_text(
        "[[step]]\n"
        'name = "ok"\n'
        'run = "truncate"\n'
        f'adapter = "{inputs.adapter}"\n'
        'output = "first"\n'
        "rank = 4\n"
        "\n[[step]]\n"
        'run = "truncate"\n'
        f'adapter = "{inputs.adapter}"\n'
        f'output = "{output}"\n'
        "rank = 2\n"
        "force = true\n"
    )
    return recipe


@pytest.mark.parametrize("output", [".", "recipe.toml", "../work"])
def test_a_recipe_step_cannot_replace_the_recipe(cli, inputs, tools, output):
    """`output = "."` or the recipe's own file with `force = true` replaced the recipe: refused when
    the recipe is read, before any step runs (the first step's output is not written either)."""
    recipe = _recipe(inputs.work, output, inputs)
    tree = Tree(inputs.root, inputs.work)
    r = cli("run", recipe)
    _refused(r, names=[recipe], tree=tree)
    assert "step 'truncate2'" in r.stderr
    assert not (inputs.work / "first").exists()


def test_a_recipe_file_is_protected_while_its_steps_run(inputs, tools):
    """The recipe's file is protected at run time too, for any output a step's function computes."""
    from loractl import api
    from loractl.errors import OutputError
    from loractl.io.atomic import protecting

    recipe = inputs.work / "recipe.toml"
    recipe.write_text("# a recipe\n")
    tree = Tree(inputs.root, inputs.work)
    with protecting([recipe]), pytest.raises(OutputError, match="is an input"):
        api.truncate(inputs.adapter, recipe, rank=4, force=True)
    tree.assert_unchanged()
    assert tools.leftovers(inputs.work) == []


# --------------------------------------------------------------------------------------------
# 2. every file merge writes is checked like the output
# --------------------------------------------------------------------------------------------
def test_an_unrelated_receipt_beside_the_output_is_not_replaced_without_force(cli, inputs, tools):
    single = _single_file_base(inputs)
    out = inputs.work / "out.safetensors"
    receipt = inputs.work / "out.safetensors.loractl.receipt"
    receipt.write_bytes(b"someone else's file")
    tree = Tree(inputs.root, inputs.work)
    r = cli("merge", single, inputs.adapter, "-o", out)
    _refused(r, names=[receipt], tree=tree, output=out, tools=tools)
    assert "already exists" in r.stderr


def test_force_replaces_the_receipt_beside_the_output(cli, inputs, tools):
    single = _single_file_base(inputs)
    out = inputs.work / "out.safetensors"
    receipt = inputs.work / "out.safetensors.loractl.receipt"
    receipt.write_bytes(b"an old receipt")
    r = cli("merge", single, inputs.adapter, "-o", out, "--force")
    assert r.code == 0, r.stderr
    with safe_open(str(receipt), "pt") as f:
        assert f.metadata()["loractl.receipt"] == RECEIPT_VERSION
    back = inputs.work / "back.safetensors"
    assert cli("unmerge", out, inputs.adapter, "-o", back).code == 0
    a, b = load_file(str(back)), load_file(str(single))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_force_without_receipt_removes_the_replaced_outputs_receipt(cli, inputs, tools):
    """The receipt beside a replaced output belonged to it: left there, unmerge would take it for
    the new output's."""
    single = _single_file_base(inputs)
    out = inputs.work / "out.safetensors"
    assert cli("merge", single, inputs.adapter, "-o", out).code == 0
    receipt = inputs.work / "out.safetensors.loractl.receipt"
    assert receipt.exists()
    r = cli("merge", single, inputs.adapter, "-o", out, "--force", "--no-receipt")
    assert r.code == 0, r.stderr
    assert not receipt.exists()
    assert f"removed {receipt}" in r.stdout
    assert sorted(p.name for p in inputs.work.iterdir()) == ["out.safetensors"]


def test_the_receipt_beside_the_output_may_not_be_an_input(cli, inputs, tools):
    """The receipt's path is protected like the output's: here it is the adapter being merged."""
    single = _single_file_base(inputs)
    out = inputs.work / "out.safetensors"
    adapter = inputs.work / "out.safetensors.loractl.receipt"
    shutil.copyfile(inputs.adapter / ADAPTER_FILE, adapter)
    shutil.copyfile(inputs.adapter / "adapter_config.json", inputs.work / "adapter_config.json")
    tree = Tree(inputs.root, inputs.work)
    r = cli("merge", single, adapter, "-o", out, "--force")
    _refused(r, names=[adapter], tree=tree, output=out, tools=tools)
    assert "is an input" in r.stderr


def test_a_spool_named_file_in_the_base_does_not_break_the_receipt(cli, inputs, tools):
    """A `.receipt.spool` in the base folder was copied over merge's own spool: merge said "unmerge
    restores the base bit for bit" and unmerge then exited 3."""
    (inputs.base / ".receipt.spool").write_bytes(os.urandom(4096))
    (inputs.base / "loractl.receipt").write_bytes(b"not ours")
    tree = Tree(inputs.root)
    merged = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", merged)
    assert r.code == 0, r.stderr
    assert not (merged / ".receipt.spool").exists()
    with safe_open(str(merged / "loractl.receipt"), "pt") as f:
        assert f.metadata()["loractl.receipt"] == RECEIPT_VERSION
    back = inputs.work / "back"
    r = cli("unmerge", merged, inputs.adapter, "-o", back)
    assert r.code == 0, r.stderr
    for shard in (SHARD1, SHARD2):
        a, b = load_file(str(back / shard)), load_file(str(inputs.base / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tree.assert_unchanged()
    assert tools.leftovers(inputs.work) == []


# --------------------------------------------------------------------------------------------
# 3. what is copied from the base folder, and with which mode
# --------------------------------------------------------------------------------------------
def test_a_link_out_of_the_base_folder_is_never_followed(cli, inputs, tools):
    """`base/notes.txt -> ../secret.txt` became a regular file holding the secret; even a link named
    like a file merge copies (README.md) is skipped, and the result says so."""
    secret = inputs.root / "secret.txt"
    secret.write_text("THE SECRET\n")
    (inputs.base / "notes.txt").symlink_to("../secret.txt")
    (inputs.base / "README.md").symlink_to("../secret.txt")
    tree = Tree(inputs.root)
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    assert r.code == 0, r.stderr
    assert not os.path.lexists(out / "README.md") and not os.path.lexists(out / "notes.txt")
    for f in out.rglob("*"):
        assert b"THE SECRET" not in f.read_bytes(), f
    assert "README.md: a link to outside" in r.stdout
    tree.assert_unchanged()


def test_a_link_inside_the_base_folder_is_copied_as_the_file(cli, inputs, tools):
    """A link to a file inside the folder is copied as that file (the output stands alone: the
    link's target need not be on the list of copied files)."""
    (inputs.base / "docs").mkdir()
    (inputs.base / "docs" / "license.txt").write_text("Apache-2.0\n")
    (inputs.base / "LICENSE").symlink_to("docs/license.txt")
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, inputs.adapter, "-o", out)
    assert r.code == 0, r.stderr
    assert not (out / "LICENSE").is_symlink() and (out / "LICENSE").read_text() == "Apache-2.0\n"
    assert not (out / "docs").exists()


def test_only_the_files_of_a_model_folder_are_copied(cli, inputs, tools):
    """`.git/`, `.cache/` and `pytorch_model.bin` (the *unmerged* weights) were copied."""
    base = inputs.base
    (base / ".git").mkdir()
    (base / ".git" / "config").write_text("[core]\n")
    (base / ".cache" / "huggingface").mkdir(parents=True)
    (base / ".cache" / "huggingface" / "x.lock").write_text("")
    torch.save({"w": torch.zeros(2)}, base / "pytorch_model.bin")
    (base / "model.gguf").write_bytes(b"GGUF")
    (base / "flax_model.msgpack").write_bytes(b"\x80")
    (base / "notes.txt").write_text("mine\n")
    os.mkfifo(base / "chat_template.jinja")  # copying a fifo would wait forever
    wanted = {
        "merges.txt": "a b\n",
        "vocab.json": "{}",
        "tokenizer.model": "spm",
        "added_tokens.json": "{}",
        "preprocessor_config.json": "{}",
        "processor_config.json": "{}",
        "chat_template.json": "{}",
        "README.md": "# card\n",
        "LICENSE.txt": "MIT\n",
        "NOTICE": "n\n",
        "USE_POLICY.md": "p\n",
        "modeling_custom.py": "# remote code\n",
        "additional_chat_templates/tool_use.jinja": "{{ x }}",
    }
    for rel, text in wanted.items():
        (base / rel).parent.mkdir(exist_ok=True)
        (base / rel).write_text(text)
    tree = Tree(inputs.root)
    out = inputs.work / "merged"
    r = cli("merge", base, inputs.adapter, "-o", out)
    assert r.code == 0, r.stderr
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    copied_from_example = [
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    written = [SHARD1, SHARD2, "model.safetensors.index.json", "loractl.receipt"]
    assert got == sorted([*copied_from_example, *wanted, *written])
    for rel, text in wanted.items():
        assert (out / rel).read_text() == text
    note = next(line for line in r.stdout.splitlines() if "not part of a model folder" in line)
    for name in ("pytorch_model.bin", "model.gguf", "flax_model.msgpack", "notes.txt", "chat_template.jinja"):
        assert name in note, note
    assert ".git" not in note and ".cache" not in note
    tree.assert_unchanged()


def test_the_base_files_modes_are_kept(cli, inputs, tools):
    """0600 shards became 0644: the merged shards, the receipt (it holds base values), the copied
    files and the folder keep the base's permission bits."""
    base = inputs.base
    for shard in (SHARD1, SHARD2):
        os.chmod(base / shard, 0o600)
    os.chmod(base / "model.safetensors.index.json", 0o640)
    os.chmod(base / "config.json", 0o640)
    os.chmod(base / "tokenizer.json", 0o600)
    os.chmod(base / "generation_config.json", 0o444)
    os.chmod(base, 0o700)
    tree = Tree(inputs.root)
    out = inputs.work / "merged"
    r = cli("merge", base, inputs.adapter, "-o", out)
    assert r.code == 0, r.stderr

    def mode(p: Path) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(out) == 0o700
    assert mode(out / SHARD1) == mode(out / SHARD2) == 0o600
    assert mode(out / "loractl.receipt") == 0o600
    assert mode(out / "model.safetensors.index.json") == 0o640
    assert mode(out / "config.json") == 0o640
    assert mode(out / "tokenizer.json") == 0o600
    assert mode(out / "generation_config.json") == 0o444
    assert mode(out / "special_tokens_map.json") == mode(base / "special_tokens_map.json")
    back = inputs.work / "back"
    assert cli("unmerge", out, inputs.adapter, "-o", back).code == 0
    assert mode(back / SHARD1) == 0o600 and mode(back / "config.json") == 0o640
    tree.assert_unchanged()


def test_a_single_file_base_mode_is_kept_by_the_output_and_its_receipt(cli, inputs, tools):
    single = _single_file_base(inputs)
    os.chmod(single, 0o600)
    out = inputs.work / "out.safetensors"
    assert cli("merge", single, inputs.adapter, "-o", out).code == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(inputs.work / "out.safetensors.loractl.receipt").st_mode) == 0o600


def test_a_hugging_face_cache_snapshot_is_copied_through_its_blob_links(cli, inputs, tools):
    """In the Hub cache every file of a snapshot is a link into the repo's blobs/: those links are
    the cache's own layout and are followed (the output holds regular files)."""
    repo = inputs.root / "hub" / "models--org--base"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("c0ffee" * 6 + "abcd")
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(inputs.base.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    tree = Tree(inputs.root)
    out = inputs.work / "merged"
    r = cli("merge", snap, inputs.adapter, "-o", out)
    assert r.code == 0, r.stderr
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (inputs.base / name).read_bytes()
    assert "not copied" not in r.stdout
    tree.assert_unchanged()


# --------------------------------------------------------------------------------------------
# 5. merges that change nothing, unmerges that cannot be right
# --------------------------------------------------------------------------------------------
def _adapter_for_no_module(inputs) -> Path:
    """The example adapter with every module renamed to one the base does not have."""
    other = inputs.root / "other-lora"
    other.mkdir()
    tensors = load_file(str(inputs.adapter / ADAPTER_FILE))
    save_file({k.replace("_proj.", "_projection."): v for k, v in tensors.items()}, str(other / ADAPTER_FILE))
    cfg = json.loads((inputs.adapter / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    return other


def test_allow_partial_with_nothing_matched_is_an_error(cli, inputs, tools):
    other = _adapter_for_no_module(inputs)
    tree = Tree(inputs.root)
    out = inputs.work / "merged"
    r = cli("merge", inputs.base, other, "-o", out, "--allow-partial")
    _refused(r, names=[inputs.base, other], tree=tree, output=out, tools=tools)
    assert "no adapter module matches a base weight" in r.stderr and "is it for this base?" in r.stderr
    assert list(inputs.work.iterdir()) == []


def test_unmerge_of_a_model_merged_with_other_adapters_is_refused(cli, inputs, tools):
    """Without receipt, the merge record in the merged shards names the adapters merged."""
    merged = inputs.work / "merged"
    assert cli("merge", inputs.base, inputs.adapter, "-o", merged, "--no-receipt").code == 0
    other = inputs.root / "other-lora"
    assert cli("truncate", inputs.adapter, "-o", other, "--rank", "2").code == 0
    tree = Tree(inputs.root, inputs.work)
    out = inputs.work / "back"
    r = cli("unmerge", merged, other, "-o", out)
    _refused(r, names=[merged], tree=tree, output=out, tools=tools)
    assert "merged by loractl with other adapters or weights" in r.stderr
    assert "tiny-llama-lora ×1.0" in r.stderr
    r = cli("unmerge", merged, inputs.adapter, "-o", out, "--weight", "0.5")
    _refused(r, names=[merged], tree=tree, output=out, tools=tools)


def test_unmerge_of_a_model_never_merged_warns(cli, inputs, tools):
    """Unmerging from the base itself (never merged, no loractl record) exited 0 without a word."""
    tree = Tree(inputs.root)
    out = inputs.work / "back"
    r = cli("unmerge", inputs.base, inputs.adapter, "-o", out)
    assert r.code == 0, r.stderr
    warnings = [line for line in r.stderr_lines if line.startswith("warning: ")]
    assert len(warnings) == 1, r.stderr
    assert str(inputs.base) in warnings[0] and "holds no loractl merge record" in warnings[0]
    j = cli("unmerge", inputs.base, inputs.adapter, "-o", inputs.work / "j", "--json")
    assert j.code == 0 and "warning" not in j.stderr
    assert "holds no loractl merge record" in json.loads(j.stdout)["warnings"][0]
    tree.assert_unchanged()


def test_unmerge_of_an_unmerged_model_warns(cli, inputs, tools):
    merged, back = inputs.work / "merged", inputs.work / "back"
    assert cli("merge", inputs.base, inputs.adapter, "-o", merged, "--no-receipt").code == 0
    r = cli("unmerge", merged, inputs.adapter, "-o", back)
    assert r.code == 0 and r.stderr == "", r.stderr  # the record matches: nothing to warn about
    r = cli("unmerge", back, inputs.adapter, "-o", inputs.work / "again")
    assert r.code == 0, r.stderr
    assert "was written by loractl unmerge" in r.stderr and r.stderr.startswith("warning: ")


@pytest.mark.parametrize("command", ["similarity", "spectrum"])
def test_a_plot_may_not_overwrite_an_input(cli, inputs, tools, command):
    """--plot (similarity, inspect --spectrum [--base]) wrote over any path given, an input too."""
    pytest.importorskip("matplotlib")
    weights = inputs.adapter / ADAPTER_FILE
    tree = Tree(inputs.root)
    targets = [weights, inputs.adapter / "adapter_config.json"]
    if command == "similarity":  # the second adapter is the folder
        targets += [inputs.adapter / "phi.png"]
    else:
        targets += [inputs.base / SHARD1, inputs.base / "phi.png"]
    for target in targets:
        if command == "similarity":
            r = cli("similarity", weights, inputs.adapter, "--plot", target)
        else:
            r = cli("inspect", weights, "--spectrum", "--base", inputs.base, "--plot", target)
        _refused(r, names=[target], tree=tree, output=target, existed=True, tools=tools)


@pytest.mark.parametrize("out", ["./", ".", ".."])
def test_a_single_file_base_merged_to_a_folder_by_its_place(cli, inputs, tools, monkeypatch, out):
    """`merge base.safetensors AD -o ./ --force` (the fuzzer's seed 11 case 955) named the receipt
    beside an output without a name: a ValueError, exit 3. The output is checked first: exit 2."""
    single = _single_file_base(inputs)
    monkeypatch.chdir(inputs.work)
    snap = tools.Snapshot([inputs.root])
    before = sorted(p.name for p in inputs.work.iterdir())
    r = cli("merge", single, inputs.adapter, "-o", out, "--force")
    assert r.code == 2, r.stdout + r.stderr
    assert 1 <= len(r.stderr_lines) <= 2 and r.stderr_lines[0].startswith(f"error: {out.rstrip('/')}:"), r.stderr
    assert sorted(p.name for p in inputs.work.iterdir()) == before
    snap.assert_unchanged()
