"""Bad input over a real socket: one table of bad requests, each answered with its status and
one clear line, after which nothing has leaked (no request in flight, the same backend pids,
no new process, no spawn) and the server still answers.

One served router per module, with ``tiny`` loaded once; every row compares the router with a
snapshot taken just before it, so a row that does change something fails by itself.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from lemon_magic import Router, RouterConfig
from lemon_magic.server.app import MAX_BODY
from tests.conftest import _our_backends, wait_no_backends
from tests.serving import CHAT, raw

pytestmark = pytest.mark.real


@dataclass
class Ctx:
    router: Router
    url: str
    http: httpx.Client
    host: bytes  # the Host header a raw request sends
    tiny_path: str  # a real GGUF file: its path must not load over HTTP


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


Send = Callable[[Ctx], Answer]


@pytest.fixture(scope="module")
def ctx(tiny_model: str, tiny_model_b: str) -> Iterator[Ctx]:
    router = Router(RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3))
    try:
        router.register("tiny", tiny_model)
        router.register("tiny-b", tiny_model_b)
        url = router.serve(port=0)
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            loaded = http.post("/load", json={"model_name": "tiny"})
            assert loaded.status_code == 200, loaded.text
            yield Ctx(router, url, http, urlsplit(url).netloc.encode(), tiny_model)
        router.stop_serving()
        for name in ("tiny", "tiny-b"):
            router.unregister(name)
    finally:
        router.close()
        wait_no_backends()


# ----------------------------------------------------------------- ways to send a bad request

def _answer(r: httpx.Response) -> Answer:
    return Answer(r.status_code, r.content)


def post(path: str, body: object = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> Send:
    """A POST through httpx: ``body`` as JSON, or ``content`` as it is."""
    def send(c: Ctx) -> Answer:
        if content is not None:
            return _answer(c.http.post(path, content=content, headers=headers))
        return _answer(c.http.post(path, json=body, headers=headers))
    return send


def get(path: str, *, headers: dict[str, str] | None = None) -> Send:
    return lambda c: _answer(c.http.get(path, headers=headers))


def raw_post(path: str, body: bytes, *, length: int | None = None, shut_write: bool = False) -> Send:
    """Raw bytes over a socket: a declared ``Content-Length`` may differ from the body sent."""
    def send(c: Ctx) -> Answer:
        size = len(body) if length is None else length
        head = (f"POST /api/v1{path} HTTP/1.1\r\nHost: ".encode() + c.host +
                f"\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        return _parse(raw(c.url, head + body, shut_write=shut_write))
    return send


def raw_bytes(request: bytes) -> Send:
    return lambda c: _parse(raw(c.url, request, shut_write=True))


def _parse(answer: bytes) -> Answer:
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0  # 0: no answer
    return Answer(status, body)


def chunked_over_limit(c: Ctx) -> Answer:
    chunk = b"x" * 2**20
    return _answer(c.http.post("/load", content=iter([chunk] * (MAX_BODY // len(chunk) + 1))))


def model_path(c: Ctx) -> Answer:
    return _answer(c.http.post("/load", json={"model_name": c.tiny_path}))


def message(body: bytes) -> str:
    """The error message: Lemonade's bare string, OpenAI's ``error.message``, or the text."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    error = data.get("error", data) if isinstance(data, dict) else data
    return str(error.get("message", error) if isinstance(error, dict) else error)


# ----------------------------------------------------------------- the table

@dataclass(frozen=True)
class Row:
    send: Send
    status: int
    fragment: str
    code: str | None = None  # OpenAI's error shape with this code


