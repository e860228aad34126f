"""Two holes a review found in the body bounds: a string left open made the shape check
quadratic (on the router's loop), and a 429 for bytes in flight turned an unload into
"unload all"."""

from __future__ import annotations

import socket
import subprocess
import time
from urllib.parse import urlsplit

import httpx
import pytest

from lemon_magic.server._wire import BadRequest, check_shape
from tests.test_hardening import serve_process  # noqa: F401  (the fixture)


@pytest.mark.timeout(60)
def test_an_unclosed_string_is_checked_in_one_pass() -> None:
    """2 MB of ``"\\`` after deep nesting: the old pattern rescanned the rest of the body from
    every quote (0.26 s for 8 KB, about an hour for 2 MB); one pass refuses it at once."""
    body = b"[" * 65 + b'"\\' * 1_000_000
    with pytest.raises(BadRequest, match="nested more than 64 deep"):
        check_shape(body)
    # a closed string with escaped quotes still hides its brackets
    check_shape(b'{"prompt": "' + b'[\\"' * 100 + b'"}')


def test_an_unload_refused_for_bytes_in_flight_unloads_nothing(
        serve_process: tuple[subprocess.Popen[str], str]) -> None:  # noqa: F811
    """Four requests hold 60 MiB of bodies still arriving; an unload of one model whose body
    would pass 64 MiB in flight is a 429, not "All models unloaded" (it used to fall through
    to Lemonade's "a body that is not JSON means unload all")."""
    _, url = serve_process
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    head = (f"POST {parts.path}/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {15 * 2**20}\r\n\r\n").encode()
    slow = []
    try:
        for _ in range(4):
            s = socket.create_connection((parts.hostname, parts.port), timeout=30)
            s.sendall(head + b'{"model": "tiny", "prompt": "' + b"x" * (15 * 2**20 - 100))
            slow.append(s)
        with httpx.Client(timeout=30, trust_env=False) as http:
            deadline = time.monotonic() + 15
            while True:  # until the server has read what they sent (a busy machine is slow)
                r = http.post(url + "/unload", json={"model_name": "tiny", "pad": "x" * 5 * 2**20})
                if r.status_code == 429 or time.monotonic() > deadline:
                    break
                assert "All models unloaded" not in r.text, r.text
                time.sleep(0.2)
            assert r.status_code == 429, (r.status_code, r.text[:200])
            assert "in flight" in r.text and r.headers.get("retry-after")
    finally:
        for s in slow:
            s.close()
