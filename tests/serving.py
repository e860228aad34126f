"""Shared pieces of the HTTP server tests: a served router fixture and a raw-socket client."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
