"""The HTTP API over a real socket, with real clients (``openai``, ``httpx``, raw sockets),
on real llama.cpp backends: the same load contract as the Python API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import (
    BackendCrashed,
    BackendExited,
    BackendUnavailable,
    HealthCheckTimeout,
    InferenceError,
    InvalidModelFile,
    InvalidOptions,
    LemonError,
    LoadCancelled,
    ModelNotFound,
    ModelNotLoaded,
    ModelState,
    NotEnoughMemory,
    RequestTimeout,
    Router,
    SlotsFull,
    WaitTimeout,
    get_router,
)
from lemon_magic.registry import Registry
from lemon_magic.server.app import error_response
from tests.conftest import alive, wait_no_backends

pytestmark = pytest.mark.real
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


def _raw(url: str, request: bytes, *, shut_write: bool = False) -> bytes:
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


# ----------------------------------------------------------------- the openai SDK as client

def test_openai_chat_and_completions_streamed_and_not(served: Served) -> None:
    client = served.openai()
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content and chat.model == "tiny"
    assert chat.usage is not None and chat.usage.completion_tokens == 4
    comp = client.completions.create(model="tiny", prompt="once upon", max_tokens=4, temperature=0)
    assert comp.choices[0].text and comp.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4,  # type: ignore[arg-type]
                                                  temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    parts = list(client.completions.create(model="tiny", prompt="once upon", max_tokens=4,
                                           temperature=0, stream=True))
    assert len(parts) >= 2 and parts[-1].choices[0].finish_reason == "length"
    assert served.router.spawn_count == 1
    [status] = served.router.status()
    assert status.requests_in_flight == 0


def test_openai_on_the_embedded_gemma(served: Served) -> None:
    client = served.openai()
    parts = list(client.completions.create(model="gemma3-270m", prompt="The capital of France is",
                                           max_tokens=8, temperature=0, stream=True))
    text = "".join(p.choices[0].text for p in parts)
    assert text.strip() and parts[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="gemma3-270m", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert chat.choices[0].message.content is not None


def test_openai_models_list_and_unknown_model(served: Served) -> None:
    client = served.openai()
    ids = {m.id for m in client.models.list()}
    assert {"tiny", "tiny-b", "gemma3-270m"} <= ids
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        list(client.completions.create(model="no-such-model", prompt="x", stream=True))
    assert served.router.spawn_count == 0


# ----------------------------------------------------------------- load and unload over HTTP

def test_load_noop_keeps_the_pid_and_reload_changes_it(served: Served) -> None:
    http = served.http
    first = http.post("/load", json={"model_name": "tiny", "ctx_size": 256}).json()
    assert first["status"] == "success" and first["action"] == "loaded" and first["model_name"] == "tiny"
    again = http.post("/load", json={"model_name": "tiny", "ctx_size": 256}).json()
    assert again["action"] == "noop" and again["pid"] == first["pid"]
    assert served.router.spawn_count == 1
    bigger = http.post("/load", json={"model_name": "tiny", "ctx_size": 512}).json()
    assert bigger["action"] == "reloaded" and bigger["pid"] != first["pid"]
    assert not alive(first["pid"]) and alive(bigger["pid"])
    [entry] = http.get("/health").json()["all_models_loaded"]
    assert entry["pid"] == bigger["pid"] and entry["recipe_options"]["ctx_size"] == 512


def test_inference_auto_loads_with_ctx_size_and_never_reloads(served: Served) -> None:
    http = served.http
    r = http.post("/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 2,
                                             "ctx_size": 512, "temperature": 0.5})
    assert r.status_code == 200
    pid = served.pid("tiny")
    [entry] = http.get("/health").json()["all_models_loaded"]
    assert entry["recipe_options"]["ctx_size"] == 512 and "temperature" not in entry["recipe_options"]
    r = http.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "ctx_size": 1024})
    assert r.status_code == 200 and served.pid("tiny") == pid  # auto-load never reloads
    load = http.post("/load", json={"model_name": "tiny", "ctx_size": 512}).json()
    assert load["action"] == "noop" and load["pid"] == pid  # Lemonade's test_012c, by pid


def test_saved_options_are_what_a_bare_load_uses_until_forgotten(served: Served) -> None:
    http = served.http
    saved = http.post("/load", json={"model_name": "tiny", "ctx_size": 512, "save_options": True,
                                     "llamacpp_args": "-b 64"})
    assert saved.status_code == 200 and saved.json()["action"] == "loaded", saved.text
    shown = http.get("/models/tiny").json()["recipe_options"]
    assert shown["ctx_size"] == 512 and shown["llamacpp_args"] == "-b 64"
    assert http.post("/load", json={"model_name": "tiny"}).json()["action"] == "noop"
    http.post("/unload", json={"model_name": "tiny"})
    bare = http.post("/load", json={"model_name": "tiny"}).json()
    assert bare["action"] == "loaded"
    [entry] = http.get("/health").json()["all_models_loaded"]
    assert entry["recipe_options"]["ctx_size"] == 512 and entry["recipe_options"]["llamacpp_args"] == "-b 64"
    # a key sent "empty" forgets what was saved; a key left out keeps it
    r = http.post("/load", json={"model_name": "tiny", "ctx_size": -1, "save_options": True})
    assert r.json()["action"] == "reloaded"
    shown = http.get("/models/tiny").json()["recipe_options"]
    assert "ctx_size" not in shown and shown["llamacpp_args"] == "-b 64"


def test_save_options_refuses_the_builtin_model_and_a_non_boolean(served: Served) -> None:
    r = served.http.post("/load", json={"model_name": "gemma3-270m", "ctx_size": 512, "save_options": True})
    assert r.status_code == 400 and "built in" in r.json()["error"]["message"]
    r = served.http.post("/load", json={"model_name": "tiny", "save_options": "yes"})
    assert r.status_code == 400 and "save_options" in r.text
    r = served.http.post("/load", json={"model_name": "tiny", "save_options": True,
                                        "llamacpp_args": "--log-file /tmp/x"})
    assert r.status_code == 400 and served.http.get("/models/tiny").json()["recipe_options"] == {}
    assert served.router.spawn_count == 0


def test_1603_an_auto_load_after_unload_uses_saved_options_so_a_bare_load_is_a_noop(
        served: Served) -> None:
    http = served.http
    assert http.post("/load", json={"model_name": "tiny", "ctx_size": 256}).status_code == 200
    http.post("/unload", json={"model_name": "tiny"})
    r = http.post("/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200
    pid = served.pid("tiny")
    [entry] = http.get("/health").json()["all_models_loaded"]
    assert entry["recipe_options"]["ctx_size"] != 256  # not the last explicit load's options
    load = http.post("/load", json={"model_name": "tiny"}).json()
    assert load["action"] == "noop" and load["pid"] == pid


def test_health_says_which_command_runs_and_whether_a_stream_is_being_sent(served: Served) -> None:
    http = served.http
    health = http.get("/health").json()
    assert health["telemetry"] == {"enabled": False}
    http.post("/load", json={"model_name": "tiny"})
    [entry] = http.get("/health").json()["all_models_loaded"]
    assert entry["is_streaming"] is False
    command = entry["launch_command"]
    assert len(command) > 1 and Path(command[0]).name.startswith("llama")
    assert entry["checkpoint"] in command
    with http.stream("POST", "/chat/completions", json={"model": "tiny", "messages": CHAT, "stream": True,
                                                        "max_tokens": 400, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        [entry] = http.get("/health").json()["all_models_loaded"]
        assert entry["is_streaming"] is True and entry["is_busy"] is True
        assert "data: [DONE]" in list(lines)
    [entry] = http.get("/health").json()["all_models_loaded"]
    assert entry["is_streaming"] is False and entry["is_busy"] is False


def test_live_answers_at_the_root(served: Served) -> None:
    root = served.url.removesuffix("/api/v1")
    r = served.http.get(root + "/live")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert served.http.head(root + "/live").status_code == 200


def test_health_lists_the_loaded_model(served: Served) -> None:
    http = served.http
    assert http.get("/health").json()["model_loaded"] is None
    load = http.post("/load", json={"model_name": "user.tiny"}).json()
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model_loaded"] == "tiny"
    assert health["max_models"]["llm"] == 1
    [entry] = health["all_models_loaded"]
    assert entry["model_name"] == "tiny" and entry["pid"] == load["pid"]
    assert entry["checkpoint"].endswith("tiny-a.gguf") and entry["type"] == "llm"
    assert entry["recipe"] == "llamacpp" and entry["device"] == "cpu" and entry["is_busy"] is False
    assert httpx.get(entry["backend_url"] + "/models", timeout=10, trust_env=False).status_code == 200
    assert http.head("/health").status_code == 200


def test_unload_one_then_all(served: Served) -> None:
    http = served.http
    a = http.post("/load", json={"model_name": "tiny"}).json()
    r = http.post("/unload", json={"model_name": "tiny"})
    assert r.status_code == 200 and r.json()["model_name"] == "tiny" and not alive(a["pid"])
    r = http.post("/unload", json={"model_name": "tiny"})
    assert r.status_code == 404 and r.json() == {"error": "Model not loaded: tiny"}
    assert http.post("/unload", json={"model_name": "no-such"}).status_code == 404
    b = http.post("/load", json={"model_name": "tiny-b"}).json()
    r = http.post("/unload")
    assert r.status_code == 200 and r.json()["message"] == "All models unloaded successfully"
    assert not alive(b["pid"]) and http.get("/health").json()["all_models_loaded"] == []


def test_1603_concurrent_loads_of_a_cold_model_spawn_once(served: Served) -> None:
    n = 8
    barrier = threading.Barrier(n)

    def load(_: int) -> httpx.Response:
        with httpx.Client(base_url=served.url, timeout=60, trust_env=False) as http:
            barrier.wait()
            return http.post("/load", json={"model_name": "tiny", "ctx_size": 256})

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(load, range(n)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.json()["pid"] for r in answers}) == 1
    assert served.router.spawn_count == 1
    assert served.http.post("/load", json={"model_name": "tiny", "ctx_size": 256}).json()["action"] == "noop"


# ----------------------------------------------------------------- bad requests

@pytest.mark.parametrize(("path", "kwargs", "status", "needle"), [
    ("/load", {"content": b""}, 400, "empty"),
    ("/load", {"content": b"{bad"}, 400, "Invalid JSON"),
    ("/load", {"content": b"\xff\xfe"}, 400, "Invalid JSON"),
    ("/load", {"json": [1, 2]}, 400, "JSON object"),
    ("/load", {"json": {}}, 400, "model_name"),
    ("/load", {"json": {"model_name": 7}}, 400, "model_name"),
    ("/load", {"json": {"model_name": "tiny", "ctx_size": -5}}, 400, "ctx_size"),
    ("/load", {"json": {"model_name": "tiny", "ctx_size": "big"}}, 400, "ctx_size"),
    ("/load", {"json": {"model_name": "tiny", "llamacpp_args": "--foo; rm"}}, 400, "shell"),
    ("/load", {"json": {"model_name": "tiny", "llamacpp_backend": "rocm"}}, 400, "rocm"),
    ("/load", {"json": {"model_name": "no-such"}}, 404, "model_not_found"),
    ("/load", {"json": {"model_name": "/etc/passwd"}}, 404, "model_not_found"),
    ("/chat/completions", {"json": {"model": "tiny", "messages": []}}, 400, "message"),
    ("/chat/completions", {"json": {"model": "tiny", "messages": CHAT, "stream": "yes"}}, 400, "stream"),
    ("/chat/completions", {"json": {"messages": CHAT}}, 400, "No model loaded"),
    ("/completions", {"json": {"model": "tiny", "prompt": " "}}, 400, "prompt"),
    ("/completions", {"json": {"model": ["tiny"], "prompt": "x"}}, 404, "model_not_found"),
    ("/completions", {"content": b"null"}, 400, "JSON object"),
])
def test_bad_bodies_get_a_clear_error_and_load_nothing(served: Served, path: str, kwargs: dict[str, object],
                                                       status: int, needle: str) -> None:
    r = served.http.post(path, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert needle in r.text
    assert served.router.spawn_count == 0 and served.http.get("/health").status_code == 200


@pytest.mark.parametrize("args", [
    "--log-file /tmp/x.log", "--slot-save-path /tmp", "--lora /tmp/a.gguf", "--model-url http://x",
    "-hf a/b", "--chat-template-file /etc/passwd", "--tools=exec_shell_command", "--rpc 1.2.3.4:5",
    "--api-key-file /etc/shadow", "--media-path /", "--path /", "--mmproj /tmp/p.gguf",
    "--control-vector /tmp/v", "--grammar-file /etc/passwd", "--log-prompts-dir /tmp",
])
def test_backend_flags_that_touch_files_or_the_network_are_refused(served: Served, args: str) -> None:
    r = served.http.post("/load", json={"model_name": "tiny", "llamacpp_args": args})
    assert r.status_code == 400 and "may not set" in r.text, r.text
    assert served.router.spawn_count == 0


@pytest.mark.parametrize("args", ["-m /etc/passwd", "--port 1", "--host 0.0.0.0", "--model-url=http://x"])
def test_reserved_flags_stay_reserved_even_with_the_opt_in(served: Served, args: str) -> None:
    url = served.router.serve(port=0, allow_any_args=True)
    r = httpx.post(url + "/load", json={"model_name": "tiny", "llamacpp_args": args}, trust_env=False)
    assert r.status_code == 400 and "may not set" in r.text
    assert served.router.spawn_count == 0


def test_tuning_flags_pass_and_the_opt_in_lets_others_through(served: Served, tmp_path: Path) -> None:
    r = served.http.post("/load", json={"model_name": "tiny", "llamacpp_args": "--seed -1 -b 64"})
    assert r.status_code == 200, r.text
    assert r.json()["pid"] and served.router.status()[0].options.extra_args == ("--seed", "-1", "-b", "64")  # type: ignore[union-attr]
    log = tmp_path / "backend.log"
    url = served.router.serve(port=0, allow_any_args=True)
    r = httpx.post(url + "/load", json={"model_name": "tiny", "llamacpp_args": f"--log-file {log}"},
                   timeout=60, trust_env=False)
    assert r.status_code == 200 and r.json()["action"] == "reloaded"


def test_a_huge_body_is_refused_unread(served: Served) -> None:
    from lemon_magic.server.app import MAX_BODY

    r = served.http.post("/load", content=b"x" * (MAX_BODY + 1))
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert served.http.get("/health").status_code == 200


def test_wrong_method_is_405_and_unknown_path_is_404(served: Served) -> None:
    for prefix in ("/api/v0", "/api/v1", "/v0", "/v1"):
        root = served.url.removesuffix("/api/v1") + prefix
        for route in ("load", "unload", "chat/completions", "completions"):
            r = served.http.get(f"{root}/{route}")
            assert r.status_code == 405 and r.json() == {
                "error": "Method Not Allowed. Use POST for this endpoint"}
            assert served.http.head(f"{root}/{route}").status_code == 405
        assert served.http.get(f"{root}/health").json()["status"] == "ok"
    r = served.http.get("/nonexistent")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_models_lists_present_files_and_show_all_everything(served: Served, tiny_model: str,
                                                            tmp_path: Path) -> None:
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(Path(tiny_model).read_bytes())
    served.router.register("gone", gone)
    gone.unlink()
    ids = {m["id"] for m in served.http.get("/models").json()["data"]}
    assert "tiny" in ids and "gone" not in ids
    every = {m["id"]: m for m in served.http.get("/models", params={"show_all": "true"}).json()["data"]}
    assert every["gone"]["downloaded"] is False
    assert served.http.get("/models/user.tiny").json()["id"] == "tiny"
    assert served.http.get("/models/tiny:latest").json()["id"] == "tiny"
    served.router.unregister("gone")


def test_malformed_raw_requests_get_400_and_the_server_keeps_serving(served: Served) -> None:
    host = urlsplit(served.url).netloc.encode()
    bad_json = b'{"model_name": "tiny"'
    answer = _raw(served.url, b"POST /api/v1/load HTTP/1.1\r\nHost: " + host +
                  b"\r\nContent-Type: application/json\r\nContent-Length: " +
                  str(len(bad_json)).encode() + b"\r\n\r\n" + bad_json)
    assert answer.startswith(b"HTTP/1.1 400") and b"Invalid JSON" in answer
    truncated = _raw(served.url, b"POST /api/v1/load HTTP/1.1\r\nHost: " + host +
                     b"\r\nContent-Length: 100\r\n\r\n{\"model_name\"", shut_write=True)
    assert truncated == b"" or truncated.startswith(b"HTTP/1.1 400")
    garbage = _raw(served.url, b"NOT HTTP AT ALL\r\n\r\n", shut_write=True)
    assert garbage == b"" or garbage.startswith(b"HTTP/1.1 400")
    assert served.http.get("/health").status_code == 200
    assert served.router.spawn_count == 0


def test_a_client_gone_mid_stream_releases_the_model(served: Served) -> None:
    with served.http.stream("POST", "/completions", json={"model": "tiny", "prompt": "x",
                                                          "max_tokens": 200, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    served.http.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    [status] = served.router.status()
    assert status.requests_in_flight == 0 and status.state is ModelState.READY


# ----------------------------------------------------------------- lifetime

def test_stop_serving_closes_the_socket_and_keeps_the_router(served: Served) -> None:
    load = served.http.post("/load", json={"model_name": "tiny"}).json()
    parts = urlsplit(served.url)
    assert served.router.base_url == served.url
    assert served.router.stop_serving() is True
    assert served.router.base_url is None and served.router.stop_serving() is False
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.url + "/health", timeout=5, trust_env=False)
    assert served.pid("tiny") == load["pid"] and alive(load["pid"])
    again = served.router.serve(port=0)
    assert again != served.url or parts.port is not None
    r = httpx.post(again + "/load", json={"model_name": "tiny"}, timeout=30, trust_env=False)
    assert r.json()["action"] == "noop" and r.json()["pid"] == load["pid"]
    served.router.stop_serving()


def test_lemon_serve_magic_serves_the_kernels_router_and_stops(
        ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("lemon_serve", "--port 0")
    line = capsys.readouterr().out.strip()
    url = get_router().base_url
    assert url is not None and line.startswith(f"serving {url}")
    assert httpx.get(url + "/health", trust_env=False).json()["status"] == "ok"
    ip.run_line_magic("lemon_serve", "--stop")
    assert capsys.readouterr().out.startswith(f"stopped serving {url}")
    assert get_router().base_url is None
    ip.run_line_magic("lemon_serve", "--stop")
    assert capsys.readouterr().out.strip() == "not serving"


def test_stop_serving_during_a_stream_is_bounded_and_releases_the_model(served: Served) -> None:
    with served.http.stream("POST", "/completions", json={"model": "tiny", "prompt": "x",
                                                          "max_tokens": 100000, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        began = time.monotonic()
        served.router.stop_serving()  # graceful: the stream may finish, for 5 s at most
        assert time.monotonic() - began < 8
        with contextlib.suppress(httpx.HTTPError):
            list(lines)
    [status] = served.router.status()
    assert status.requests_in_flight == 0 and status.state is ModelState.READY


def test_closing_the_router_stops_serving_and_every_backend(make_router: Callable[..., Router],
                                                            tiny_model: str) -> None:
    router = make_router()
    router.register("tiny", tiny_model)
    url = router.serve(port=0)
    load = httpx.post(url + "/load", json={"model_name": "tiny"}, timeout=60, trust_env=False).json()
    router.close()
    Registry().unregister("tiny")
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5, trust_env=False)
    assert not alive(load["pid"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serves_and_a_signal_unloads_everything(tiny_model: str, tmp_path: Path,
                                                    signum: signal.Signals) -> None:
    Registry().register("tiny", tiny_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "lemon_magic", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/api/v1" in line, line
        url = f"http://127.0.0.1:{port}/api/v1"
        load = httpx.post(url + "/load", json={"model_name": "tiny", "ctx_size": 256}, timeout=60,
                          trust_env=False).json()
        assert load["action"] == "loaded" and alive(load["pid"])
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
        assert not alive(load["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        Registry().unregister("tiny")
    wait_no_backends()


# ----------------------------------------------------------------- who may call

def test_a_foreign_host_header_is_refused(served: Served) -> None:
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 sends its own Host."""
    port = urlsplit(served.url).port
    r = served.http.get("/health", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]
    r = served.http.post("/load", json={"model_name": "tiny"}, headers={"Host": "evil.example"})
    assert r.status_code == 403 and served.router.spawn_count == 0
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert served.http.get("/health", headers={"Host": host}).status_code == 200


