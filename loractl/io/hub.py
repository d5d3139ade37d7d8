"""Hugging Face Hub references: ``org/name`` or ``org/name@revision`` for a base model or an adapter.

Resolution is huggingface_hub's ``snapshot_download``, so its cache (``HF_HOME``, ``HF_HUB_CACHE``),
``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and token (``HF_TOKEN``, ``hf auth login``) are honoured, and so
is its handling of a Hub out of reach: the cache answers (``refs/`` for a branch or tag, the commit's
file listing it keeps beside the snapshot). Only the files loractl needs are downloaded:

- a base model: its safetensors index first, then exactly the shards it lists (or the single
  ``model.safetensors``), plus the small files that are not weights (``config.json``, tokenizer
  files...); never the duplicate weights some repos also hold (``pytorch_model.bin``, ``.gguf``,
  ``.onnx``, ``.h5``, ``.msgpack``...);
- an adapter: ``adapter_config.json`` + ``adapter_model.safetensors``, or the one ``.safetensors``
  or ``.gguf`` file of the repo (or of ``subfolder``).

The first ``snapshot_download`` resolves the revision to a commit (and lists that commit's files);
every later one is given the commit, so a branch that moves meanwhile cannot mix files of two
commits.

huggingface_hub is imported only when a reference is resolved (``loractl --help`` stays light).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn

from ..errors import FormatError, InputError
from .names import INDEX_NAMES, SINGLE_NAMES

__all__ = ["WEIGHT_SUFFIXES", "is_hub_ref", "parse_hub_ref", "resolve_adapter", "resolve_base"]

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REF_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?")

#: names that look like files rather than repos: ``dir/adapter.safetensors`` is a (missing) local path
_FILE_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".toml")

#: weights in any format: a base repo's non-weight files are everything else (config, tokenizer...)
WEIGHT_SUFFIXES = tuple(
    ".safetensors .bin .pt .pth .ckpt .gguf .ggml .onnx .onnx_data .h5 .msgpack .ot .tflite .mlmodel .pb"
    " .npz .npy .pkl .pickle .joblib .nemo .pdparams .llamafile .mar .engine .zip .tar .gz".split()
)
#: model-card media: not part of the model either
_MEDIA_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".mp4", ".webm", ".wav", ".mp3", ".pdf")

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PICKLES = ("adapter_model.bin", "adapter_model.pt")
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"
_REACH_HINT = "check the connection, proxy and HF_ENDPOINT; once downloaded, HF_HUB_OFFLINE=1 uses the cache"


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
    ``.safetensors`` file), with every top-level file that is not weights (``config.json``,
    ``generation_config.json``, tokenizer files...). Other weight formats are never downloaded.

    Args:
        ref: ``org/name`` or ``org/name@revision`` (branch, tag or commit).
        progress: show huggingface_hub's download bars on stderr.

    Returns:
        The snapshot folder in the Hugging Face cache, ready for :func:`loractl.io.base.open_base`.

    Raises:
        InputError: not a Hub reference, no such repo or revision, gated or private repo without
            access, no safetensors weights, an index listing a shard that is not in the repo (or a
            path leaving it), not cached in offline mode, the Hub unreachable and not cached.
        FormatError: the repo's safetensors index is not valid JSON with a ``weight_map``.
    """
    repo_id, revision = _parse(ref)
    with _progress_bars(progress), _hub_errors(repo_id, revision):
        snap = _Snapshot.open(repo_id, revision, first=INDEX_NAMES)
        snap.fetch(_base_files(snap))
    return snap.folder


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
            cached in offline mode, the Hub unreachable and not cached.
    """
    repo_id, revision = _parse(ref)
    sub = (subfolder or "").strip("/")
    config = f"{sub}/{_ADAPTER_CONFIG}" if sub else _ADAPTER_CONFIG
    with _progress_bars(progress), _hub_errors(repo_id, revision):
        snap = _Snapshot.open(repo_id, revision, first=[config])
        files, result = _adapter_files(snap, sub)
        snap.fetch(files)
    path = snap.folder / result
    return path.parent if path.name == _ADAPTER_CONFIG else path


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
    """One commit of a repo: its folder in the Hugging Face cache and the files it holds.

    Attributes:
        repo_id: ``org/name``.
        revision: the revision as the user gave it (None: the default branch).
        folder: ``snapshots/<commit>`` in the cache (files appear in it as they are downloaded).
        files: every file of the commit (``/``-separated paths), from the listing huggingface_hub
            keeps in its cache; only the files in ``folder`` when it has none (a cache filled by
            another tool, read offline).
        listed: whether ``files`` is the commit's full listing.
    """

    repo_id: str
    revision: str | None
    folder: Path
    files: list[str]
    listed: bool = True

    @property
    def label(self) -> str:
        return _label(self.repo_id, self.revision)

    @property
    def commit(self) -> str:
        return self.folder.name

    @classmethod
    def open(cls, repo_id: str, revision: str | None, first: Sequence[str]) -> _Snapshot:
        """Resolve the revision to a commit and list its files, downloading those of ``first`` it has."""
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError

        folder = _download(repo_id, revision, first)
        try:
            files = [f.path for f in get_cached_repo_tree(repo_id, revision=folder.name)]
        except CachedRepoTreeNotFoundError:
            cached = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            return cls(repo_id, revision, folder, cached, listed=False)
        return cls(repo_id, revision, folder, files)

    def fetch(self, files: Sequence[str]) -> None:
        """Download ``files`` at the commit (a cached file costs nothing); each must then be in the cache."""
        from huggingface_hub import try_to_load_from_cache

        _download(self.repo_id, self.commit, files)
        for f in files:
            if not isinstance(try_to_load_from_cache(self.repo_id, f, revision=self.commit), str):
                _unavailable(f"{self.label} ({f})", None)


def _download(repo_id: str, revision: str | None, files: Sequence[str]) -> Path:
    """``snapshot_download`` of exactly ``files`` (those of them in the repo); the snapshot folder."""
    from huggingface_hub import snapshot_download

    patterns = [re.sub(r"([*?[])", r"[\1]", f) for f in files]  # fnmatch patterns, each matching one name
    logger = logging.getLogger("huggingface_hub._snapshot_download")
    logger.addFilter(_no_news)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    finally:
        logger.removeFilter(_no_news)


def _no_news(record: logging.LogRecord) -> bool:
    """Drop snapshot_download's warning that no file matched: a repo without an index is no news."""
    return not record.getMessage().startswith("No files matched")


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
    """The files of a base model to fetch: the index (already fetched, read here) and its shards, the rest."""
    top = _top_level(snap.files)
    index = next((n for n in INDEX_NAMES if n in top), None)
    if index is not None:
        try:
            weight_map = json.loads((snap.folder / index).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            leaving = next(
                (s for s in shards if PurePosixPath(s).is_absolute() or ".." in s.split("/")), None
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise FormatError(
                f"{snap.label}: {index} is not a valid safetensors index (no weight_map)"
            ) from None
        if leaving is not None:
            raise InputError(f"{snap.label}: {index} lists shard {leaving!r}, a path that leaves the repo")
        missing = [s for s in shards if s not in snap.files]
        if missing and snap.listed:
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
    where = "in the repo" if snap.listed else "in the cache"
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
        cached = "" if snap.listed else " in the cache"
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


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unavailable(what: str, cause: BaseException | None) -> NoReturn:
    """Raise the error of files that huggingface_hub could neither download nor find in the cache.

    ``cause`` is the error that kept them from the Hub (its ``OfflineModeIsEnabled``, a connection
    error, an HTTP error...), None when it did not say.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, OfflineModeIsEnabled

    status = getattr(cause.response, "status_code", None) if isinstance(cause, HfHubHTTPError) else None
    if isinstance(cause, OfflineModeIsEnabled) or (cause is None and constants.is_offline_mode()):
        raise InputError(
            f"{what}: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it",
            hint="run once without HF_HUB_OFFLINE to download it",
        )
    if status in (401, 403):
        raise InputError(
            f"{what}: the Hub refused access (HTTP {status})",
            hint=f"{_LOGIN_HINT} with a token that can read the repo",
        )
    if isinstance(cause, FileMetadataError):
        raise InputError(
            f"{what}: {_endpoint()} does not answer like the Hugging Face Hub", hint="check HF_ENDPOINT"
        )
    why = f" ({_why(cause)})" if cause is not None else ""
    raise InputError(
        f"{what}: cannot reach the Hub at {_endpoint()}{why} and it is not in the cache", hint=_REACH_HINT
    )


def _why(e: BaseException) -> str:
    """The short reason behind an exception (the network error under huggingface_hub's wrappers)."""
    while e.__cause__ is not None:
        e = e.__cause__
    status = getattr(getattr(e, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else type(e).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of the HTTP client huggingface_hub is built on (httpx2 from 2.0, httpx before).

    huggingface_hub falls back to the cache on a refused connection or a timeout, but lets the
    others through (a proxy refusing, a connection cut in the middle of an answer).
    """
    import importlib

    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(errors)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line InputErrors naming the repo and revision."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
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
    except LocalEntryNotFoundError as e:  # neither downloaded nor cached: why not is its cause
        _unavailable(label, e.__cause__)
    except OfflineModeIsEnabled as e:
        _unavailable(label, e)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            _unavailable(label, e)  # the Hub refused access
        raise InputError(
            f"{label}: the Hub answered HTTP {status}",
            hint="retry later; once downloaded, HF_HUB_OFFLINE=1 uses the cache",
        ) from None
    except Exception as e:
        if not isinstance(e, _transport_errors()):
            raise
        raise InputError(
            f"{label}: cannot reach the Hub at {_endpoint()} ({_why(e)})", hint=_REACH_HINT
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
