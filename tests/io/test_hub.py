"""Hub references (org/name[@revision]) resolved by the real huggingface_hub client against a local fake Hub.

Nothing reaches the real Hub: huggingface_hub is pointed at a server on 127.0.0.1 (hub_server.py)
and its cache lives in tmp_path.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_model, make_adapter, read_st, same_bits, save_base

from loractl import api
from loractl.errors import InputError
from loractl.io.base import open_base
from loractl.io.hub import is_hub_ref, parse_hub_ref, resolve_adapter, resolve_base

from .hub_server import FakeHub, Request, running, set_offline

#: files of a real-looking base repo that are not needed and must never be fetched
DECOYS = {
    "pytorch_model.bin": b"not a real pickle",
    "pytorch_model.bin.index.json": '{"weight_map": {}}',
    "flax_model.msgpack": b"decoy",
    "model.gguf": b"GGUF decoy",
    "onnx/model.onnx": b"decoy",
    "original/consolidated.00.pth": b"decoy",
    ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}
TOKENIZER = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"model_max_length": 64}',
    "special_tokens_map.json": '{"bos_token": "<s>"}',
    "merges.txt": "#version: 0.2\n",
    "tokenizer.model": b"sentencepiece-ish",
    "README.md": "---\nlicense: apache-2.0\n---\n",
}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama saved in 2 shards, and two PEFT adapters for it (seeded), built once."""
    root = tmp_path_factory.mktemp("local")
    model = build_model("llama")
    base = save_base(model, root / "base", max_shard_size="50KB")
    assert len(list(base.glob("*.safetensors"))) == 2
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return {
        "base": base,
        "v1": make_adapter(model, root / "v1", seed=1, **lora),
        "v2": make_adapter(model, root / "v2", seed=2, **lora),
    }


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with running(tmp_path / "hf", monkeypatch) as h:
        yield h


@pytest.fixture
def repos(hub: FakeHub, local: dict[str, Path]) -> dict[str, str]:
    """org/base (sharded, with tokenizer and decoys); org/adapter with tag v1 and a newer main."""
    shas = {"base": hub.add_folder("org/base", local["base"], extra={**TOKENIZER, **DECOYS})}
    decoy = {"adapter_model.bin": b"decoy", "README.md": "adapter card"}
    shas["v1"] = hub.add_folder("org/adapter", local["v1"], extra=decoy)
    hub.tag("org/adapter", "v1", shas["v1"])
    shas["v2"] = hub.add_folder("org/adapter", local["v2"], extra=decoy)
    return shas


def _same_files(folder: Path, expected: Path) -> bool:
    """Every file of ``expected`` is in ``folder`` with the same bytes."""
    return all((folder / p.name).read_bytes() == p.read_bytes() for p in expected.iterdir())


# -- what is a Hub reference ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("org/name", ("org/name", None)),
        ("meta-llama/Llama-3.1-8B", ("meta-llama/Llama-3.1-8B", None)),
        ("org/name@v1", ("org/name", "v1")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
        ("name", None),
        ("./org/name", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("org/name@", None),
        ("org/na--me", None),
        ("org/name.", None),
        ("out/adapter.safetensors", None),
        ("dir/model.gguf", None),
        ("C:/models", None),
    ],
)
def test_parse_hub_ref(text: str, parsed: tuple[str, str | None] | None) -> None:
    assert parse_hub_ref(text) == parsed


