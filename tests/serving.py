"""Shared pieces of the HTTP server tests: a served router fixture, ``lemon-magic serve`` in a
process of its own, a raw-socket client and bodies held in flight."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from lemon_magic import ModelState, Router

CHAT = [{"role": "user", "content": "hello"}]


@dataclass
class Served:
    router: Router
    url: str
    http: httpx.Client

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=60)

    def pid(self, name: str) -> int | None:
        return next((s.pid for s in self.router.status()
                     if s.name == name and s.state is ModelState.READY), None)


@pytest.fixture
def served(make_router: Callable[..., Router], tiny_model: str, tiny_model_b: str) -> Iterator[Served]:
    router = make_router()
    router.register("tiny", tiny_model)
    router.register("tiny-b", tiny_model_b)
    url = router.serve(port=0)
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        yield Served(router, url, http)
    router.stop_serving()
    for name in ("tiny", "tiny-b"):
        router.unregister(name)


def backend_headers(router: Router, url: str) -> dict[str, str]:
    """What a request straight to the backend at ``url`` needs: its key, which only the router
    holds (issue 21). For tests and benchmarks that compare with the backend itself."""
    return next(dict(m.process.headers) for m in router.async_router._models.values()
                if m.process is not None and url.startswith(m.process.url))


def raw(url: str, request: bytes, *, shut_write: bool = False) -> bytes:
    """Send raw bytes to the server; returns all it answers until it closes or goes quiet."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            out += data
            if b"\r\n\r\n" in out and not shut_write:
                head, _, body = out.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    return out


def serve_in_process(tmp_path: Path, *args: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """``lemon-magic serve --port 0 ARGS`` in a process of its own; its process and base URL."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LEMON_MAGIC_API_KEY", "LEMONADE_API_KEY")}
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "lemon_magic", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
            # config and state of its own: a test's served router may register "tiny" in the
            # suite's config dir, which this server would otherwise load on a request for it
            env={**clean, "PYTHONPATH": str(Path(__file__).parent.parent),
                 "LEMON_MAGIC_CONFIG_DIR": str(tmp_path / "config"),
                 "LEMON_MAGIC_STATE_DIR": str(tmp_path / "state"), **(env or {})})
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("serving "), (line, (tmp_path / "stderr").read_text())
    return process, line.split()[1]


def stop_served_process(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``lemon-magic serve`` in a process of its own (its memory measured alone)."""
    process, url = serve_in_process(tmp_path)
    try:
        yield process, url
    finally:
        stop_served_process(process)


@contextlib.contextmanager
def hold_bodies(url: str, count: int = 4, size: int = 15 * 2**20) -> Iterator[list[socket.socket]]:
    """``count`` completions whose ``size``-byte bodies are still arriving (all but 100 bytes
    sent): the server holds their bytes in flight until the sockets close."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    head = (f"POST {parts.path}/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection((parts.hostname, parts.port), timeout=30)
            s.sendall(head + b'{"model": "tiny", "prompt": "' + b"x" * (size - 100))
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()
