"""Bounds on request bodies (issue 21, 7): their parsed shape, the bytes in flight across
requests, and two holes a review found (a string left open made the shape check quadratic on
the router's loop; a 429 for bytes in flight turned an unload into "unload all")."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from lemon_magic.server._wire import BadRequest, check_shape
from tests.serving import hold_bodies, serve_process

__all__ = ("serve_process",)  # the fixture, imported for the tests below

pytestmark = pytest.mark.real


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
        serve_process: tuple[subprocess.Popen[str], str]) -> None:
    """Four requests hold 60 MiB of bodies still arriving; an unload of one model whose body
    would pass 64 MiB in flight is a 429, not "All models unloaded" (it used to fall through
    to Lemonade's "a body that is not JSON means unload all")."""
    _, url = serve_process
    with hold_bodies(url), httpx.Client(timeout=30, trust_env=False) as http:
        deadline = time.monotonic() + 15
        while True:  # until the server has read what they sent (a busy machine is slow)
            r = http.post(url + "/unload", json={"model_name": "tiny", "pad": "x" * 5 * 2**20})
            if r.status_code == 429 or time.monotonic() > deadline:
                break
            assert "All models unloaded" not in r.text, r.text
            time.sleep(0.2)
        assert r.status_code == 429, (r.status_code, r.text[:200])
        assert "in flight" in r.text and r.headers.get("retry-after")


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.mark.parametrize(("name", "fragment"), [
    ("objects", "more than 100000 arrays and objects"),
    ("values", "more than 1000000 values"),
    ("nesting", "nested more than 64 deep"),
])
def test_a_body_too_large_once_parsed_is_refused_before_it_is(
        serve_process: tuple[subprocess.Popen[str], str], name: str, fragment: str) -> None:
    """The issue's 15 MiB of ``[{},{},…]`` (which made 479 MiB of Python objects), 15 MiB of
    ``[1,1,…]``, or deep nesting: a 413 in one line, and the server's peak memory grows by
    less than 64 MiB."""
    process, url = serve_process
    size = 15 * 2**20
    inner = {"objects": b"{}," * (size // 3), "values": b"1," * (size // 2),
             "nesting": b"[" * 65 + b"]" * 65 + b","}[name]
    body = b'{"model": "tiny", "prompt": [' + inner + b'0]}'
    with httpx.Client(timeout=60, trust_env=False) as http:
        http.get(url + "/health")
        before = _peak_rss(process.pid)
        r = http.post(url + "/completions", content=body, headers={"content-type": "application/json"})
        grew = _peak_rss(process.pid) - before
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert fragment in r.text and "\n" not in r.text.strip(), r.text
    print(f"{name}: {len(body) / 2**20:.1f} MiB body refused; server peak RSS grew by "
          f"{grew / 2**20:.1f} MiB")
    assert grew < 64 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB"


def test_bytes_in_flight_across_requests_are_bounded(
        serve_process: tuple[subprocess.Popen[str], str]) -> None:
    """Four requests each holding 15 MiB of a body still arriving (60 MiB): a new 5 MiB body
    would pass 64 MiB in flight, so it is a 429 with Retry-After; once they go, it is taken."""
    _, url = serve_process
    with hold_bodies(url) as held, httpx.Client(timeout=30, trust_env=False) as http:
        deadline = time.monotonic() + 15
        while True:  # until the server has read what they sent (a busy machine is slow)
            r = http.post(url + "/completions", json={"model": "tiny", "prompt": "x" * 5 * 2**20})
            if r.status_code != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 429, (r.status_code, r.text[:200])
        assert "in flight" in r.text and r.headers.get("retry-after"), (r.text, r.headers)
        for s in held:
            s.close()
        time.sleep(0.3)
        r = http.post(url + "/completions", json={"model": "tiny", "prompt": "x" * 5 * 2**20})
        assert r.status_code == 404, (r.status_code, r.text[:200])  # parsed: no such model
