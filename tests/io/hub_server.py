"""A fake Hugging Face Hub on 127.0.0.1, for tests that run the real huggingface_hub client.

It serves in-memory repos (file contents given as bytes, or as paths read when the file is added)
with the endpoints huggingface_hub uses to resolve revisions, list files and download them:

- ``GET /api/models/{repo_id}[/revision/{revision}]``: ``sha`` and ``siblings`` (with ``?blobs=true``:
  sizes, blob ids, LFS info);
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]``: the tree, ``recursive`` or not, paged with
  ``Link: <...>; rel="next"`` like the Hub (``FakeHub.page_size`` entries a page);
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: ``X-Repo-Commit``, ``ETag`` (the git blob
  id; for LFS files ``X-Linked-Etag``/``X-Linked-Size`` with the sha256), ``Content-Length``, ``Range``;
- errors as the Hub gives them: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``, 401 for a private repo without its token, 401/403 ``GatedRepo`` for the files
  of a gated repo without a granted token.

Every request is recorded (``FakeHub.requests``) so a test can check what was fetched and in which
order. The server listens on 127.0.0.1 only, on a free port, and stops with the test:
:func:`running` starts it and points huggingface_hub at it (``HF_ENDPOINT``, ``HF_HOME`` in
``tmp_path``, telemetry and Xet off, no token) through ``monkeypatch``, which undoes it all.

Usage in a test module::

    from .hub_server import FakeHub, running

    @pytest.fixture
    def hub(tmp_path, monkeypatch):
        with running(tmp_path / "hf", monkeypatch) as h:
            yield h

    def test_it(hub):
        hub.add_commit("org/name", {"config.json": b"{}", "model.safetensors": path})
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

#: files the Hub stores with LFS (their ETag is the sha256, sent as X-Linked-Etag)
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".model")


@dataclass(frozen=True)
class Request:
    """One request the fake Hub received.

    Attributes:
        method: ``GET``, ``HEAD``...
        path: the URL path, percent-decoded.
        query: the query parameters (last value of each).
        authorization: the ``Authorization`` header, if any.
    """

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None


@dataclass
class FakeRepo:
    """A model repo: commits (file name -> content) and refs (branch or tag -> commit sha)."""

    repo_id: str
    private: bool = False
    gated: bool = False
    tokens: frozenset[str] = frozenset()
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit_of(self, revision: str) -> str | None:
        """The commit sha a branch, tag or sha names, or None."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


