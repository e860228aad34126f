"""A local stand-in for the Hugging Face Hub, so the real ``huggingface_hub`` client runs offline.

A stdlib ``ThreadingHTTPServer`` on 127.0.0.1 answers what ``huggingface_hub`` 2.x
asks when it downloads a file:

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo's info, with ``sha`` (the commit)
  and ``siblings`` (``rfilename``, ``size``, ``blobId``, ``lfs.sha256``);
- ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the
  sha256 of an LFS file, the git blob sha1 of a small one), ``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files, ``Content-Length``, ``Range`` requests (206).
  As on the real Hub, an LFS file answers with a redirect to a "CDN" on another
  origin (``http://localhost:PORT/cdn/{sha256}``, no token needed): the client takes
  the metadata from the redirect and GETs the CDN URL. ``cdn = False`` serves LFS
  files from ``/resolve`` directly.

No ``X-Xet-*`` header is ever sent, so the client takes its plain HTTP path. Errors
carry the ``X-Error-Code`` the client reads (``RepoNotFound``, ``GatedRepo``,
``RevisionNotFound``, ``EntryNotFound``). Every change to a repo makes a new commit.

Controls for tests (all thread-safe): a gated or private repo with the token it
accepts (a token the stub does not know gets 401 everywhere, as a revoked one does),
``drop_once (the next GET of a file breaks off after N bytes),
``corrupt`` (bodies with a flipped byte, same length), ``throttle`` (bytes per
second), and the record of every request (``gets(repo, file)``, ``requests``).
The ``hub`` fixture starts one and points ``HF_ENDPOINT`` and an isolated cache at it.

For a notebook or a bench in another process: ``python -m tests.hubstub`` serves
:data:`DEMO_REPOS` (tiny GGUF models), prints its URL on the first line of stdout
and runs until its stdin closes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.tinygguf import write_tiny_llama

__all__ = ("DEMO_REPOS", "HubStub", "Request", "StubRepo", "demo_repos", "hub", "main", "split_gguf",
           "tiny_gguf")


@cache
def tiny_gguf(seed: int = 0) -> bytes:
    """The bytes of a tiny llama GGUF (``tests.tinygguf``); the same seed gives the same bytes."""
    with tempfile.TemporaryDirectory() as d:
        return write_tiny_llama(Path(d) / "m.gguf", seed=seed).read_bytes()


@cache
def split_gguf(seed: int = 0, tensors_per_part: int = 5) -> tuple[bytes, ...]:
    """A tiny llama GGUF written by gguf's own splitter, as its parts (llama.cpp loads part 1)."""
    import gguf

    real = gguf.GGUFWriter
    with tempfile.TemporaryDirectory() as d, mock.patch.object(
            gguf, "GGUFWriter", lambda path, arch: real(path, arch, split_max_tensors=tensors_per_part)):
        write_tiny_llama(Path(d) / "m.gguf", seed=seed)
        return tuple(p.read_bytes() for p in sorted(Path(d).glob("m-*-of-*.gguf")))