def test_cross_origin_requests_are_refused_unless_allowed(served: Served) -> None:
    port = urlsplit(served.url).port
    r = served.http.post("/load", json={"model_name": "tiny"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json() == {"error": "Origin not allowed"}
    assert r.headers["vary"] == "Origin" and served.router.spawn_count == 0
    own = f"http://127.0.0.1:{port}"
    r = served.http.get("/health", headers={"Origin": own})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == own
    r = served.http.options("/load", headers={"Origin": own, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and "POST" in r.headers["access-control-allow-methods"]
    assert "Authorization" in r.headers["access-control-allow-headers"]
    url = served.router.serve(port=0, allowed_origins=["http://localhost:8888"])
    r = httpx.get(url + "/health", headers={"Origin": "http://localhost:8888"}, trust_env=False)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:8888"
    r = httpx.get(url + "/health", headers={"Origin": "http://localhost:9999"}, trust_env=False)
    assert r.status_code == 403


def test_an_api_key_is_required_when_set_and_for_other_hosts(served: Served) -> None:
    with pytest.raises(InvalidOptions, match="API key"):
        served.router.serve("0.0.0.0", port=0)
    assert served.router.base_url == served.url  # nothing changed
    url = served.router.serve("0.0.0.0", port=0, api_key="s3cret")
    local = url.replace("0.0.0.0", "127.0.0.1")
    assert httpx.get(local + "/health", trust_env=False).status_code == 401
    r = httpx.get(local + "/health", headers={"Authorization": "Bearer wrong"}, trust_env=False)
    assert r.status_code == 401 and r.json() == {"error": "Invalid or missing API key"}
    client = openai.OpenAI(base_url=local, api_key="s3cret", max_retries=0, timeout=60)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=local, api_key="nope", max_retries=0).models.list()
    assert httpx.options(local + "/load", trust_env=False).status_code == 204  # preflights carry no key


def test_cli_refuses_a_public_host_without_a_key() -> None:
    done = subprocess.run([sys.executable, "-m", "lemon_magic", "serve", "--host", "0.0.0.0",
                           "--port", "0"], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items()
                                  if k not in ("LEMON_MAGIC_API_KEY", "LEMONADE_API_KEY")},
                               "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 1 and "API key" in done.stderr


def test_load_errors_keep_lemonades_codes(served: Served) -> None:
    http = served.http
    r = http.post("/load", json={"model_name": "tiny", "llamacpp_args": "--numa bogus"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_error"
    assert "Failed to load model 'tiny'" in r.json()["error"]["message"]
    assert http.post("/load", json={"model_name": "tiny", "pinned": True}).status_code == 200
    r = http.post("/load", json={"model_name": "tiny-b"})  # one llm slot, held by a pinned model
    assert r.status_code == 409 and r.json()["error"]["code"] == "slots_pinned_error"
    r = http.post("/chat/completions", json={"model": "tiny-b", "messages": CHAT})
    assert r.status_code == 409
    assert http.post("/unload", json={"model_name": ""}).status_code == 404  # not "unload all"
    assert [e["model_name"] for e in http.get("/health").json()["all_models_loaded"]] == ["tiny"]


def test_health_recipe_options_replay_as_a_noop_load(served: Served) -> None:
    first = served.http.post("/load", json={"model_name": "tiny", "ctx_size": 512,
                                            "llamacpp_args": "-b 64"}).json()
    [entry] = served.http.get("/health").json()["all_models_loaded"]
    again = served.http.post("/load", json={"model_name": "tiny", **entry["recipe_options"]}).json()
    assert again["action"] == "noop" and again["pid"] == first["pid"]


@pytest.mark.parametrize(("error", "status", "code"), [
    (ModelNotFound("m"), 404, "model_not_found"),
    (InvalidOptions("bad"), 400, "invalid_request_error"),
    (SlotsFull("full", model="m"), 409, "slots_pinned_error"),
    (BackendExited("m", 1, "at start"), 500, "model_load_error"),
    (HealthCheckTimeout("m", 1.0), 500, "model_load_error"),
    (LoadCancelled("cancelled", model="m"), 500, "model_load_error"),
    (NotEnoughMemory("no room", model="m"), 500, "model_load_error"),
    (InvalidModelFile("/x.gguf", "is not GGUF", model="m"), 500, "model_load_error"),
    (BackendUnavailable("no llama-server"), 500, "model_load_error"),
    (BackendCrashed("m", -9), 500, "inference_error"),
    (InferenceError("backend answered HTTP 400", model="m"), 500, "inference_error"),
    (RequestTimeout("slow", model="m"), 504, "timeout"),
    (WaitTimeout("slow", model="m"), 504, "timeout"),
])
def test_every_router_error_has_one_http_answer(error: LemonError, status: int, code: str) -> None:
    r = error_response(error)
    assert r.status_code == status
    assert json.loads(bytes(r.body))["error"]["code"] == code
    assert json.loads(bytes(error_response(ModelNotLoaded("m")).body)) == {"error": "Model not loaded: m"}


def test_requests_during_reloads_wait_and_succeed(served: Served) -> None:
    served.http.post("/load", json={"model_name": "tiny", "ctx_size": 256})
    done = threading.Event()
    failures: list[str] = []
    answered = [0]

    def ask() -> None:
        with httpx.Client(base_url=served.url, timeout=60, trust_env=False) as http:
            while not done.is_set():
                r = http.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
                if r.status_code != 200:
                    failures.append(r.text)
                answered[0] += 1

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    try:
        pids = [served.http.post("/load", json={"model_name": "tiny", "ctx_size": ctx}).json()["pid"]
                for ctx in (512, 256, 512, 256, 512)]
    finally:
        done.set()
        for t in askers:
            t.join()
    assert len(set(pids)) == 5 and not failures, failures[:3]
    assert answered[0] >= 3


def test_stats_and_system_info(served: Served) -> None:
    http = served.http
    assert http.get("/stats").json()["request_count_total"] == 0
    http.post("/completions", json={"model": "tiny", "prompt": "once upon", "max_tokens": 4})
    stats = http.get("/stats").json()
    assert stats["request_count_total"] == 1 and stats["output_tokens"] == 4
    assert stats["input_tokens"] > 0 and stats["tokens_per_second"] > 0
    list(served.openai().completions.create(model="tiny", prompt="x", max_tokens=3, stream=True))
    stats = http.get("/stats").json()
    assert stats["request_count_total"] == 2 and stats["output_tokens_total"] == 7
    info = http.get("/system-info").json()
    assert info["devices"]["cpu"]["available"] is True
    assert info["recipes"]["llamacpp"]["backends"]["llama-server"]["state"] == "installed"
    assert http.head("/stats").status_code == http.head("/system-info").status_code == 200
