"""Hardening of the HTTP server and its backends (issue 21), each over a real socket.

1. Non-finite numbers are a 400 on every route that parses a body; a setting that fails
   changes nothing; an unexpected error in one model's task never ends the router.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from lemon_magic import InvalidOptions, Router, RouterConfig
from tests.conftest import wait_no_backends
from tests.hubstub import HubStub, hub
from tests.serving import CHAT, serve_in_process, stop_served_process

pytestmark = pytest.mark.real
__all__ = ("hub",)  # the fixture, imported for the tests below


@pytest.fixture(scope="module")
def srv(tiny_model: str, tiny_model_b: str) -> Iterator[tuple[Router, httpx.Client]]:
    """A served router with ``tiny`` and ``tiny-b`` registered (nothing loaded)."""
    router = Router(RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3))
    try:
        router.register("tiny", tiny_model)
        router.register("tiny-b", tiny_model_b)
        url = router.serve(port=0)
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            yield router, http
        router.stop_serving()
        for name in ("tiny", "tiny-b"):
            router.unregister(name)
    finally:
        router.close()
        wait_no_backends()


def _post_raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


# ----------------------------------------------------------------- 1. non-finite numbers

#: every route that parses a body, with a body that is fine but for one non-finite number
_BODIES = [
    ("/params", '{"drain_timeout": NaN}'),
    ("/params", '{"request_timeout": Infinity}'),
    ("/params", '{"load_wait_timeout": -Infinity}'),
    ("/params", '{"stream_idle_timeout": 1e999}'),  # a finite literal that parses to inf
    ("/load", '{"model_name": "tiny", "ctx_size": NaN}'),
    ("/completions", '{"model": "tiny", "prompt": "a", "max_tokens": 1, "temperature": NaN}'),
    ("/chat/completions", '{"model": "tiny", "messages": [], "top_p": Infinity}'),
    ("/embeddings", '{"model": "tiny", "input": "a", "x": NaN}'),
    ("/unload", '{"model_name": "tiny", "x": NaN}'),
    ("/pull", '{"model_name": "tiny", "x": NaN}'),
    ("/delete", '{"model_name": "nope", "x": NaN}'),
    ("/models/tiny/options", '{"ctx_size": NaN}'),
]


@pytest.mark.parametrize(("path", "text"), _BODIES, ids=[f"{p}:{t[-22:]}" for p, t in _BODIES])
def test_non_finite_numbers_are_a_400_and_change_nothing(
        srv: tuple[Router, httpx.Client], path: str, text: str) -> None:
    router, http = srv
    before = http.get("/params").json()
    spawns = router.async_router.spawn_count
    r = _post_raw(http, path, text)
    assert r.status_code == 400, (r.status_code, r.text)
    assert "non-finite" in r.text, r.text
    assert http.get("/params").json() == before
    assert router.async_router.spawn_count == spawns


def test_nan_drain_timeout_then_a_reload_leaves_the_server_up(srv: tuple[Router, httpx.Client]) -> None:
    """The issue's two requests: a NaN setting, then a reload (it used to end the router)."""
    _, http = srv
    assert http.post("/load", json={"model_name": "tiny", "ctx_size": 256}).status_code == 200
    assert _post_raw(http, "/params", '{"drain_timeout": NaN}').status_code == 400
    r = http.post("/load", json={"model_name": "tiny", "ctx_size": 512})
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "reloaded"
    assert http.get("/health").status_code == 200
    done = http.post("/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text


def test_params_are_all_checked_before_any_is_applied(srv: tuple[Router, httpx.Client]) -> None:
    _, http = srv
    before = http.get("/params").json()
    r = http.post("/params", json={"drain_timeout": 7, "request_timeout": 0})
    assert r.status_code == 400, r.text
    r = http.post("/params", json={"drain_timeout": 7, "max_loaded_models": True})
    assert r.status_code == 400, r.text
    assert http.get("/params").json() == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, True, "5"])
