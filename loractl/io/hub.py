"""Hugging Face Hub references: ``org/name`` or ``org/name@revision`` for a base model or an adapter.

Everything goes through huggingface_hub's own functions, so its cache (``HF_HOME``,
``HF_HUB_CACHE``), ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and token (``HF_TOKEN``, ``hf auth login``)
are honoured. Only the files loractl needs are downloaded:

- a base model: its safetensors index first, then exactly the shards it lists (or the single
  ``model.safetensors``), plus the small files that are not weights (``config.json``, tokenizer
  files...); never the duplicate weights some repos also hold (``pytorch_model.bin``, ``.gguf``,
  ``.onnx``, ``.h5``, ``.msgpack``...);
- an adapter: ``adapter_config.json`` + ``adapter_model.safetensors``, or the one ``.safetensors``
  or ``.gguf`` file of the repo (or of ``subfolder``).

The revision is resolved to a commit once and every file is downloaded at that commit, so a branch
that moves meanwhile cannot mix files of two commits. With ``HF_HUB_OFFLINE=1``, or when the Hub
cannot be reached, the revision and the files come from the cache alone.

huggingface_hub is imported only when a reference is resolved (``loractl --help`` stays light).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NoReturn

from ..errors import FormatError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import HfApi

__all__ = ["WEIGHT_SUFFIXES", "is_hub_ref", "parse_hub_ref", "resolve_adapter", "resolve_base"]

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REF_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?")

#: names that look like files rather than repos: ``dir/adapter.safetensors`` is a (missing) local path
_FILE_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".toml")

#: weights in any format: a base repo's non-weight files are everything else (config, tokenizer...)
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".ggml",
    ".onnx",
    ".onnx_data",
    ".h5",
    ".msgpack",
    ".ot",
    ".tflite",
    ".mlmodel",
    ".pb",
    ".npz",
    ".npy",
    ".pkl",
    ".pickle",
    ".joblib",
    ".nemo",
    ".pdparams",
    ".llamafile",
    ".mar",
    ".engine",
    ".zip",
    ".tar",
    ".gz",
)
#: model-card media: not part of the model either
_MEDIA_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".mp4", ".webm", ".wav", ".mp3", ".pdf")

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PICKLES = ("adapter_model.bin", "adapter_model.pt")
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


def parse_hub_ref(text: str) -> tuple[str, str | None] | None:
    """The repo id and revision of an ``org/name`` or ``org/name@revision`` reference.

    Only the shape is checked (a valid Hub repo id, an optional revision); whether a local path of
    that name exists is :func:`is_hub_ref`'s business.

    Args:
        text: what the user gave as a BASE or ADAPTER argument.

    Returns:
        ``(repo_id, revision)``, revision None when not given; None when ``text`` is not of that shape.
    """
    m = _REF_RE.fullmatch(text)
    if m is None:
        return None
    repo = m["repo"]
    if "--" in repo or ".." in repo or repo.endswith((".git", *_FILE_SUFFIXES)):
        return None
    if any(part[-1] in ".-" for part in repo.split("/")):
        return None
    return repo, m["revision"]


def is_hub_ref(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names a Hub repo: ``org/name[@revision]`` that is not an existing local path.

    A local path always wins: ``org/name`` is read from disk when a file or folder of that name
    exists (relative to the current directory).
    """
    text = os.fspath(text)
    return parse_hub_ref(text) is not None and not os.path.lexists(text)


def resolve_base(ref: str | os.PathLike[str], *, progress: bool = False) -> Path:
    """Download (or find in the cache) the files of a base model on the Hub.

    Downloads the safetensors index first, then exactly the shards it lists (or the single
    ``model.safetensors`` / ``diffusion_pytorch_model.safetensors``, or the repo's only
    ``.safetensors`` file), then every top-level file that is not weights (``config.json``,
    ``generation_config.json``, tokenizer files...). Other weight formats are never downloaded.

    Args:
        ref: ``org/name`` or ``org/name@revision`` (branch, tag or commit).
        progress: show huggingface_hub's download bars on stderr.

    Returns:
        The snapshot folder in the Hugging Face cache, ready for :func:`loractl.io.base.open_base`.

    Raises:
        InputError: not a Hub reference, no such repo or revision, gated or private repo without
            access, no safetensors weights, not cached in offline mode, the Hub unreachable.
        FormatError: the repo's safetensors index is not valid JSON with a ``weight_map``.
    """
    repo_id, revision = _parse(ref)
    with _progress_bars(progress), _hub_errors(repo_id, revision):
        snap = _Snapshot.open(repo_id, revision)
        paths = [snap.get(f) for f in _base_files(snap)]
    return paths[0].parent


