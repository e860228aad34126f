"""Real servers on 127.0.0.1 for the remote-client tests: ``lemon-magic serve`` in another process
(a ``lemonade`` remote, its own config dir, a tiny GGUF registered) and llama.cpp's router mode
(``llama-server --models-dir DIR``, an ``openai`` remote). Every process is stopped by its fixture,
by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import psutil
import pytest

from lemon_magic._remote import RemoteEntry, RemoteSpec, parse_remote
from lemon_magic._remote_client import RemoteClient
from lemon_magic.backends.llama_server import LlamaServer
from lemon_magic.errors import (
    BackendUnavailable,
)
from lemon_magic.registry import Registry
from tests.tinygguf import write_tiny_llama

REPO = Path(__file__).resolve().parent.parent
KEY_ENV = "LEMON_MAGIC_TEST_REMOTE_KEY"
SECRET = "s3cret-remote-key-0123456789"
T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn, backend="asyncio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------ server processes


@dataclass
class Proc:
    """A server process this test module started, and how to reach it."""

    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    argv: list[str]
    env: dict[str, str]
    #: every descendant seen while it ran (killed at the end if still alive)
    seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def note_children(self) -> None:
        try:
            self.seen.update(c.pid for c in psutil.Process(self.popen.pid).children(recursive=True))
        except psutil.Error:
            pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server, wait (bounded), SIGKILL if needed, then kill any descendant left."""
        self.note_children()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in self.seen:
            try:
                p = psutil.Process(pid)
                p.wait(5)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                p.kill()
                p.wait(5)


def _start(argv: list[str], env: dict[str, str], port: int, log: Path, ready_path: str) -> Proc:
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    proc = Proc(popen, port, log, argv, env)
    deadline = time.monotonic() + 60
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({popen.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{proc.url}{ready_path}", timeout=2, trust_env=False).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop(signal.SIGKILL)
            raise RuntimeError(f"{argv[0]} did not become ready: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def start_lemon_serve(root: Path, *, api_key: str | None = None, port: int | None = None) -> Proc:
    """``lemon-magic serve`` in another process, with config and state under ``root``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEMON_MAGIC_API_KEY", "LEMONADE_API_KEY", KEY_ENV)}
    env |= {"LEMON_MAGIC_CONFIG_DIR": str(root / "config"), "LEMON_MAGIC_STATE_DIR": str(root / "state"),
            "PYTHONPATH": str(REPO)}
    port = port or free_port()
    argv = [sys.executable, "-m", "lemon_magic", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    if api_key:
        argv += ["--api-key", api_key]
    return _start(argv, env, port, root / "serve.log", "/live")


#: where notebooks/remote.ipynb finds its "GPU box"
DEMO_REMOTE_ENV = "LEMON_MAGIC_DEMO_REMOTE"
_demo: tuple[Proc, Path, str | None] | None = None


def session_demo_remote() -> Proc:
    """The session's demo "GPU box" for notebooks/remote.ipynb, started on first use: a
    ``lemon-magic serve`` with config and state dirs of its own (it registers nothing, so it serves
    the built-in ``gemma3-270m``; it never sees an API key), its URL in ``$LEMON_MAGIC_DEMO_REMOTE``
    for the kernels started after this. ``close_session_demo_remote`` stops it."""
    global _demo
    if _demo is None:
        root = Path(tempfile.mkdtemp(prefix="lemon-demo-remote-"))
        try:
            proc = start_lemon_serve(root)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        _demo = (proc, root, os.environ.get(DEMO_REMOTE_ENV))
        os.environ[DEMO_REMOTE_ENV] = proc.url
    return _demo[0]


def close_session_demo_remote() -> None:
    """Stop the demo remote by pid (SIGTERM, SIGKILL after a bound, then any backend of it still
    alive) and put the environment back; idempotent."""
    global _demo
    if _demo is None:
        return
    proc, root, saved = _demo
    _demo = None
    if saved is None:
        os.environ.pop(DEMO_REMOTE_ENV, None)
    else:
        os.environ[DEMO_REMOTE_ENV] = saved
    try:
        proc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def llama_server_binary() -> Path:
    try:
        return LlamaServer().locate()
    except BackendUnavailable as exc:
        pytest.skip(f"no llama-server: {exc}")


def start_llama_router(models_dir: Path, log: Path) -> Proc:
    """llama.cpp's router mode: no ``-m``, models from ``--models-dir``."""
    binary = llama_server_binary()
    if b"--models-dir" not in subprocess.run([binary, "--help"], capture_output=True, timeout=30).stdout:
        pytest.skip(f"{binary} has no router mode (--models-dir)")
    port = free_port()
    argv = [str(binary), "--models-dir", str(models_dir), "--models-max", "1", "--host", "127.0.0.1",
            "--port", str(port), "--threads", "1"]
    return _start(argv, dict(os.environ), port, log, "/health")


@pytest.fixture(scope="module")
def lemon_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    model = write_tiny_llama(root / "tiny.gguf", seed=5)
    Registry(root / "config" / "models.json").register("tiny", model)
    return root


@pytest.fixture(scope="module")
def lemon(lemon_root: Path) -> Iterator[Proc]:
    proc = start_lemon_serve(lemon_root)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def own_lemon(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``lemon-magic serve`` processes a test may kill; all are stopped at the end."""
    procs: list[Proc] = []
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=6)
    Registry(tmp_path / "config" / "models.json").register("tiny", model)

    def start(**kwargs: Any) -> Proc:
        procs.append(start_lemon_serve(tmp_path, **kwargs))
        return procs[-1]

    try:
        yield start
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("router-models")
    write_tiny_llama(d / "tiny.gguf", seed=7)
    return d


@pytest.fixture(scope="module")
def llama_router(models_dir: Path) -> Iterator[Proc]:
    proc = start_llama_router(models_dir, models_dir.parent / "router.log")
    try:
        yield proc
    finally:
        proc.stop()


def unload_remote(proc: Proc, model: str = "tiny") -> None:
    """Unload ``model`` on the remote behind our routers' backs, as another client would."""
    httpx.post(f"{proc.url}/api/v1/unload", json={"model_name": model}, timeout=30, trust_env=False)


def lemonade(proc: Proc, model: str = "tiny", **kw: Any) -> RemoteSpec:
    return parse_remote(proc.url, model, "lemonade", **kw)


def health(proc: Proc, model: str = "tiny") -> RemoteEntry:
    async def go() -> RemoteEntry:
        async with RemoteClient(lemonade(proc, model)) as c:
            return await c.health()
    return run(go)


@contextlib.contextmanager
def lemonade_shaped(upstream: str) -> Iterator[str]:
    """A real HTTP server in front of ``upstream`` that answers ``load`` the way Lemonade does:
    ``{"status", "model_name", "checkpoint", "recipe"}``, no ``action`` and no ``pid``."""
    http = httpx.Client(base_url=upstream, timeout=60, trust_env=False)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(size) if size else None
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("content-type", "authorization")}
            r = http.request(self.command, self.path, content=body, headers=headers)
            out = r.content
            if self.path.endswith("/load") and r.status_code == 200:
                out = json.dumps({k: v for k, v in r.json().items()
                                  if k in ("status", "model_name", "checkpoint", "recipe")}).encode()
            self.send_response(r.status_code)
            self.send_header("content-type", r.headers.get("content-type", "application/json"))
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _forward

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="lemonade-shaped", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        http.close()