def test_a_local_path_always_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_ref("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_ref("org/name")
    assert not is_hub_ref(Path("org/name"))
    assert is_hub_ref("org/name@v1")  # no local path of that name
    (tmp_path / "org" / "file").write_text("x")
    assert not is_hub_ref("org/file")


def test_not_a_reference_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a Hugging Face Hub reference"):
        resolve_base("just-a-name")


# -- downloads: only what is needed, index first -------------------------------------------------


def test_sharded_base_fetches_the_index_then_its_shards_and_no_decoy(hub: FakeHub, repos: dict) -> None:
    folder = resolve_base("org/base")

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    small = ["config.json", "generation_config.json", *TOKENIZER]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.safetensors.index.json", *shards, *small]
    )
    assert folder.name == repos["base"]  # the snapshot folder of the commit main points to
    touched = hub.touched("org/base")
    assert touched[0] == "model.safetensors.index.json"  # read before anything else is asked for
    assert sorted(touched[1:]) == sorted([*shards, *small])  # then its shards and the small files
    assert sorted(hub.downloads("org/base")) == sorted(["model.safetensors.index.json", *shards, *small])
    with open_base(folder) as b:
        assert b.index_name == "model.safetensors.index.json" and len(b.shards) == 2
        assert "tokenizer.json" in {p.as_posix() for p in b.other_files}

    hub.clear()  # a second resolution is served by the cache: no file is asked for again
    assert resolve_base("org/base") == folder
    assert hub.touched() == []


def test_single_file_base_skips_the_pickle_twin(hub: FakeHub) -> None:
    hub.add_commit(
        "org/single",
        {
            "model.safetensors": b"weights",
            "pytorch_model.bin": b"pickle",
            "config.json": "{}",
            "tf_model.h5": b"tf",
        },
    )
    folder = resolve_base("org/single@main")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(hub.touched("org/single")) == ["config.json", "model.safetensors"]


def test_only_the_needed_files_are_requested(hub: FakeHub, repos: dict) -> None:
    sha = repos["base"]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    needed = ["model.safetensors.index.json", *shards, "config.json", "generation_config.json", *TOKENIZER]
    folder = resolve_base("org/base")

    asked = [(r.method, r.path) for r in hub.requests]
    # one revision lookup, one listing of that commit, then one HEAD and one GET per needed file
    assert asked[:2] == [
        ("GET", "/api/models/org/base/revision/main"),
        ("GET", f"/api/models/org/base/tree/{sha}"),
    ]
    assert sorted(asked[2:]) == sorted(
        (m, f"/org/base/resolve/{sha}/{f}") for f in needed for m in ("HEAD", "GET")
    )
    assert len(asked) == 2 + 2 * len(needed) == 24

    hub.clear()  # cached: the branch is looked up again (it may have moved), nothing else
    assert resolve_base("org/base") == folder
    assert [r.path for r in hub.requests] == ["/api/models/org/base/revision/main"]
    hub.clear()  # cached at a commit: nothing can have moved, nothing is asked
    assert resolve_base(f"org/base@{sha}") == folder
    assert hub.requests == []


def test_no_warning_when_a_repo_has_no_index(hub: FakeHub, local: dict) -> None:
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.addHandler(handler)
    try:
        hub.add_commit("org/gguf", {"lora.gguf": b"GGUF"})
        hub.add_commit("org/single", {"model.safetensors": b"w", "config.json": "{}"})
        assert resolve_adapter("org/gguf").read_bytes() == b"GGUF"
        assert resolve_base("org/single").joinpath("model.safetensors").read_bytes() == b"w"
    finally:
        hf_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []


def test_adapter_at_a_tag_a_commit_and_the_default_branch(hub: FakeHub, repos: dict, local: dict) -> None:
    v1 = resolve_adapter("org/adapter@v1")
    assert v1.name == repos["v1"] and _same_files(v1, local["v1"])
    assert resolve_adapter(f"org/adapter@{repos['v1']}") == v1
    latest = resolve_adapter("org/adapter")
    assert latest.name == repos["v2"] and _same_files(latest, local["v2"])
    assert set(hub.touched("org/adapter")) == {"adapter_config.json", "adapter_model.safetensors"}


def _index(*shards: str) -> str:
    return json.dumps({"metadata": {}, "weight_map": {f"t{i}": s for i, s in enumerate(shards)}})