def resolve_adapter(
    ref: str | os.PathLike[str], *, subfolder: str | None = None, progress: bool = False
) -> Path:
    """Download (or find in the cache) an adapter on the Hub.

    A PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) gives its folder;
    otherwise the one ``.safetensors`` or ``.gguf`` file of the repo (or of ``subfolder``) is
    downloaded, with ``adapter_config.json`` beside it when there is one.

    Args:
        ref: ``org/name`` or ``org/name@revision`` (branch, tag or commit).
        subfolder: a folder inside the repo holding the adapter (``--subfolder``).
        progress: show huggingface_hub's download bars on stderr.

    Returns:
        The adapter's folder (PEFT) or file, in the Hugging Face cache.

    Raises:
        InputError: not a Hub reference, no such repo, revision or subfolder, no adapter file or
            several candidates, a pickle-only adapter, gated or private repo without access, not
            cached in offline mode, the Hub unreachable.
    """
    repo_id, revision = _parse(ref)
    sub = (subfolder or "").strip("/")
    with _progress_bars(progress), _hub_errors(repo_id, revision):
        snap = _Snapshot.open(repo_id, revision)
        files, result = _adapter_files(snap, sub)
        paths = {f: snap.get(f) for f in files}
    return paths[result].parent if PurePosixPath(result).name == _ADAPTER_CONFIG else paths[result]


def _parse(ref: str | os.PathLike[str]) -> tuple[str, str | None]:
    ref = os.fspath(ref)
    parsed = parse_hub_ref(ref)
    if parsed is None:
        raise InputError(f"{ref}: not a Hugging Face Hub reference (expected org/name or org/name@revision)")
    return parsed


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


@dataclass
class _Snapshot:
    """The files of one commit of a repo, and the way to get each of them as a local file.

    Attributes:
        repo_id: ``org/name``.
        revision: the revision as the user gave it (None: the default branch).
        commit: the commit it resolved to; every download is pinned to it.
        files: every file of the commit (``/``-separated paths); only the cached ones when offline.
        cached_folder: the cached snapshot folder when resolving from the cache alone, else None.
        unreachable: why the Hub was not asked (an exception), when resolving from the cache.
    """

    repo_id: str
    revision: str | None
    commit: str
    files: list[str]
    cached_folder: Path | None = None
    unreachable: BaseException | None = None

    @property
    def label(self) -> str:
        return _label(self.repo_id, self.revision)

    @classmethod
    def open(cls, repo_id: str, revision: str | None) -> _Snapshot:
        """Resolve the revision and list the files: from the Hub, or from the cache when offline or unreachable."""
        from huggingface_hub import HfApi, is_offline_mode

        api = HfApi()
        if is_offline_mode():
            return cls._from_cache(api, repo_id, revision, None)
        try:
            info = api.model_info(repo_id, revision=revision)
            # records revision -> commit in the cache's refs/, so that offline use finds it
            pinned = api.resolve_revision(repo_id, revision=revision)
            if pinned.resolved != info.sha:  # the branch moved in between: list the commit recorded
                info = api.model_info(repo_id, revision=pinned.resolved)
        except Exception as e:
            if not _is_unreachable(e):
                raise
            return cls._from_cache(api, repo_id, revision, e)
        files = [s.rfilename for s in info.siblings or []]
        return cls(repo_id, revision, pinned.resolved, files)

    @classmethod
    def _from_cache(
        cls, api: HfApi, repo_id: str, revision: str | None, unreachable: BaseException | None
    ) -> _Snapshot:
        from huggingface_hub import constants
        from huggingface_hub.errors import RevisionResolutionError
        from huggingface_hub.file_download import repo_folder_name

        try:
            pinned = api.resolve_revision(repo_id, revision=revision, local_files_only=True)
        except RevisionResolutionError:
            _not_cached(_label(repo_id, revision), unreachable)
        folder = (
            Path(constants.HF_HUB_CACHE)
            / repo_folder_name(repo_id=repo_id, repo_type="model")
            / "snapshots"
            / pinned.resolved
        )
        if not folder.is_dir():
            _not_cached(_label(repo_id, revision), unreachable)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        return cls(repo_id, revision, pinned.resolved, files, folder, unreachable)

    def get(self, filename: str) -> Path:
        """The local path of one file of the commit, downloaded if needed (a cache hit costs nothing)."""
        if PurePosixPath(filename).is_absolute() or ".." in PurePosixPath(filename).parts:
            raise InputError(f"{self.label}: refusing the file name {filename!r}, which leaves the repo")
        if self.cached_folder is not None:
            path = self.cached_folder / filename
            if not path.is_file():
                _not_cached(f"{self.label} ({filename})", self.unreachable)
            return path
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.commit))
        except RemoteEntryNotFoundError:
            raise InputError(f"{self.label}: file {filename} is missing from the Hub repo") from None