def test_configure_refuses_a_bad_timeout(value: object) -> None:
    """The Python API too: a setting that is not a finite number of seconds changes nothing."""
    router = Router(RouterConfig(drain_timeout=5))
    try:
        before = router.config
        with pytest.raises(InvalidOptions, match="drain_timeout"):
            router.configure(request_timeout=9, drain_timeout=value)
        assert router.config == before
        with pytest.raises(InvalidOptions, match="request_timeout"):
            router.configure(request_timeout=0)
    finally:
        router.close()


def test_an_unexpected_error_in_a_models_task_fails_only_that_model(
        srv: tuple[Router, httpx.Client], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a task of the router's (here the idle watcher) is logged; the router, the
    server and the other models go on."""
    _, http = srv
    from lemon_magic import _idle

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug in the idle watcher")

    monkeypatch.setattr(_idle, "watch", broken)
    with caplog.at_level(logging.ERROR, logger="lemon_magic.router"):
        r = http.post("/load", json={"model_name": "tiny-b"})
        assert r.status_code == 200, r.text
        assert http.get("/health").status_code == 200
    monkeypatch.undo()
    assert any("a bug in the idle watcher" in (rec.exc_text or "") + rec.getMessage()
               for rec in caplog.records)
    r = http.post("/chat/completions", json={"model": "tiny-b", "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = http.post("/load", json={"model_name": "tiny"})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------- 2. backends answer only the router

_EVIL = {"Host": "evil.example", "Origin": "http://evil.example", "Content-Type": "text/plain"}


@pytest.mark.parametrize("backend", ["llama-server", "llama-cpp-python"])
def test_a_backend_answers_only_the_router(srv: tuple[Router, httpx.Client], backend: str) -> None:
    """The issue's request straight to a backend's port (any Host, any Origin, no key) is a
    401, on its inference routes and on the ones that show the model's path or its slots;
    everything the router sends (health polls, requests, streams from the Python API) carries
    the backend's own key, which is on no command line."""
    router, http = srv
    r = http.post("/load", json={"model_name": "tiny", "backend": backend, "ctx_size": 256})
    assert r.status_code == 200, r.text
    pid = r.json()["pid"]
    [entry] = [e for e in http.get("/health").json()["all_models_loaded"] if e["model_name"] == "tiny"]
    root = entry["backend_url"].removesuffix("/v1")
    body = '{"prompt": "Once upon", "max_tokens": 2}'
    with httpx.Client(base_url=root, timeout=30, trust_env=False) as direct:
        paths = ["/v1/completions", "/v1/chat/completions"]
        for path in paths:
            for headers in (_EVIL, {"Authorization": "Bearer none"}, {}):
                answer = direct.post(path, content=body, headers=headers)
                assert answer.status_code == 401, (path, headers, answer.status_code, answer.text)
        if backend == "llama-server":
            for path in ("/props", "/slots", "/metrics", "/tokenize", "/apply-template"):
                answer = direct.request("POST" if path in ("/tokenize", "/apply-template") else "GET",
                                        path, content=b"{}", headers=_EVIL)
                assert answer.status_code == 401, (path, answer.status_code, answer.text)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode().split("\0")
    assert not any("key" in arg.lower() for arg in cmdline), cmdline
    # everything of ours carries the key: HTTP, the Python API, and its streams (another client)
    done = http.post("/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text
    with http.stream("POST", "/chat/completions", json={"model": "tiny", "messages": CHAT,
                                                         "max_tokens": 2, "stream": True}) as s:
        assert s.status_code == 200 and "[DONE]" in s.read().decode()
    assert router.complete("tiny", "a", max_tokens=2).text is not None
    assert "".join(router.complete("tiny", "a", max_tokens=2, stream=True)) is not None


# ----------------------------------------------------------------- 3. bounds on backend flags

@pytest.mark.parametrize(("args", "fragment"), [
    ("--threads-http 3000", "--threads-http must be an integer from -1 to"),
    ("--threads-http=32768", "--threads-http must be an integer from -1 to"),
    ("-tb 3000", "-tb must be an integer from 1 to"),
    ("--threads-batch 0", "--threads-batch must be an integer from 1 to"),
    ("--prio 3 --poll 100", "--prio must be an integer from -1 to 0 (no raised or real-time priority)"),
    ("--prio 1", "--prio must be an integer from -1 to 0"),
    ("--poll 100", "--poll must be an integer from 0 to 50"),
    ("-np 100000", "-np must be an integer from -1 to 64"),
    ("-b 1000000", "-b must be an integer from 1 to"),
    ("--cache-ram -1", "--cache-ram must be an integer from 0 to"),
    ("--n_threads_batch 3000", "--n_threads_batch must be an integer from -1 to"),
    ("--seed 12abc", "--seed must be an integer"),
    ("--temp nan", "--temp must be a number from 0 to"),
    ("--prio", "--prio needs a value"),
    ("--no-warmup 3000", "3000 is not a flag"),
    ("--use_mlock maybe", "--use_mlock must be one of"),
])
def test_a_backend_flag_out_of_bounds_is_refused_in_one_line(
        srv: tuple[Router, httpx.Client], args: str, fragment: str) -> None:
    router, http = srv
    spawns = router.async_router.spawn_count
    before = http.get("/params").json()
    for path, body in (("/load", {"model_name": "tiny", "llamacpp_args": args}),
                       ("/params", {"llamacpp_args": args}),
                       ("/models/tiny/options", {"llamacpp_args": args, "dry_run": True})):
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert fragment in r.text and "\\n" not in r.text, (path, r.text)
    assert router.async_router.spawn_count == spawns
    assert http.get("/params").json() == before


def test_backend_flags_within_bounds_load(srv: tuple[Router, httpx.Client]) -> None:
    _, http = srv
    args = "--threads-http 2 -tb 2 --prio 0 --poll 0 -fa on -np 1 --cache-ram 64 --no-warmup"
    r = http.post("/load", json={"model_name": "tiny", "llamacpp_args": args, "ctx_size": 256})
    assert r.status_code == 200, r.text
    threads = len(os.listdir(f"/proc/{r.json()['pid']}/task"))
    assert threads < 40, threads  # --threads-http 3000 made 3,006


def test_the_table_of_allowed_flags() -> None:
    """One table: every allowed flag says what value it takes; numbers are bounded; none is a
    flag lemon_magic sets itself; counts, sizes and priorities all have bounds."""
    from lemon_magic.backends import default_backends
    from lemon_magic.server._args import FLAGS, Number

    reserved = set().union(*(b.reserved_flags for b in default_backends().values()))
    assert not reserved & set(FLAGS)
    for flag, value in FLAGS.items():
        if isinstance(value, Number):
            assert value.low <= value.high, flag
    for flag in ("-tb", "--threads-batch", "--threads-http", "--prio", "--poll", "-np", "--parallel",
                 "-b", "--batch-size", "-ub", "--ubatch-size", "--cache-ram", "--ctx-checkpoints",
                 "--keep", "-n", "--n-predict", "--n_batch", "--n_ubatch", "--n_threads_batch",
                 "--cache-reuse", "--reasoning-budget", "-to", "--timeout"):
        assert isinstance(FLAGS[flag], Number), flag
    assert FLAGS["--prio"].high == 0


# ----------------------------------------------------------------- 4. the server's key, off the command line

@pytest.mark.parametrize("how", ["file", "environment", "command line"])
def test_serve_takes_its_key_from_a_file_or_the_environment(tmp_path: Path, how: str) -> None:
    key = "k-" + os.urandom(8).hex()
    args: tuple[str, ...] = ()
    env = None
    if how == "file":
        (tmp_path / "key").write_text(f"{key}\n")
        args = ("--api-key-file", str(tmp_path / "key"))
    elif how == "environment":
        env = {"LEMON_MAGIC_API_KEY": key}
    else:
        args = ("--api-key", key)
    process, url = serve_in_process(tmp_path, *args, env=env)
    try:
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            on_command_line = key.encode() in f.read()
        assert on_command_line == (how == "command line")
        assert httpx.get(url + "/health", trust_env=False).status_code == 401
        r = httpx.get(url + "/health", headers={"Authorization": f"Bearer {key}"}, trust_env=False)
        assert r.status_code == 200
    finally:
        stop_served_process(process)
    warnings = [line for line in (tmp_path / "stderr").read_text().splitlines()
                if "--api-key" in line and "other local users" in line]
    assert len(warnings) == (how == "command line"), warnings
    assert key not in (tmp_path / "stderr").read_text()


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read"), ("\n  \n", "is empty")])
def test_serve_refuses_a_key_file_it_cannot_use(tmp_path: Path, content: str | None,
                                                fragment: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "lemon_magic", "serve", "--port", "0",
                           "--api-key-file", str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 1 and fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ----------------------------------------------------------------- 5. cross-site browser requests

#: what a browser sends with an <img src="http://127.0.0.1:13305/..."> on another site: no Origin
_IMG = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}


def test_a_cross_site_request_without_origin_never_reaches_the_hub(
        srv: tuple[Router, httpx.Client], hub: HubStub) -> None:
    router, http = srv
    spawns = router.async_router.spawn_count
    sent = [http.get("/pull/variants", params={"checkpoint": "attacker/x"}, headers=_IMG),
            http.post("/pull", json={"model_name": "attacker/x:Q8_0"}, headers=_IMG),
            http.post("/load", json={"model_name": "attacker/x:Q8_0"}, headers=_IMG),
            http.post("/completions", json={"model": "attacker/x:Q8_0", "prompt": "a"}, headers=_IMG)]
    for r in sent:
        assert r.status_code == 403, (r.request.url, r.status_code, r.text)
        assert "cross-site" in r.text
    assert hub.requests == [] and router.async_router.spawn_count == spawns
    # the same request from a page of the server's own, a same-site one or a non-browser client
    for site in ("same-origin", "same-site", "none", None):
        headers = {"Sec-Fetch-Site": site} if site else {}
        r = http.get("/pull/variants", params={"checkpoint": "attacker/x"}, headers=headers)
        assert r.status_code == 404, r.text  # the stand-in has no such repo: it was asked
    assert hub.requests


# ----------------------------------------------------------------- 6. slow clients

def _open(url: str, n: int, head: bytes) -> list[socket.socket]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    socks = []
    for _ in range(n):
        s = socket.create_connection((parts.hostname, parts.port), timeout=10)
        s.sendall(head)
        socks.append(s)
    return socks


def _close_times(socks: dict[socket.socket, float], seconds: float) -> dict[socket.socket, float]:
    """For each socket the server closed within ``seconds``: how long after its opening
    (``socks`` maps each to its opening time)."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + seconds
    # epoll, not select(): in a full run this process holds more than 1,024 descriptors
    with selectors.DefaultSelector() as selector:
        for s in socks:
            selector.register(s, selectors.EVENT_READ)
        while len(closed) < len(socks) and time.monotonic() < deadline:
            ready = selector.select(max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for key, _ in ready:
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed[s] = now - socks[s]
                    selector.unregister(s)
    return closed


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[Router]:
    """A served router (no model) with a 1 s header timeout and at most 600 connections."""
    from lemon_magic.server import serve

    limits = getattr(serve, "Limits", None)
    if limits is not None:  # (the same test runs against code without limits, to see it fail)
        monkeypatch.setattr(serve, "LIMITS", limits(header_timeout=1.0, max_connections=600))
    router = Router(RouterConfig())
    try:
        router.serve(port=0)
        yield router
    finally:
        router.close()


def test_half_sent_headers_are_closed_within_the_header_timeout(small_limits: Router) -> None:
    """500 connections that never finish their headers (and one that trickles a byte every
    0.1 s) are each closed within the header timeout (1 s here), while a normal request is
    answered at once."""
    url = small_limits.base_url
    assert url is not None
    opened: dict[socket.socket, float] = {}
    try:
        for s in _open(url, 500, b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "):
            opened[s] = time.monotonic()
        with httpx.Client(timeout=5, trust_env=False) as http:
            t0 = time.monotonic()
            assert http.get(url + "/health").status_code == 200
            answered = time.monotonic() - t0
        [trickle] = _open(url, 1, b"G")
        opened[trickle] = time.monotonic()

        def drip() -> None:
            for byte in b"ET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1":
                time.sleep(0.1)
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    return

        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        closed = _close_times(opened, 5.0)
        dripping.join(10)
        assert len(closed) == 501, f"{len(closed)} of 501 closed"
        slowest = max(closed.values())
        assert slowest < 1.0 + 0.75, slowest
        assert 1.0 <= closed[trickle] < 1.75, closed[trickle]
        print(f"normal request answered in {answered * 1000:.1f} ms among 500 slow ones; each "
              f"slow one closed {min(closed.values()):.2f}-{slowest:.2f} s after it opened "
              f"(trickle: {closed[trickle]:.2f} s)")
    finally:
        for s in opened:
            s.close()


def test_connections_beyond_the_limit_are_refused_with_bounded_logging(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Past the limit a connection is answered 503 at once (never parsed); 300 refusals make
    at most two log lines, which count them all."""
    from lemon_magic.server import serve

    monkeypatch.setattr(serve, "LIMITS", serve.Limits(header_timeout=5.0, max_connections=50))
    router = Router(RouterConfig())
    try:
        url = router.serve(port=0)
        with caplog.at_level(logging.INFO, logger="lemon_magic.server"):
            socks = _open(url, 50, b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            refused = []
            for _ in range(300):
                answer = _open(url, 1, b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0]
                refused.append(answer.recv(4096))
                answer.close()
            for s in socks:
                s.close()
            time.sleep(0.3)
            with httpx.Client(timeout=5, trust_env=False) as http:
                assert http.get(url + "/health").status_code == 200  # room again
            router.stop_serving()  # says what it has counted since its last line
        assert all(r.startswith(b"HTTP/1.1 503") for r in refused), refused[:3]
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert 1 <= len(lines) <= 2, lines
        assert sum(int(line.split()[-2]) for line in lines) == 300, lines
    finally:
        router.close()


def _read_all(s: socket.socket, seconds: float) -> bytes:
    """What the server sends on ``s`` until it closes it (or ``seconds`` pass)."""
    data = b""
    deadline = time.monotonic() + seconds
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def test_a_pipelined_answer_longer_than_the_header_timeout_is_not_cut(
        tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests sent at once, the second a stream of ~2.5 s (the header timeout: 1 s):
    once it has arrived its answer is sent in full, even though it started when the first
    answer ended."""
    from lemon_magic.server import serve
    from tests.fakes import FakeBackend

    monkeypatch.setattr(serve, "LIMITS", serve.Limits(header_timeout=1.0))
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.5")
    router = Router(RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3),
                    backends={"fake": FakeBackend()})
    try:
        name = "slow-stream"
        router.register(name, tiny_model)
        router.load(name, backend="fake")
        parts = urlsplit(router.serve(port=0))
        assert parts.hostname is not None and parts.port is not None
        body = json.dumps({"model": name, "prompt": "hi", "stream": True}).encode()
        second = (b"POST /api/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + second)
            data = _read_all(s, 15)
            took = time.monotonic() - t0
        assert data.count(b"HTTP/1.1 200") == 2, data[:500]
        assert b"stand-in" in data and b"data: [DONE]" in data, (took, data[-300:])
        assert took > 2.0, took  # (the stream did outlast the header timeout)
    finally:
        router.close()


def test_a_large_body_answered_before_it_is_read_gets_exactly_that_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB POST with a wrong key: its 401, and nothing else (the rest of the body is no
    header: no stray 431 after it, no reset before it); the connection stays usable."""
    from lemon_magic.server import serve

    monkeypatch.setattr(serve, "LIMITS", serve.Limits(header_timeout=1.0))
    router = Router(RouterConfig())
    try:
        parts = urlsplit(router.serve(port=0, api_key="s3cret"))
        assert parts.hostname is not None and parts.port is not None
        body = b'{"model": "tiny", "prompt": "' + b"a" * 2**20 + b'"}'
        head = (b"POST /api/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer wrong\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            s.sendall(head + body)
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Authorization: Bearer s3cret\r\nConnection: close\r\n\r\n")
            data = _read_all(s, 10)
        assert data.startswith(b"HTTP/1.1 401"), data[:300]
        assert b" 431 " not in data, data[-300:]
        assert data.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 200" in data, data[-300:]
    finally:
        router.close()


# ----------------------------------------------------------------- 8. fair admission

def test_a_completion_waits_for_one_reload_not_a_queue_of_them(srv: tuple[Router, httpx.Client]) -> None:
    """200 concurrent loads of the embedded model, each with another ctx_size: a few queue
    (the rest are refused with 503 and Retry-After at once) and a completion sent meanwhile
    is answered within two reload times (it used to wait behind the queued reloads)."""
    router, http = srv
    model = "gemma3-270m"
    assert http.post("/load", json={"model_name": model, "ctx_size": 256}).status_code == 200
    one = http.post("/load", json={"model_name": model, "ctx_size": 288})
    assert one.json()["action"] == "reloaded", one.text
    reload_seconds = one.json()["seconds"]
    spawns = router.async_router.spawn_count
    base = str(http.base_url).rstrip("/")

    async def scenario() -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        loads: list[httpx.Response] = []
        async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
            async def load(ctx: int) -> None:
                loads.append(await client.post(base + "/load", json={"model_name": model,
                                                                     "ctx_size": ctx}))

            async with anyio.create_task_group() as tg:
                for ctx in range(320, 320 + 200):
                    tg.start_soon(load, ctx)
                await anyio.sleep(0.5)  # they are all in: one reloads, a few queue
                t0 = time.monotonic()
                done = await client.post(base + "/completions", json={
                    "model": model, "prompt": "Once upon a time", "max_tokens": 2})
                took = time.monotonic() - t0
                print(f"completion: {done.status_code} after {took:.2f} s", flush=True)
                assert done.status_code == 200, done.text
        return loads, took

    loads, took = anyio.run(scenario)
    statuses = Counter(r.status_code for r in loads)
    busy = [r for r in loads if r.status_code == 503]
    assert set(statuses) <= {200, 503}, statuses
    assert all(r.headers.get("retry-after", "").isdigit() for r in busy)
    assert all("retry in" in r.text for r in busy[:1]), busy[:1]
    reloads = router.async_router.spawn_count - spawns
    print(f"one reload {reload_seconds:.2f} s; the completion took {took:.2f} s among 200 loads "
          f"({statuses[200]} done, {statuses[503]} refused, {reloads} reloads)")
    assert took < 2 * reload_seconds, (took, reload_seconds)
    assert statuses[503] >= 150 and reloads <= statuses[200]
    assert http.post("/unload", json={"model_name": model}).status_code == 200


def test_queued_reloads_are_bounded_and_a_request_that_gives_up_holds_nothing(
        tmp_path: Path, tiny_model: str) -> None:
    """With a load held in flight (a fake backend that is not healthy yet): one explicit load
    with other options may queue (``max_queued_loads=1``), the next is refused at once; an
    inference request that rides on the load and gives up (its wait timed out) is not counted
    in flight once the load ends."""
    from lemon_magic import LoadQueueFull, ModelState, WaitTimeout
    from tests.fakes import FakeBackend

    gate = tmp_path / "gate"
    router = Router(RouterConfig(load_wait_timeout=1.5, max_queued_loads=1, drain_timeout=1),
                    backends={"fake": FakeBackend(gate=gate)})
    try:
        router.register("f", tiny_model)
        outcomes: list[object] = []

        def load(ctx: int) -> None:
            try:
                outcomes.append(router.load("f", ctx_size=ctx, backend="fake"))
            except Exception as exc:
                outcomes.append(exc)

        first = threading.Thread(target=load, args=(256,))
        first.start()
        while not any(s.state is ModelState.LOADING for s in router.status()):
            time.sleep(0.01)
        queued = threading.Thread(target=load, args=(512,))
        queued.start()
        while router.async_router._models["f"].queued_loads == 0:
            time.sleep(0.01)
        began = time.monotonic()
        with pytest.raises(LoadQueueFull, match="retry in"):
            router.load("f", ctx_size=1024, backend="fake")
        assert time.monotonic() - began < 0.5
        with pytest.raises(WaitTimeout):
            router.complete("f", "a", max_tokens=1)
        gate.touch()
        first.join(30)
        queued.join(30)
        deadline = time.monotonic() + 20
        while router.status()[0].state is not ModelState.READY and time.monotonic() < deadline:
            time.sleep(0.02)
        [status] = router.status()
        assert status.state is ModelState.READY and status.requests_in_flight == 0
        assert router.async_router._models["f"].queued_loads == 0
    finally:
        router.close()