class FakeHub:
    """The repos and the server. Add repos and commits before or after :meth:`start`.

    Attributes:
        repos: repo id -> :class:`FakeRepo`.
        requests: every request received, in order.
        page_size: entries per page of the tree endpoint.
        fail_status: when set, every request is answered with this HTTP status (e.g. 503: Hub down).
        on_request: when set, called with each request before it is answered (e.g. to commit meanwhile).
    """

    def __init__(self, page_size: int = 1000) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.page_size = page_size
        self.fail_status: int | None = None
        self.on_request: Callable[[Request], None] | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # -- content -------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, *, private: bool = False, gated: bool = False, tokens: tuple[str, ...] = ()
    ) -> FakeRepo:
        """Create an empty repo (``private``/``gated`` repos accept the given tokens)."""
        repo = FakeRepo(repo_id, private=private, gated=gated, tokens=frozenset(tokens))
        self.repos[repo_id] = repo
        return repo

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path],
        *,
        branch: str = "main",
        replace: bool = True,
    ) -> str:
        """Commit ``files`` (name -> bytes, text or a file to read) on ``branch``; returns the commit sha.

        The repo is created if needed. With ``replace`` the commit holds exactly ``files``;
        without, they are added to the branch's current files.
        """
        repo = self.repos.get(repo_id) or self.add_repo(repo_id)
        content = {} if replace or branch not in repo.refs else dict(repo.commits[repo.refs[branch]])
        for name, value in files.items():
            if isinstance(value, Path):
                value = value.read_bytes()
            elif isinstance(value, str):
                value = value.encode()
            content[name] = value
        with self._lock:
            self._counter += 1
            seed = f"{repo_id}\0{branch}\0{self._counter}\0" + "\0".join(
                f"{n}={hashlib.sha256(d).hexdigest()}" for n, d in sorted(content.items())
            )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = content
        repo.refs[branch] = sha
        return sha

    def add_folder(
        self,
        repo_id: str,
        folder: Path,
        *,
        branch: str = "main",
        extra: Mapping[str, bytes | str | Path] | None = None,
    ) -> str:
        """Commit every file under ``folder`` (and ``extra`` files) on ``branch``; returns the commit sha."""
        files: dict[str, bytes | str | Path] = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        files.update(extra or {})
        return self.add_commit(repo_id, files, branch=branch)

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        """Point the ref ``name`` (a tag, a branch, ``refs/pr/1``...) at commit ``sha``."""
        self.repos[repo_id].refs[name] = sha

    # -- what was asked ------------------------------------------------------------------------

    def paths(self, method: str | None = None) -> list[str]:
        """The paths requested (with ``method`` only), in order."""
        with self._lock:
            return [r.path for r in self.requests if method is None or r.method == method]

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """The files whose content was fetched (GET .../resolve/...), as ``repo_id:filename``, in order."""
        out = []
        for path in self.paths("GET"):
            parsed = _parse_resolve(path)
            if parsed and (repo_id is None or parsed[0] == repo_id):
                out.append(parsed[2] if repo_id else f"{parsed[0]}:{parsed[2]}")
        return out

    def touched(self, repo_id: str | None = None) -> list[str]:
        """The files asked for in any way (HEAD or GET .../resolve/...), in order, without repeats."""
        out: list[str] = []
        for path in self.paths():
            parsed = _parse_resolve(path)
            if parsed and (repo_id is None or parsed[0] == repo_id):
                name = parsed[2] if repo_id else f"{parsed[0]}:{parsed[2]}"
                if name not in out:
                    out.append(name)
        return out

    def clear(self) -> None:
        """Forget the requests recorded so far."""
        with self._lock:
            self.requests.clear()

    # -- server --------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (the server must be started)."""
        if self._server is None:
            raise RuntimeError("the fake Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Listen on 127.0.0.1 (a free port) in a background thread; returns the endpoint."""
        if self._server is None:
            handler = type("Handler", (_Handler,), {"hub": self})
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            self._server.daemon_threads = True
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop listening (the endpoint then refuses connections). Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None
            self._thread = None

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _parse_resolve(path: str) -> tuple[str, str, str] | None:
    """(repo id, revision, filename) of a decoded ``/{org}/{name}/resolve/{revision}/{filename}`` path."""
    parts = path.lstrip("/").split("/")
    if len(parts) >= 5 and parts[2] == "resolve":
        return f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
    return None


class _Handler(BaseHTTPRequestHandler):
    """Answers as the Hub does, for the endpoints huggingface_hub uses to download."""

    hub: FakeHub  # set on the subclass made by FakeHub.start
    server_version = "FakeHub/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(body=False)

    # -- plumbing ------------------------------------------------------------------------------

    def _dispatch(self, body: bool) -> None:
        url = urlsplit(self.path)
        raw_parts = url.path.lstrip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        request = Request(self.command, unquote(url.path), query, self.headers.get("Authorization"))
        self.hub.record(request)
        if self.hub.on_request is not None:
            self.hub.on_request(request)
        self._body = body
        if self.hub.fail_status is not None:
            return self._send(self.hub.fail_status, b"fake Hub failure")
        parts = [unquote(p) for p in raw_parts]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2] + "/" + parts[3], parts[4:], query)
        if len(parts) >= 5 and parts[2] == "resolve":
            # the revision is one %-encoded segment; the file name keeps its slashes
            return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
        return self._send(404, b"Not Found")

    def _send(self, status: int, data: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self._body and data:
            self.wfile.write(data)

    def _json(self, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str) -> FakeRepo | None:
        """The repo, or None after answering as the Hub does for a missing or private one."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self._token() not in repo.tokens):
            self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _commit(self, repo: FakeRepo, revision: str) -> str | None:
        sha = repo.commit_of(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    # -- endpoints -----------------------------------------------------------------------------

    def _api(self, repo_id: str, rest: list[str], query: dict[str, str]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            sha = self._commit(repo, rest[1] if len(rest) > 1 else "main")
            if sha is not None:
                self._json(self._info(repo, sha, blobs=query.get("blobs", "").lower() in ("true", "1")))
            return
        if rest[0] == "tree" and len(rest) >= 2:
            sha = self._commit(repo, rest[1])
            if sha is not None:
                self._tree(repo, rest[1], sha, "/".join(rest[2:]), query)
            return
        self._send(404, b"Not Found")

    def _sibling(self, name: str, data: bytes, blobs: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": name}
        if blobs:
            entry.update(size=len(data), blobId=_git_blob_id(data))
            if _is_lfs(name):
                entry["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                }
        return entry

    def _info(self, repo: FakeRepo, sha: str, blobs: bool) -> dict[str, Any]:
        files = repo.commits[sha]
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": [self._sibling(n, d, blobs) for n, d in sorted(files.items())],
        }

    def _tree(self, repo: FakeRepo, revision: str, sha: str, folder: str, query: dict[str, str]) -> None:
        files = repo.commits[sha]
        prefix = f"{folder}/" if folder else ""
        if folder and not any(n.startswith(prefix) for n in files):
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {sha}", commit=sha)
        recursive = query.get("recursive", "").lower() in ("true", "1")
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :].split("/")
            # the folders on the way (all of them when recursive, the first level otherwise)
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                sub = prefix + "/".join(rest[:depth])
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": _git_blob_id(sub.encode())})
            if recursive or len(rest) == 1:
                entry: dict[str, Any] = {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": _git_blob_id(data),
                }
                if _is_lfs(name):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries[name] = entry
        listing = list(entries.values())
        start = int(query.get("cursor", "0") or 0)
        page = listing[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listing):
            params = f"recursive={query.get('recursive', 'false')}&cursor={start + self.hub.page_size}"
            path = f"/api/models/{repo.repo_id}/tree/{quote(revision, safe='')}" + (
                f"/{quote(folder, safe='')}" if folder else ""
            )
            headers["Link"] = f'<{self.hub.endpoint}{path}?{params}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._commit(repo, revision)
        if sha is None:
            return
        if repo.gated and self._token() not in repo.tokens:
            status = 401 if self._token() is None else 403
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            )
            return self._error(status, "GatedRepo", message)
        data = repo.commits[sha].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit=sha)
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if _is_lfs(filename):
            digest = hashlib.sha256(data).hexdigest()
            headers.update(
                {"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))}
            )
        else:
            headers["ETag"] = f'"{_git_blob_id(data)}"'
        start = self._range_start(len(data))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], headers)
        self._send(200, data, headers)

    def _range_start(self, size: int) -> int:
        """The first byte of a ``Range: bytes=N-`` request (the only form huggingface_hub sends), else 0."""
        spec = self.headers.get("Range") or ""
        if spec.startswith("bytes=") and spec.endswith("-"):
            try:
                return min(int(spec[len("bytes=") : -1]), size)
            except ValueError:
                return 0
        return 0


def point_huggingface_hub_at(endpoint: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make huggingface_hub (already imported: its constants are read at import) use ``endpoint`` and ``home``.

    Sets the environment too (for subprocesses), removes every token source and turns telemetry
    (which fetches a registry from the endpoint) and Xet off. ``monkeypatch`` undoes it all.
    """
    from huggingface_hub import constants

    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_OIDC_RESOURCE",
        "HF_OIDC_ID_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_CO_STAGING",
        "TRANSFORMERS_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
    values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset())) | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """``HF_HUB_OFFLINE`` on or off, for huggingface_hub already imported and for subprocesses."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


@contextmanager
def running(home: Path, monkeypatch: pytest.MonkeyPatch, page_size: int = 1000) -> Iterator[FakeHub]:
    """A started :class:`FakeHub`, with huggingface_hub pointed at it and its cache in ``home``."""
    hub = FakeHub(page_size=page_size)
    endpoint = hub.start()
    try:
        point_huggingface_hub_at(endpoint, home, monkeypatch)
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub with huggingface_hub pointed at it (cache in ``tmp_path / "hf"``)."""
    with running(tmp_path / "hf", monkeypatch) as hub:
        yield hub