def _top_level(files: list[str], folder: str = "") -> list[str]:
    """The files directly in ``folder`` (not in its subfolders), as paths relative to the repo."""
    prefix = f"{folder}/" if folder else ""
    return [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]]


def _is_small_file(name: str) -> bool:
    """A top-level file a base repo needs besides its weights: config, tokenizer, chat template, card..."""
    lower = name.lower()
    return not (
        name.startswith(".")
        or lower.endswith(WEIGHT_SUFFIXES)
        or lower.endswith(_MEDIA_SUFFIXES)
        or lower.endswith(".index.json")  # the index of other weights (pytorch_model.bin.index.json...)
    )


def _base_files(snap: _Snapshot) -> list[str]:
    """The files of a base model to fetch, in order: the index (fetched here to read it), its shards, the rest."""
    from .base import INDEX_NAMES, SINGLE_NAMES

    top = _top_level(snap.files)
    index = next((n for n in INDEX_NAMES if n in top), None)
    if index is not None:
        path = snap.get(index)
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise FormatError(
                f"{snap.label}: {index} is not a valid safetensors index (no weight_map)"
            ) from None
        if snap.cached_folder is None:
            missing = [s for s in shards if s not in snap.files]
            if missing:
                raise InputError(f"{snap.label}: {index} lists shard {missing[0]} which is not in the repo")
        weights = [index, *shards]
    else:
        single = next((n for n in SINGLE_NAMES if n in top), None)
        found = [f for f in top if f.endswith(".safetensors")]
        if single is not None:
            weights = [single]
        elif len(found) == 1:
            weights = found
        elif found:
            raise InputError(
                f"{snap.label}: {len(found)} .safetensors files ({', '.join(found[:3])}) and no index; "
                "which one is the model?",
                hint=f"download the one you want (`hf download {snap.repo_id} FILE`) and pass its local path",
            )
        else:
            _no_weights(snap, top)
    return weights + [f for f in top if f not in weights and _is_small_file(f)]