@pytest.mark.parametrize(
    "moment",
    ["/api/models/org/race/tree/", "model.safetensors.index.json", "old.safetensors"],
    ids=["after-the-revision-lookup", "after-the-listing", "while-fetching-the-shards"],
)
def test_a_branch_moving_meanwhile_cannot_mix_commits(hub: FakeHub, moment: str) -> None:
    old = hub.add_commit(
        "org/race",
        {
            "model.safetensors.index.json": _index("old.safetensors"),
            "old.safetensors": b"old",
            "config.json": "1",
        },
    )
    new: list[str] = []

    def commit_once(request: Request) -> None:  # main moves as this request arrives, before it is answered
        if not new and moment in request.path:
            files = {"model.safetensors.index.json": _index("new.safetensors"), "new.safetensors": b"new"}
            new.append(hub.add_commit("org/race", {**files, "config.json": "2"}))

    hub.on_request = commit_once
    folder = resolve_base("org/race")
    assert new and hub.repos["org/race"].refs["main"] == new[0] != old  # main did move meanwhile
    assert folder.name == old  # every file is the commit main pointed to when it was looked up
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors.index.json",
        "old.safetensors",
    ]
    assert (folder / "config.json").read_text() == "1"
    assert {p.split("/")[4] for p in hub.paths() if "/resolve/" in p} == {old}  # pinned downloads
    assert {p.split("/")[6] for p in hub.paths() if "/tree/" in p} == {old}  # and listing

    later = resolve_base("org/race")  # the next resolution sees the new commit, whole
    assert later.name == new[0] and (later / "new.safetensors").read_bytes() == b"new"
    assert not (later / "old.safetensors").exists() and (later / "config.json").read_text() == "2"