def row(id: str, send: Send, status: int, fragment: str, code: str | None = None,
        defect: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
    return pytest.param(Row(send, status, fragment, code), id=id, marks=marks)


def load(**body: object) -> Send:
    return post("/load", {"model_name": "tiny", **body})


def args(value: object) -> Send:
    return load(llamacpp_args=value)


NOT_SET = "may not set"
ROWS = [
    # the body is not a JSON object
    row("invalid-json", post("/load", content=b"{model_name: tiny}"), 400, "Invalid JSON"),
    row("truncated-json", raw_post("/load", b'{"model_name": "tiny"'), 400, "Invalid JSON"),
    row("json-list", post("/load", [1, 2]), 400, "must be a JSON object, got an array"),
    row("json-string", post("/load", "tiny"), 400, "must be a JSON object, got a string"),
    row("json-number", post("/chat/completions", 42), 400, "must be a JSON object, got a number"),
    row("json-null", post("/completions", content=b"null"), 400, "must be a JSON object, got null"),
    row("invalid-utf8", post("/load", content=b'{"model_name": "ti\xffny"}'), 400, "Invalid JSON"),
    row("empty-body-load", post("/load", content=b""), 400, "empty"),
    row("empty-body-chat", post("/chat/completions", content=b""), 400, "empty"),
    row("json-nested-too-deep", post("/load", content=b"[" * 100000 + b"]" * 100000), 413,
        "nested more than 64 deep"),
    row("json-int-too-long", post("/load", content=b'{"model_name": "tiny", "ctx_size": '
                                  + b"9" * 5000 + b"}"), 400, "a number has too many digits"),
    row("blank-body-completions", post("/completions", content=b" \r\n "), 400, "empty"),
    row("not-http", raw_bytes(b"NOT HTTP AT ALL\r\n\r\n"), 400, "Invalid HTTP request"),
    # huge bodies
    row("content-length-not-a-number", raw_bytes(b"POST /api/v1/load HTTP/1.1\r\nHost: localhost"
                                                 b"\r\nContent-Length: abc\r\n\r\n"),
        400, "Invalid HTTP request"),
    row("content-length-over-limit", raw_post("/load", b"", length=MAX_BODY + 1), 413, "larger than"),
    row("chunked-over-limit", chunked_over_limit, 413, "larger than"),
    # wrong types and values of load fields
    row("model_name-missing", post("/load", {}), 400, "'model_name' is required"),
    row("model_name-int", post("/load", {"model_name": 7}), 400, "'model_name' is required"),
    row("model_name-list", post("/load", {"model_name": ["tiny"]}), 400, "must be a string"),
    row("model_name-empty", post("/load", {"model_name": ""}), 400, "'model_name' is required"),
    row("ctx_size-negative", load(ctx_size=-5), 400, "ctx_size must be a positive integer, got -5"),
    row("ctx_size-zero", load(ctx_size=0), 400, "ctx_size must be a positive integer, got 0"),
    row("ctx_size-huge", load(ctx_size=10**12), 400, "exceeds the training context"),
    row("ctx_size-string", load(ctx_size="big"), 400, "ctx_size must be an integer, or -1"),
    row("ctx_size-float", load(ctx_size=1.5), 400, "ctx_size must be an integer, or -1"),
    row("ctx_size-bool", load(ctx_size=True), 400, "ctx_size must be an integer, or -1"),
    row("ctx_size-nan", post("/load", content=b'{"model_name": "tiny", "ctx_size": NaN}'), 400,
        "NaN is a non-finite number (NaN and Infinity are not JSON)"),
    row("ctx_size-digits-string", load(ctx_size="4096"), 400,
        "ctx_size must be an integer, or -1 for automatic, got a string ('4096')"),
    row("ctx_size-huge-other-model", post("/load", {"model_name": "tiny-b", "ctx_size": 10**6}), 400,
        "exceeds the training context"),
    row("ctx_size-negative-chat", post("/chat/completions", {"model": "tiny", "messages": CHAT,
                                                            "ctx_size": -3}), 400, "ctx_size"),
    row("save_options-string", load(save_options="yes"), 400, "'save_options' must be a boolean"),
    row("pinned-string", load(pinned="yes"), 400, "'pinned' must be a boolean"),
    row("llamacpp_args-int", args(5), 400, "llamacpp_args must be a string, got a number"),
    row("llamacpp_args-object", args({"--port": 1}), 400, "llamacpp_args must be a string, got an object"),
    row("llamacpp_args-shell", args("--seed 1; rm -rf ~"), 400, "shell syntax"),
    row("threads-negative", load(threads=-2), 400, "threads must be a positive integer"),
    row("backend-unknown", load(backend="nope"), 400, "backend must be one of"),
    row("chat_template-int", load(chat_template=5), 400, "chat_template must be a string, got a number"),
    row("llamacpp_backend-unknown", load(llamacpp_backend="cuda"), 400, "'cuda' is not available"),
    # reserved flags, and flags that touch files or the network
    row("reserved-port", args("--port 1"), 400, f"{NOT_SET} --port"),
    row("reserved-model", args("--model /etc/passwd"), 400, f"{NOT_SET} --model"),
    row("reserved-m", args(["-m", "/tmp/x.gguf"]), 400, f"{NOT_SET} -m"),
    row("reserved-host", args("--host=0.0.0.0"), 400, f"{NOT_SET} --host"),
    row("flag-log-file", args("--log-file /tmp/x.log"), 400, f"{NOT_SET} --log-file"),
    row("flag-slot-save-path", args("--slot-save-path /tmp"), 400, f"{NOT_SET} --slot-save-path"),
    row("flag-lora", args("-b 64 --lora /tmp/a.gguf"), 400, f"{NOT_SET} --lora"),
    row("flag-model-url", args("--model-url http://x"), 400, f"{NOT_SET} --model-url"),
    row("flag-chat-template-file", args("--chat-template-file /etc/passwd"), 400,
        f"{NOT_SET} --chat-template-file"),
    # names: only registered models, never a file
    row("unknown-model-load", post("/load", {"model_name": "no-such"}), 404, "'no-such'",
        "model_not_found"),
    row("unknown-model-chat", post("/chat/completions", {"model": "no-such", "messages": CHAT}),
        404, "'no-such'", "model_not_found"),
    row("unknown-model-stream", post("/completions", {"model": "no-such", "prompt": "x",
                                                      "stream": True}), 404, "'no-such'",
        "model_not_found"),
    row("unknown-model-get", get("/models/no-such"), 404, "'no-such'", "model_not_found"),
    row("user-prefix-on-builtin", post("/load", {"model_name": "user.gemma3-270m"}), 404,
        "'user.gemma3-270m'", "model_not_found"),
    row("file-path-as-model", model_path, 404, "unknown model", "model_not_found"),
    row("file-path-message", model_path, 404, "not a registered model name", "model_not_found"),
    row("system-path-as-model", post("/load", {"model_name": "/etc/passwd"}), 404, "'/etc/passwd'",
        "model_not_found"),
    row("model-int-chat", post("/chat/completions", {"model": 7, "messages": CHAT}), 400,
        "'model' must be a string"),
    row("unload-model_name-int", post("/unload", {"model_name": 5}), 404, "Model not loaded: 5"),
    row("unload-unknown", post("/unload", {"model_name": "no-such"}), 404, "Model not loaded: no-such"),
    # inference bodies
    row("stream-string", post("/chat/completions", {"model": "tiny", "messages": CHAT,
                                                    "stream": "yes"}), 400, "'stream' must be a boolean"),
    row("stream-int", post("/completions", {"model": "tiny", "prompt": "x", "stream": 1}), 400,
        "'stream' must be a boolean"),
    row("messages-empty", post("/chat/completions", {"model": "tiny", "messages": []}), 400,
        "at least one message"),
    row("messages-string", post("/chat/completions", {"model": "tiny", "messages": "hello"}), 400,
        "messages"),
    row("messages-missing", post("/chat/completions", {"model": "tiny"}), 400, "messages"),
    row("prompt-blank", post("/completions", {"model": "tiny", "prompt": " "}), 400, "prompt is empty"),
    row("max_tokens-string", post("/completions", {"model": "tiny", "prompt": "x",
                                                   "max_tokens": "many"}), 400, "answered HTTP 400"),
    row("max_tokens-string-stream", post("/completions", {"model": "tiny", "prompt": "x",
                                                          "max_tokens": "many", "stream": True}),
        400, "answered HTTP 400"),
    row("temperature-string", post("/chat/completions", {"model": "tiny", "messages": CHAT,
                                                        "temperature": "hot"}), 400, "'temperature'"),
    # routes, hosts, origins
    row("get-on-post-route", get("/load"), 405, "Use POST"),
    row("get-on-chat", get("/chat/completions"), 405, "Use POST"),
    row("unknown-route", get("/nope"), 404, "does not exist"),
    row("wrong-host", get("/health", headers={"Host": "evil.example"}), 403, "DNS rebinding"),
    row("disallowed-origin", post("/load", {"model_name": "tiny-b"},
                                  headers={"Origin": "http://evil.example"}), 403, "Origin not allowed"),
    row("threads-huge", load(threads=10**9), 400, "threads must be at most"),
]


# ----------------------------------------------------------------- nothing leaks

@dataclass(frozen=True)
class Snapshot:
    pids: dict[str, int | None]
    processes: frozenset[int]
    spawns: int

    @classmethod
    def of(cls, router: Router) -> Snapshot:
        return cls({s.name: s.pid for s in router.status() if s.pid is not None},
                   frozenset(p.pid for p in _our_backends()), router.spawn_count)


def assert_unchanged(c: Ctx, before: Snapshot, seconds: float = 5.0) -> None:
    """The server answers, no request is in flight, and the same processes run (no new one).

    Processes are this test process's children: other llama-servers on the machine are not ours.
    """
    deadline = time.monotonic() + seconds
    while any(s.requests_in_flight for s in c.router.status()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(s.name, s.requests_in_flight) for s in c.router.status() if s.requests_in_flight] == []
    health = c.http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert all(e["requests_in_flight"] == 0 for e in health.json()["all_models_loaded"])
    assert Snapshot.of(c.router) == before


def ready(c: Ctx) -> Snapshot:
    """The snapshot to compare with, ``tiny`` loaded first if a failed row took it down."""
    if "tiny" not in Snapshot.of(c.router).pids:
        assert c.http.post("/load", json={"model_name": "tiny"}).status_code == 200
    before = Snapshot.of(c.router)
    assert before.pids.get("tiny") is not None
    return before


@pytest.mark.parametrize("case", ROWS)
def test_a_bad_request_gets_one_clear_line_and_leaks_nothing(ctx: Ctx, case: Row) -> None:
    before = ready(ctx)
    answer = case.send(ctx)
    text = message(answer.body)
    try:
        assert answer.status == case.status, f"{answer.status}: {answer.body[:300]!r}"
        assert case.fragment in text, text
        assert text and "\n" not in text, f"not one line: {text!r}"
        if case.code is not None:
            error = json.loads(answer.body)["error"]
            assert error["code"] == case.code and error["type"] == case.code, error
            assert {"message", "type", "param", "code"} <= error.keys(), error
    finally:
        assert_unchanged(ctx, before)


def test_the_table_is_big_enough() -> None:
    assert len(ROWS) >= 30 and len({p.id for p in ROWS}) == len(ROWS)


# ----------------------------------------------------------------- clients that misbehave mid-stream

def test_a_client_gone_mid_stream_leaks_nothing(ctx: Ctx) -> None:
    before = ready(ctx)
    for path, body in (("/completions", {"prompt": "x"}), ("/chat/completions", {"messages": CHAT})):
        with ctx.http.stream("POST", path, json={"model": "tiny", "max_tokens": 200, "stream": True,
                                                 "ignore_eos": True, **body}) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data:")
    assert_unchanged(ctx, before)
    ok = ctx.http.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"]
    assert_unchanged(ctx, before)


def test_a_client_gone_mid_body_leaks_nothing(ctx: Ctx) -> None:
    before = ready(ctx)
    for path in ("/load", "/chat/completions"):
        answer = raw_post(path, b'{"model', length=100, shut_write=True)(ctx)
        assert answer.status in (0, 400), answer  # no one is left to read an answer
    assert_unchanged(ctx, before)


def test_a_client_that_never_reads_does_not_block_others_and_leaks_nothing(ctx: Ctx) -> None:
    before = ready(ctx)
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 100000, "ignore_eos": True,
                       "n_probs": 100, "stream": True}).encode()  # megabytes: more than buffers hold
    request = (b"POST /api/v1/completions HTTP/1.1\r\nHost: " + ctx.host +
               b"\r\nContent-Type: application/json\r\nContent-Length: " +
               str(len(body)).encode() + b"\r\n\r\n" + body)
    parts = urlsplit(ctx.url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((parts.hostname, parts.port))
        sock.sendall(request)
        time.sleep(1.0)  # it streams into buffers nobody reads
        assert ctx.http.get("/health").status_code == 200
        other = ctx.http.post("/completions", json={"model": "tiny", "prompt": "y", "max_tokens": 2})
        assert other.status_code == 200 and other.json()["choices"]
        in_flight = {s.name: s.requests_in_flight for s in ctx.router.status()}
        assert in_flight["tiny"] == 1, "the stream nobody reads should still be held up"
    finally:
        sock.close()
    assert_unchanged(ctx, before, seconds=10.0)