def _no_weights(snap: _Snapshot, top: list[str]) -> NoReturn:
    where = "in the cache" if snap.cached_folder is not None else "in the repo"
    pickles = [f for f in top if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise InputError(
            f"{snap.label}: holds only pickle weights ({pickles[0]}); loractl reads safetensors",
            hint="look for a safetensors conversion of this repo (often a pull request: org/name@refs/pr/N)",
        )
    raise InputError(
        f"{snap.label}: no safetensors weights {where} (no model.safetensors, index or *.safetensors at the top)"
    )


def _adapter_files(snap: _Snapshot, sub: str) -> tuple[list[str], str]:
    """The adapter files to fetch and the one that stands for the adapter (its config: the folder)."""
    where = f"{snap.label}{f' (subfolder {sub})' if sub else ''}"
    if sub and not any(f.startswith(f"{sub}/") for f in snap.files):
        cached = " in the cache" if snap.cached_folder is not None else ""
        raise InputError(f"{snap.label}: no subfolder {sub}{cached}", hint="check --subfolder")
    here = _top_level(snap.files, sub)
    prefix = f"{sub}/" if sub else ""
    config, weights = prefix + _ADAPTER_CONFIG, prefix + _ADAPTER_WEIGHTS
    if config in here and weights in here:
        return [config, weights], config
    found = [f for f in here if f.endswith((".safetensors", ".gguf"))]
    if len(found) == 1:
        return ([config] if config in here else []) + found, found[0]
    if found:
        names = ", ".join(PurePosixPath(f).name for f in found[:3])
        raise InputError(
            f"{where}: {len(found)} candidate adapter files ({names}{', ...' if len(found) > 3 else ''}); "
            "which one?",
            hint=f"download the one you want (`hf download {snap.repo_id} FILE`) and pass its local path",
        )
    pickles = [f for f in here if PurePosixPath(f).name in _ADAPTER_PICKLES]
    if pickles:
        raise InputError(
            f"{where}: holds only a pickle adapter ({PurePosixPath(pickles[0]).name}); "
            "loractl fetches safetensors and GGUF adapters",
            hint="download it yourself and pass the local path with --allow-pickle if you trust it",
        )
    others = sorted(
        {
            str(PurePosixPath(f).parent)
            for f in snap.files
            if f.endswith((_ADAPTER_CONFIG, ".safetensors", ".gguf"))
        }
        - {sub or "."}
    )
    hint = f"pass --subfolder ({', '.join(others[:3])})" if others else None
    raise InputError(f"{where}: no adapter (adapter_model.safetensors, *.safetensors or *.gguf)", hint=hint)


def _is_unreachable(e: BaseException) -> bool:
    """The Hub could not be asked (no network, timeout, Hub down): the cache may still answer."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionResolutionError

    if isinstance(e, HfHubHTTPError):  # the Hub down or rate-limiting
        return e.response is not None and (e.response.status_code >= 500 or e.response.status_code == 429)
    # connection refused, DNS, timeouts...: the transport errors of the HTTP client huggingface_hub
    # uses (httpx2 for huggingface_hub 2.x, httpx for 1.x), already imported by it
    transport = tuple(sys.modules[m].TransportError for m in ("httpx2", "httpx") if m in sys.modules)
    return isinstance(e, (*transport, OfflineModeIsEnabled, RevisionResolutionError))


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _not_cached(what: str, unreachable: BaseException | None) -> NoReturn:
    """Raise the error of a reference that is not in the cache, offline or with the Hub out of reach."""
    if unreachable is None:
        raise InputError(
            f"{what}: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it",
            hint="run once without HF_HUB_OFFLINE to download it",
        )
    raise InputError(
        f"{what}: cannot reach the Hub at {_endpoint()} ({_why(unreachable)}) and it is not in the cache",
        hint="check the connection, proxy and HF_ENDPOINT; once downloaded, HF_HUB_OFFLINE=1 uses the cache",
    )


def _why(e: BaseException) -> str:
    """The short reason behind an exception (the network error under huggingface_hub's wrappers)."""
    while e.__cause__ is not None:
        e = e.__cause__
    status = getattr(getattr(e, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else type(e).__name__


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line InputErrors naming the repo and revision."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    label = _label(repo_id, revision)
    try:
        yield
    except GatedRepoError:
        raise InputError(
            f"{label}: gated repo on the Hub, and this account has not been granted access",
            hint=f"request access on the repo's page, then {_LOGIN_HINT}",
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{label}: no such local path, and no model repo {repo_id} on the Hub (or it is private)",
            hint=f"check the name; for a private repo {_LOGIN_HINT}",
        ) from None
    except RevisionNotFoundError:
        raise InputError(
            f"{label}: no revision {revision} in the Hub repo {repo_id}",
            hint="check the branch, tag or commit after @",
        ) from None
    except DisabledRepoError:
        raise InputError(f"{label}: access to this repo is disabled on the Hub") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise InputError(
                f"{label}: the Hub refused access (HTTP {status})",
                hint=f"{_LOGIN_HINT} with a token that can read {repo_id}",
            ) from None
        raise InputError(
            f"{label}: the Hub answered HTTP {status}",
            hint="retry later; once downloaded, HF_HUB_OFFLINE=1 uses the cache",
        ) from None
    except FileMetadataError:
        raise InputError(
            f"{label}: {_endpoint()} does not answer like the Hugging Face Hub", hint="check HF_ENDPOINT"
        ) from None
    except (LocalEntryNotFoundError, RevisionResolutionError, OfflineModeIsEnabled) as e:
        _not_cached(label, None if isinstance(e, OfflineModeIsEnabled) else e)
    except Exception as e:
        if not _is_unreachable(e):
            raise
        raise InputError(
            f"{label}: cannot reach the Hub at {_endpoint()} ({_why(e)})",
            hint="check the connection, proxy and HF_ENDPOINT; once downloaded, HF_HUB_OFFLINE=1 uses the cache",
        ) from None


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's progress bars on or off for the duration of the block (then as before).

    ``HF_HUB_DISABLE_PROGRESS_BARS``, when set, has the last word, as huggingface_hub documents.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or constants.HF_HUB_DISABLE_PROGRESS_BARS is not None or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