@cache  # bytes cache their hash(): a lookup costs nothing after the first
def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@cache
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class StubRepo:
    """A model repo: file name -> bytes; ``commit`` changes whenever a file does."""

    repo_id: str
    files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False  #: the listing is public, downloads need ``token`` (401 without, 403 wrong)
    private: bool = False  #: everything needs ``token`` (401 without, 404 with a wrong one)
    token: str | None = None
    lfs_threshold: int = 1024  #: files this big or bigger are LFS files (ETag = sha256)
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commit: str = ""

    def __post_init__(self) -> None:
        self._commit()

    def _commit(self) -> None:
        h = hashlib.sha1(f"{self.repo_id}:{len(self.history)}".encode())
        for name in sorted(self.files):
            h.update(name.encode() + _sha256(self.files[name]).encode())
        self.commit = h.hexdigest()
        self.history[self.commit] = dict(self.files)

    def put(self, name: str, data: bytes) -> str:
        """Add or change a file; returns the new commit."""
        self.files[name] = data
        self._commit()
        return self.commit

    def remove(self, name: str) -> str:
        del self.files[name]
        self._commit()
        return self.commit

    def is_lfs(self, data: bytes) -> bool:
        return len(data) >= self.lfs_threshold

    def etag(self, data: bytes) -> str:
        return _sha256(data) if self.is_lfs(data) else _git_sha1(data)

    def sibling(self, name: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": _git_sha1(data)}
        if self.is_lfs(data):
            entry["lfs"] = {"sha256": _sha256(data), "size": len(data),
                            "pointerSize": 134}
        return entry


@dataclass(frozen=True)
class Request:
    """One request the stub answered: what was asked (and for which file), and the status."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int
    repo: str | None = None
    file: str | None = None


class HubStub:
    """The server, its repos and its fault controls; ``url`` is what ``HF_ENDPOINT`` gets."""

    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[Request] = []
        self.drop_once: dict[tuple[str, str], int] = {}  #: (repo, file) -> bytes sent before the break
        self.corrupt: set[tuple[str, str]] = set()  #: (repo, file) served with one byte flipped
        self.throttle: float | None = None  #: bytes per second of every body, None: full speed
        self.cdn = True  #: LFS files redirect to the "CDN" origin (localhost instead of 127.0.0.1)
        self.tokens: set[str] = set()  #: tokens the Hub knows (a repo's token is added to it)
        self.lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-stub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], **kwargs: Any) -> StubRepo:
        repo = StubRepo(repo_id, dict(files), **kwargs)
        with self.lock:
            self.repos[repo_id] = repo
            if repo.token is not None:
                self.tokens.add(repo.token)
        return repo

    def gets(self, repo_id: str, name: str) -> list[Request]:
        """The transfers of a file's body (200 or 206 to a GET, from /resolve or the CDN)."""
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.status in (200, 206)
                    and (r.repo, r.file) == (repo_id, name)]

    def start(self) -> HubStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and break the open (keep-alive) connections: the Hub is gone."""
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


def _handler(stub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            with stub.lock:
                stub._connections.add(self.connection)
            try:
                super().handle()
            except OSError:  # a client that hangs up mid-body (a cancel), or stop()
                pass
            finally:
                with stub.lock:
                    stub._connections.discard(self.connection)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        # -- routing ------------------------------------------------------------------------------

        def _answer(self, *, body: bool) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                return self._info("/".join(parts[2:4]), rev, parse_qs(url.query), body=body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body=body)
            if len(parts) == 2 and parts[0] == "cdn":
                return self._cdn(parts[1], body=body)
            self._send(404, {"X-Error-Code": "NotFound"}, b"not found", body=body)

        def _repo(self, repo_id: str, *, download: bool, body: bool) -> StubRepo | None:
            with stub.lock:
                repo = stub.repos.get(repo_id)
            auth = self.headers.get("Authorization")
            sent = auth.removeprefix("Bearer ").strip() if auth else None
            if sent is not None and sent not in stub.tokens:
                self._send(401, {"X-Error-Message": "Invalid credentials in Authorization header"},
                           b"Invalid credentials", body=body)
                return None
            if repo is None or (repo.private and sent != repo.token):
                status = 401 if repo is not None and sent is None else 404
                self._send(status, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repo not found"},
                           b"Repository not found", body=body)
                return None
            if repo.gated and download and sent != repo.token:
                self._send(401 if sent is None else 403,
                           {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted"},
                           b"gated", body=body)
                return None
            return repo

        def _files(self, repo: StubRepo, rev: str, *, body: bool) -> tuple[str, dict[str, bytes]] | None:
            with stub.lock:
                commit = repo.commit if rev == "main" else rev
                files = repo.history.get(commit)
            if files is None:
                self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"no such revision", body=body)
                return None
            return commit, files

        def _info(self, repo_id: str, rev: str, query: dict[str, list[str]], *, body: bool) -> None:
            repo = self._repo(repo_id, download=False, body=body)
            found = repo and self._files(repo, rev, body=body)
            if not repo or not found:
                return
            commit, files = found
            info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                    "private": repo.private, "gated": "manual" if repo.gated else False,
                    "disabled": False, "tags": ["gguf"], "library_name": "gguf",
                    "siblings": [repo.sibling(n, d) for n, d in sorted(files.items())]}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body=body)

        def _resolve(self, repo_id: str, rev: str, name: str, *, body: bool) -> None:
            repo = self._repo(repo_id, download=True, body=body)
            found = repo and self._files(repo, rev, body=body)
            if not repo or not found:
                return
            commit, files = found
            if name not in files:
                self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"no such file",
                           body=body)
                return
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{repo.etag(data)}"'}
            if repo.is_lfs(data):
                headers.update({"X-Linked-Etag": f'"{repo.etag(data)}"', "X-Linked-Size": str(len(data))})
                if stub.cdn:
                    port = self.server.server_address[1]
                    headers["Location"] = f"http://localhost:{port}/cdn/{repo.etag(data)}?repo={repo_id}"
                    self._send(302, headers, b"", body=body, repo=repo_id, file=name)
                    return
            self._body(repo_id, name, data, headers, body=body)

        def _cdn(self, sha256: str, *, body: bool) -> None:
            query = parse_qs(urlsplit(self.path).query)
            with stub.lock:
                repo = stub.repos.get(query.get("repo", [""])[0])
                found = [(n, d) for files in (repo.history.values() if repo else ()) for n, d in files.items()
                         if _sha256(d) == sha256]
            if repo is None or not found:
                self._send(404, {}, b"no such object", body=body)
                return
            name, data = found[-1]
            self._body(repo.repo_id, name, data, {"ETag": f'"{sha256}"'}, body=body)

        def _body(self, repo_id: str, name: str, data: bytes, headers: dict[str, str], *, body: bool) -> None:
            headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start = 0
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes=") and body:
                start = int(wanted[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            key = (repo_id, name)
            with stub.lock:
                if body and key in stub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                cut = stub.drop_once.pop(key, None) if body else None
            self._send(206 if start else 200, headers, data[start:], body=body, cut=cut, repo=repo_id,
                       file=name)

        # -- sending ------------------------------------------------------------------------------

        def _send(self, status: int, headers: dict[str, str], data: bytes, *, body: bool,
                  cut: int | None = None, repo: str | None = None, file: str | None = None) -> None:
            with stub.lock:
                stub.requests.append(Request(self.command, urlsplit(self.path).path,
                                             self.headers.get("Range"), self.headers.get("Authorization"),
                                             status, repo, file))
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            if cut is not None:  # send part of the body, then break the connection
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            piece = 4096 if stub.throttle else 1 << 20
            for i in range(0, len(data), piece):
                self.wfile.write(data[i:i + piece])
                if stub.throttle:
                    self.wfile.flush()
                    time.sleep(piece / stub.throttle)

    return Handler


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    """A running stub; ``HF_ENDPOINT`` points at it and the Hugging Face cache is under ``tmp_path``.

    ``huggingface_hub`` reads its settings once, at import: its constants are pointed
    there too, for tests that call it directly (lemon_magic reads the environment).
    """
    from huggingface_hub import constants

    stub = HubStub().start()
    home = tmp_path / "hf"
    env = {"HF_ENDPOINT": stub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
              "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        stub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        yield stub
    finally:
        stub.stop()


#: the repos of the demo Hub (``python -m tests.hubstub``): a tiny chat-less llama in two
#: "quantizations" (Q4_K_M, Q8_0), and a split one (F32, three parts) with an mmproj file
DEMO_REPOS = ("lemon/tiny-GGUF", "lemon/split-GGUF")


def demo_repos(stub: HubStub) -> HubStub:
    """Add :data:`DEMO_REPOS` to ``stub``."""
    stub.add_repo(DEMO_REPOS[0], {"tiny-Q4_K_M.gguf": tiny_gguf(1), "tiny-Q8_0.gguf": tiny_gguf(2),
                                  "README.md": b"# tiny test models\n"})
    parts = split_gguf(4)
    stub.add_repo(DEMO_REPOS[1], {**{f"tiny-F32-{i:05d}-of-{len(parts):05d}.gguf": p
                                     for i, p in enumerate(parts, 1)},
                                  "mmproj-tiny-F16.gguf": tiny_gguf(5)})
    return stub


#: a repo of the demo Hub with the embedded Gemma 3 270M file (``--gemma``): real text
GEMMA_REPO = "lemon/gemma-3-270m-GGUF"


def main() -> None:
    """Serve the demo repos (and with ``--gemma`` the embedded Gemma model) until stdin closes;
    the URL is the first line of stdout."""
    import sys

    stub = demo_repos(HubStub())
    if "--gemma" in sys.argv:
        from lemon_magic.registry import embedded_model_path

        stub.add_repo(GEMMA_REPO, {"gemma-3-270m-Q4_K_M.gguf": embedded_model_path().read_bytes(),
                                   "README.md": b"# Gemma 3 270M (base), Q4_K_M\n"})
    stub.start()
    print(stub.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        stub.stop()


class DemoHub:
    """``python -m tests.hubstub --gemma`` as a process, with ``HF_ENDPOINT`` pointed at it and
    the Hugging Face cache in ``root`` (for notebooks: their kernels inherit the environment)."""

    def __init__(self, root: Path) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hubstub", "--gemma"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.proc.kill()
            raise RuntimeError("the demo Hub did not start")
        self.env = {"HF_ENDPOINT": self.url, "HF_HOME": str(root / "hf"),
                    "HF_HUB_CACHE": str(root / "hf" / "hub")}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def close(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


_session: DemoHub | None = None


def session_demo_hub() -> DemoHub:
    """The test session's demo Hub, started on first use (``close_session_demo_hub`` ends it)."""
    global _session
    if _session is None:
        _session = DemoHub(Path(tempfile.mkdtemp(prefix="lemon-demo-hub-")))
    return _session


def close_session_demo_hub() -> None:
    global _session
    if _session is not None:
        import shutil

        root = Path(_session.env["HF_HOME"]).parent
        _session.close()
        shutil.rmtree(root, ignore_errors=True)
        _session = None


if __name__ == "__main__":
    main()
