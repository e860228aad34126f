"""The remote client (``lemon_magic._remote`` and ``_remote_client``) without a remote server:
parsing, the #1603 comparison, the error boundary, and calls bounded against sockets that never
answer or drip (no HTTP is mocked)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import pytest

from lemon_magic._remote import RemoteEntry, lemonade_load_body, parse_remote, remote_action
from lemon_magic._remote_client import MAPPINGS, RemoteClient, remote_error
from lemon_magic.errors import (
    InvalidOptions,
    LemonError,
    LoadError,
    RemoteAuthError,
    RemoteUnreachable,
)
from lemon_magic.options import LoadOptions
from tests.remotes import KEY_ENV, run

# ------------------------------------------------------------------ parsing (no server)


def test_parse_remote_accepts_both_lemonade_spellings_and_openai() -> None:
    for url in ("http://gpu-box:13305", "http://gpu-box:13305/", "http://gpu-box:13305/api/v1"):
        spec = parse_remote(url, "Qwen3-8B-GGUF", "lemonade")
        assert spec.root == "http://gpu-box:13305"
        assert spec.base_url == "http://gpu-box:13305/api/v1"
    spec = parse_remote("https://vllm-box:8000/v1", "Qwen/Qwen3-8B", "openai", "GPU_BOX_KEY")
    assert spec.base_url == "https://vllm-box:8000/v1"
    assert spec.api_key_env == "GPU_BOX_KEY"


@pytest.mark.parametrize(("args", "says"), [
    (("ftp://box:1", "m"), "must start with http:// or https://"),
    (("box:13305", "m"), "must start with http://"),
    (("http://:13305", "m"), "has no host"),
    (("http://u:pw@box:1", "m"), "must not carry credentials"),
    (("http://box:1?x=1", "m"), "query"),
    (("http://box:notaport", "m"), "is not valid"),
    (("http://box:1", ""), "needs --remote-model"),
    (("http://box:1", None), "needs --remote-model"),
    (("http://box:1", "m", "ollama"), "api must be one of lemonade, openai"),
    (("http://box:1/v1", "m", "openai", "not a name"), "name of an environment variable"),
    (("http://box:1", "m", "openai"), "did you mean http://box:1/v1?"),
    (("http://box:1", "m", "lemonade", "LEMONADE_API_KEY"), "this machine's own server"),
])
def test_parse_remote_refuses_with_one_line(args: tuple[Any, ...], says: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        parse_remote(*args)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert "pw" not in str(info.value)


def test_remote_action_compares_against_what_the_remote_reports() -> None:
    ready = RemoteEntry(loaded=True, listed=True, pid=7, ctx_size=2048, llamacpp_args=("--no-warmup",),
                        llamacpp_backend="cpu")
    assert remote_action(None, LoadOptions()) == "load"
    assert remote_action(RemoteEntry(loaded=False), LoadOptions(ctx_size=2048)) == "load"
    assert remote_action(ready, LoadOptions()) == "noop"  # unset options are the remote's to choose
    assert remote_action(ready, LoadOptions(ctx_size=2048)) == "noop"
    assert remote_action(ready, LoadOptions(ctx_size=2048, extra_args=("--no-warmup",),
                                            backend="cpu")) == "noop"
    assert remote_action(ready, LoadOptions(ctx_size=4096)) == "reload"
    assert remote_action(ready, LoadOptions(extra_args=())) == "reload"
    assert remote_action(ready, LoadOptions(backend="vulkan")) == "reload"
    # an option the remote does not report cannot be confirmed: its declarative /load decides
    assert remote_action(RemoteEntry(loaded=True), LoadOptions(ctx_size=2048)) == "reload"


def test_lemonade_load_body_maps_options_and_refuses_what_it_cannot_apply() -> None:
    body = lemonade_load_body("m", LoadOptions(ctx_size=8192, extra_args=("--no-mmap", "-b", "64"),
                                               backend="vulkan"))
    assert body == {"model_name": "m", "ctx_size": 8192, "llamacpp_args": "--no-mmap -b 64",
                    "llamacpp_backend": "vulkan"}
    assert lemonade_load_body("m", LoadOptions()) == {"model_name": "m"}
    for bad, says in ((LoadOptions(threads=2, chat_template="gemma"), "threads, chat_template"),
                      (LoadOptions(backend="llama-server"), "llama.cpp device")):
        with pytest.raises(InvalidOptions, match=says) as info:
            lemonade_load_body("m", bad)
        assert "\n" not in str(info.value)


def _httpx_errors() -> list[type[httpx.HTTPError]]:
    def below(cls: type[httpx.HTTPError]) -> set[type[httpx.HTTPError]]:
        return {cls} | {s for c in cls.__subclasses__() for s in below(c)}
    return sorted(below(httpx.HTTPError), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _httpx_errors())
@pytest.mark.parametrize("during", ["call", "load", "inference"])
def test_no_httpx_error_escapes_the_remote_boundary(cls: type[httpx.HTTPError], during: str) -> None:
    """Every httpx failure, in every phase, becomes a one-line LemonError (``MAPPINGS``)."""
    spec = parse_remote("http://box:13305", "m", api_key_env=KEY_ENV)
    request = httpx.Request("GET", "http://box:13305/api/v1/health")
    if issubclass(cls, httpx.HTTPStatusError):
        for status in (401, 403, 400, 404, 500, 503):
            response = httpx.Response(status, json={"error": {"message": "boom\nsecond line"}},
                                      request=request)
            error = remote_error(cls("x", request=request, response=response), spec, during=during)
            assert isinstance(error, LemonError) and "\n" not in error.message
            assert isinstance(error, RemoteAuthError) == (status in (401, 403))
            if during == "load" and status >= 500:
                assert type(error) is LoadError and error.message.endswith(f"HTTP {status}: boom")
        return
    exc = cls("x", request=request) if issubclass(cls, httpx.RequestError) else cls("x")
    error = remote_error(exc, spec, during=during)
    assert isinstance(error, LemonError) and "\n" not in error.message
    if isinstance(exc, httpx.ConnectError):
        assert isinstance(error, RemoteUnreachable)


def test_the_remote_mapping_table_names_every_target() -> None:
    targets = " ".join(target for _, target in MAPPINGS)
    for name in ("RemoteAuthError", "LoadError", "InvalidOptions", "InferenceError", "RemoteError",
                 "RemoteUnreachable", "RequestTimeout"):
        assert name in targets


def _health_gives_up_within(url: str, seconds: float) -> None:
    """A ``health()`` with a 1 s timeout against ``url`` fails as unreachable within ``seconds``."""
    async def go() -> None:
        async with RemoteClient(parse_remote(url, "m"), timeout=1.0) as c:
            start = time.monotonic()
            with pytest.raises(RemoteUnreachable, match="no answer in time"):
                await c.health()
            assert time.monotonic() - start < seconds

    run(go)


def test_a_remote_that_never_answers_is_bounded() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        _health_gives_up_within(url, 3)


def test_a_remote_that_drips_its_answer_is_bounded_in_total() -> None:
    """Each byte comes within the read timeout, the whole answer never does: the call still ends."""
    stop = threading.Event()
    with socket.socket() as drip:
        drip.bind(("127.0.0.1", 0))
        drip.listen(8)

        def serve() -> None:
            conn, _ = drip.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n")
                while not stop.wait(0.2):
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        return

        thread = threading.Thread(target=serve, name="drip", daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{drip.getsockname()[1]}"

        try:
            _health_gives_up_within(url, 2)
        finally:
            stop.set()
            thread.join(5)


def test_load_control_on_an_openai_remote_is_misuse() -> None:
    async def go() -> None:
        async with RemoteClient(parse_remote("http://127.0.0.1:9/v1", "m", "openai")) as c:
            for call in (c.load(LoadOptions()), c.unload()):
                with pytest.raises(RuntimeError, match="needs a lemonade remote"):
                    await call

    run(go)