def test_merge_with_hub_resolved_paths_equals_the_local_merge(
    hub: FakeHub, repos: dict, local: dict, tmp_path: Path
) -> None:
    base, adapter = resolve_base("org/base"), resolve_adapter("org/adapter@v1")
    api.merge(base, [adapter], tmp_path / "from-hub")
    api.merge(local["base"], [local["v1"]], tmp_path / "from-disk")

    got, want = read_st(tmp_path / "from-hub"), read_st(tmp_path / "from-disk")
    assert got.keys() == want.keys()
    assert all(same_bits(got[k], want[k]) for k in want)
    out = {p.name for p in (tmp_path / "from-hub").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= out
    assert not out & set(DECOYS)
    assert not any(p.is_symlink() for p in (tmp_path / "from-hub").iterdir())  # copies, not cache links


# -- offline, and a Hub out of reach ---------------------------------------------------------------


def test_offline_resolves_from_the_cache(hub: FakeHub, repos: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.tag("org/adapter", "refs/pr/1", repos["v1"])
    base, v1, latest = (
        resolve_base("org/base"),
        resolve_adapter("org/adapter@v1"),
        resolve_adapter("org/adapter"),
    )
    assert resolve_adapter("org/adapter@refs/pr/1") == v1
    set_offline(monkeypatch)
    hub.clear()

    assert resolve_base("org/base") == base
    assert resolve_adapter("org/adapter@v1") == v1  # the tag, through the cache's refs/
    assert resolve_adapter(f"org/adapter@{repos['v1']}") == v1
    assert resolve_adapter("org/adapter@refs/pr/1") == v1  # a revision with slashes
    assert resolve_adapter("org/adapter") == latest
    with open_base(resolve_base("org/base")) as b:
        assert len(b.shards) == 2
    assert hub.requests == []  # the Hub still runs: offline asked it nothing


def test_offline_and_not_cached_names_the_repo(
    hub: FakeHub, repos: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve_adapter("org/adapter")
    set_offline(monkeypatch)
    with pytest.raises(InputError, match=r"^org/base: not in the Hugging Face cache.*HF_HUB_OFFLINE=1") as e:
        resolve_base("org/base")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"^org/adapter@v1: not in the Hugging Face cache"):
        resolve_adapter("org/adapter@v1")  # main is cached, v1 is not
    with pytest.raises(InputError, match=r"^org/adapter@" + "0" * 40 + ": not in the Hugging Face cache"):
        resolve_adapter("org/adapter@" + "0" * 40)
    assert hub.paths()[-1].startswith("/org/adapter/resolve/")  # offline asked nothing


def test_hub_out_of_reach_uses_the_cache_or_says_so(hub: FakeHub, repos: dict) -> None:
    base = resolve_base("org/base")
    latest = resolve_adapter("org/adapter")
    hub.stop()  # HF_HUB_OFFLINE is not set: connections are refused
    assert resolve_base("org/base") == base
    assert resolve_adapter("org/adapter") == latest
    assert resolve_adapter(f"org/adapter@{repos['v2']}") == latest
    with pytest.raises(
        InputError, match=r"^org/adapter@v1: cannot reach the Hub at http://127\.0\.0\.1"
    ) as e:
        resolve_adapter("org/adapter@v1")
    assert "HF_HUB_OFFLINE=1" in (e.value.hint or "")


def test_hub_out_of_reach_from_the_command_line(hub: FakeHub, repos: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loractl.cli.app import app

    resolve_adapter("org/adapter")
    hub.stop()
    r = CliRunner().invoke(app, ["inspect", "org/adapter", "--json"])  # cached: works unreachable
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, ["merge", "org/base", "org/adapter", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.stdout == "" and not (tmp_path / "out").exists()
    error, hint = r.stderr.splitlines()
    assert re.fullmatch(
        r"error: org/base: cannot reach the Hub at http://127\.0\.0\.1:\d+ \(ConnectError\) and it is not in the cache",
        error,
    )
    assert hint.startswith("hint: check the connection")


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_a_partly_cached_base_is_refused(
    hub: FakeHub, repos: dict, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    folder = resolve_base("org/base")
    (folder / "model-00002-of-00002.safetensors").unlink()  # e.g. a download interrupted, or a cache pruned
    set_offline(monkeypatch) if how == "offline" else hub.stop()
    expected = {
        "offline": r"^org/base: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it$",
        "unreachable": r"^org/base: cannot reach the Hub at \S+ \(ConnectError\) and it is not in the cache$",
    }
    with pytest.raises(InputError, match=expected[how]):
        resolve_base("org/base")


def test_offline_with_a_cache_filled_file_by_file(
    hub: FakeHub, repos: dict, local: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache filled file by file (``hf_hub_download``, as transformers' ``from_pretrained`` does) holds
    no listing of the commit: offline, the files in its snapshot folder are what there is."""
    from huggingface_hub import hf_hub_download

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for f in ["model.safetensors.index.json", shards[0], "config.json"]:
        base = Path(hf_hub_download("org/base", f)).parent
    for f in local["v1"].iterdir():
        adapter = Path(hf_hub_download("org/adapter", f.name, revision="v1")).parent
    set_offline(monkeypatch)

    assert resolve_adapter("org/adapter@v1") == adapter and _same_files(adapter, local["v1"])
    with pytest.raises(InputError, match=r"^org/adapter@v1: no subfolder x in the cache$"):
        resolve_adapter("org/adapter@v1", subfolder="x")
    with pytest.raises(
        InputError, match=rf"^org/base \({shards[1]}\): not in the Hugging Face cache, and HF_HUB_OFFLINE"
    ):
        resolve_base("org/base")  # the index lists a shard that was never downloaded
    set_offline(monkeypatch, False)
    hf_hub_download("org/base", shards[1])
    set_offline(monkeypatch)
    assert resolve_base("org/base") == base
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["model.safetensors.index.json", *shards, "config.json"]
    )


def test_hub_down_names_the_status(hub: FakeHub, repos: dict) -> None:
    hub.fail_status = 503
    with pytest.raises(InputError, match=r"^org/base: cannot reach the Hub .*\(HTTP 503\)"):
        resolve_base("org/base")


# -- errors ----------------------------------------------------------------------------------------


def test_missing_repo_is_named(hub: FakeHub) -> None:
    with pytest.raises(InputError, match=r"^org/nope: no such local path, and no model repo org/nope") as e:
        resolve_base("org/nope")
    assert "HF_TOKEN" in (e.value.hint or "")


def test_missing_revision_names_repo_and_revision(hub: FakeHub, repos: dict) -> None:
    with pytest.raises(InputError, match=r"^org/adapter@v9: no revision v9 in the Hub repo org/adapter$"):
        resolve_adapter("org/adapter@v9")


def test_gated_repo_needs_a_granted_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, local: dict) -> None:
    hub.add_repo("org/gated", gated=True, tokens=("hf_granted",))
    hub.add_folder("org/gated", local["v1"])
    with pytest.raises(InputError, match=r"^org/gated: gated repo") as e:
        resolve_adapter("org/gated")
    assert "HF_TOKEN" in (e.value.hint or "") and "hf auth login" in (e.value.hint or "")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(InputError, match=r"^org/gated: gated repo"):
        resolve_adapter("org/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert _same_files(resolve_adapter("org/gated"), local["v1"])
    assert hub.requests[-1].authorization == "Bearer hf_granted"


def test_private_repo_without_token_reads_as_missing(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/private", private=True, tokens=("hf_mine",))
    hub.add_commit("org/private", {"model.safetensors": b"w"})
    with pytest.raises(InputError, match=r"^org/private: .*or it is private"):
        resolve_base("org/private")
    monkeypatch.setenv("HF_TOKEN", "hf_mine")
    assert resolve_base("org/private").joinpath("model.safetensors").read_bytes() == b"w"


def test_index_listing_a_missing_shard(hub: FakeHub) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "gone.safetensors"}}
    hub.add_commit(
        "org/broken",
        {"model.safetensors.index.json": json.dumps(index), "model-00001-of-00002.safetensors": b"w"},
    )
    with pytest.raises(
        InputError, match=r"^org/broken: model.safetensors.index.json lists shard gone.safetensors"
    ):
        resolve_base("org/broken")


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors", "/tmp/x.safetensors"])
def test_index_listing_a_shard_outside_the_repo_is_refused(
    hub: FakeHub, local: dict, tmp_path: Path, shard: str
) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard}}
    hub.add_commit(
        "org/evil",
        {"model.safetensors.index.json": json.dumps(index), "model-00001-of-00002.safetensors": b"w"},
    )
    with pytest.raises(
        InputError,
        match=rf"^org/evil: model.safetensors.index.json lists shard '{re.escape(shard)}', a path that leaves the repo$",
    ):
        api.merge("org/evil", [local["v1"]], tmp_path / "out")
    assert hub.touched("org/evil") == ["model.safetensors.index.json"]  # nothing fetched after the index
    assert not (tmp_path / "out").exists()


def test_pickle_only_base_points_at_a_conversion(hub: FakeHub) -> None:
    hub.add_commit("org/old", {"pytorch_model.bin": b"pickle", "config.json": "{}"})
    with pytest.raises(InputError, match=r"^org/old: holds only pickle weights \(pytorch_model.bin\)") as e:
        resolve_base("org/old")
    assert "refs/pr/" in (e.value.hint or "")
    assert hub.touched("org/old") == []


def test_adapter_candidates_and_subfolders(hub: FakeHub, local: dict) -> None:
    peft = {f"a/{p.name}": p for p in local["v1"].iterdir()}
    hub.add_commit(
        "org/multi",
        {**peft, "b/lora.gguf": b"GGUF", "one.safetensors": b"1", "two.safetensors": b"2", "c/x.bin": b"p"},
    )
    with pytest.raises(InputError, match=r"^org/multi: 2 candidate adapter files \(one.safetensors, two"):
        resolve_adapter("org/multi")
    a = resolve_adapter("org/multi", subfolder="a")
    assert a.name == "a" and _same_files(a, local["v1"])
    gguf = resolve_adapter("org/multi", subfolder="/b/")
    assert gguf.name == "lora.gguf" and gguf.read_bytes() == b"GGUF"
    with pytest.raises(InputError, match=r"^org/multi: no subfolder z$"):
        resolve_adapter("org/multi", subfolder="z")
    with pytest.raises(InputError, match=r"^org/multi: no subfolder \.\./a$"):
        resolve_adapter("org/multi", subfolder="../a")
    with pytest.raises(InputError, match=r"^org/multi \(subfolder c\): no adapter"):
        resolve_adapter("org/multi", subfolder="c")

    hub.add_commit("org/nested", {"x/adapter_config.json": "{}", "x/adapter_model.safetensors": b"w"})
    with pytest.raises(InputError, match=r"^org/nested: no adapter") as e:
        resolve_adapter("org/nested")
    assert e.value.hint == "pass subfolder=… (x)" and e.value.cli_hint == "pass --subfolder (x)"

    hub.add_commit("org/pickled", {"adapter_config.json": "{}", "adapter_model.bin": b"p"})
    with pytest.raises(InputError, match=r"^org/pickled: holds only a pickle adapter \(adapter_model.bin\)"):
        resolve_adapter("org/pickled")


# -- progress bars ---------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [False, True])
def test_progress_bars_only_when_asked_and_only_meanwhile(
    hub: FakeHub, repos: dict, monkeypatch: pytest.MonkeyPatch, progress: bool
) -> None:
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled

    # bars enabled, and HF_HUB_DISABLE_PROGRESS_BARS unset, whatever the environment running the tests
    hf_tqdm = sys.modules["huggingface_hub.utils.tqdm"]
    monkeypatch.setattr(hf_tqdm, "progress_bar_states", {})
    monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    seen: list[bool] = []
    real = huggingface_hub.snapshot_download

    def spy(*args: object, **kwargs: object) -> str:
        seen.append(are_progress_bars_disabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert not are_progress_bars_disabled()
    resolve_adapter("org/adapter", progress=progress)
    assert seen == [not progress] * 2  # the config (listing the commit), then the weights
    assert not are_progress_bars_disabled()  # as before the call


# -- the fake Hub itself answers as the Hub does --------------------------------------------------


def test_fake_hub_serves_listing_pages_and_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi, snapshot_download

    with running(tmp_path / "hf", monkeypatch, page_size=2) as hub:
        files = {"config.json": "{}", "model.safetensors": b"w" * 10, "sub/a.txt": "a", "sub/deep/b.txt": "b"}
        sha = hub.add_commit("org/x", files)
        hf = HfApi()
        assert sorted(hf.list_repo_files("org/x")) == sorted(files)
        assert sum(p.startswith("/api/models/org/x/tree/") for p in hub.paths()) == 3  # 6 entries, 2 a page
        info = hf.model_info("org/x", files_metadata=True)
        assert info.sha == sha and {s.rfilename: s.size for s in info.siblings}["model.safetensors"] == 10
        top = {e.path for e in hf.list_repo_tree("org/x")}
        assert top == {"config.json", "model.safetensors", "sub"}
        folder = Path(snapshot_download("org/x", allow_patterns=["sub/*"]))
        assert (folder / "sub/deep/b.txt").read_text() == "b" and not (folder / "config.json").exists()


# -- wired into the commands ---------------------------------------------------------------------


def test_merge_and_inspect_take_hub_references_directly(
    hub: FakeHub, repos: dict, local: dict, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from loractl.cli.app import app

    api.merge("org/base", ["org/adapter@v1"], tmp_path / "m")
    api.merge(local["base"], [local["v1"]], tmp_path / "d")
    got, want = read_st(tmp_path / "m"), read_st(tmp_path / "d")
    assert all(same_bits(got[k], want[k]) for k in want)
    r = CliRunner().invoke(app, ["inspect", "org/adapter@v1", "--base", "org/base", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)["adapters"][0]
    assert doc["base"]["coverage"]["unmatched"] == [] and doc["modules"] > 0
    r = CliRunner().invoke(app, ["merge", "org/base", "org/nope", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "org/nope" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(app, ["inspect", "org/adapter@no-such-rev"])
    assert r.exit_code == 2 and "no-such-rev" in r.stderr
