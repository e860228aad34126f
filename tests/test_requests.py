"""The one error boundary: every failure of the HTTP exchange becomes a LemonError."""

from __future__ import annotations

import json

import httpx
import pytest

from lemon_magic import BackendCrashed, InferenceError, LemonError, RequestTimeout
from lemon_magic._requests import MAPPINGS, TRANSLATED, ResponseReader, StreamCut, translate

REQ = httpx.Request("POST", "http://127.0.0.1:1/v1/completions")

CASES = [  # (exception, backend exit code, expected class, text in the message)
    (httpx.ReadTimeout("timed out", request=REQ), None, RequestTimeout, "within 2 s (request_timeout)"),
    (TimeoutError(), None, RequestTimeout, "within 2 s (request_timeout)"),
    (httpx.ConnectTimeout("x", request=REQ), None, RequestTimeout, "gave no answer"),
    (httpx.RemoteProtocolError("peer closed", request=REQ), None, InferenceError,
     "failed: RemoteProtocolError: peer closed"),
    (httpx.RemoteProtocolError("peer closed", request=REQ), -9, BackendCrashed, "killed by SIGKILL"),
    (httpx.ReadError("reset", request=REQ), 1, BackendCrashed, "exit code 1"),
    (httpx.ConnectError("refused", request=REQ), None, InferenceError, "ConnectError: refused"),
    (StreamCut("cut"), None, InferenceError, "ended its stream early"),
    (StreamCut("cut"), -11, BackendCrashed, "SIGSEGV"),
    (json.JSONDecodeError("Expecting value", "<html>", 0), None, InferenceError, "not valid JSON"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid"), None, InferenceError, "not valid JSON"),
    (ConnectionResetError(104, "reset"), None, InferenceError, "ConnectionResetError"),
    (httpx.DecodingError("bad gzip", request=REQ), None, InferenceError, "DecodingError"),
    (httpx.StreamClosed(), None, InferenceError, "StreamClosed"),
]


@pytest.mark.parametrize(("exc", "code", "cls", "text"), CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_each_failure_maps_to_its_error(exc: BaseException, code: int | None,
                                        cls: type[LemonError], text: str) -> None:
    assert isinstance(exc, TRANSLATED)
    error = translate(exc, "m", returncode=code, timeout="2 s (request_timeout)")
    assert type(error) is cls and text in error.message and "\n" not in error.message


def test_a_backend_the_router_stopped_is_not_reported_as_a_crash() -> None:
    cut = httpx.RemoteProtocolError("peer closed", request=REQ)
    error = translate(cut, "m", returncode=-15, stopped_on_purpose=True)
    assert type(error) is InferenceError and "was stopped (unloaded, evicted or reloaded)" in error.message
    late = translate(httpx.ReadTimeout("t", request=REQ), "m", stopped_on_purpose=True, timeout="1 s (x)")
    assert type(late) is RequestTimeout  # a deadline stays a deadline


def _all_subclasses(cls: type) -> set[type]:
    return {cls} | {s for c in cls.__subclasses__() for s in _all_subclasses(c)}


@pytest.mark.parametrize("cls", sorted(_all_subclasses(httpx.HTTPError) | _all_subclasses(httpx.StreamError),
                                       key=lambda c: c.__name__))
def test_no_httpx_exception_escapes_the_boundary(cls: type[BaseException]) -> None:
    assert issubclass(cls, TRANSLATED), f"{cls.__name__} would escape as itself"


def test_the_documented_table_names_every_target() -> None:
    targets = " ".join(target for _, target in MAPPINGS)
    for name in ("BackendCrashed", "RequestTimeout", "InferenceError"):
        assert name in targets


def test_the_reader_checks_status_and_parses_the_stream() -> None:
    reader = ResponseReader("m", "/v1/chat/completions", stream=True)
    with pytest.raises(InferenceError, match=r"answered HTTP 500: boom") as info:
        reader.check_status(500, b'{"error": {"message": "boom"}}')
    assert info.value.status == 500  # kept for an HTTP server to pass on
    pieces = [reader.feed_line(line) for line in (
        ": keep-alive", 'data: {"choices": [{"delta": {"content": "Hi"}}]}', "",
        'data: {"choices": [{"delta": {"content": " there"}, "finish_reason": "stop"}]}')]
    assert pieces == [None, "Hi", None, " there"] and not reader.done
    with pytest.raises(StreamCut):
        reader.finish()
    reader.feed_line("data: [DONE]")
    reader.finish()
    assert reader.done and reader.finish_reason == "stop"
    with pytest.raises(ValueError):
        ResponseReader("m", "/v1/completions", stream=False).feed_body(b"[1, 2]")
    for odd in (b'{"choices": ["x"]}', b'{"choices": [{"message": "x"}]}',
                b'{"choices": [{"message": {"content": 3}}]}', b'{"choices": 7}'):
        with pytest.raises(ValueError):  # translated at the boundary like bad JSON
            ResponseReader("m", "/v1/chat/completions", stream=False).feed_body(odd)
