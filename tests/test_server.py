"""The HTTP API over a real socket, with real clients (``openai``, ``httpx``, raw sockets),
on real llama.cpp backends: the same load contract as the Python API."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import (
    ModelState,
    Router,
    get_router,
)
from lemon_magic.registry import Registry
from tests.conftest import alive, wait_no_backends
from tests.serving import CHAT, Served, backend_headers

pytestmark = pytest.mark.real




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
    backend = entry["backend_url"] + "/models"  # it answers only the router (issue 21)
    assert httpx.get(backend, timeout=10, trust_env=False).status_code == 401
    key = backend_headers(served.router, entry["backend_url"])
    assert httpx.get(backend, headers=key, timeout=10, trust_env=False).status_code == 200
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

def test_health_recipe_options_replay_as_a_noop_load(served: Served) -> None:
    first = served.http.post("/load", json={"model_name": "tiny", "ctx_size": 512,
                                            "llamacpp_args": "-b 64"}).json()
    [entry] = served.http.get("/health").json()["all_models_loaded"]
    again = served.http.post("/load", json={"model_name": "tiny", **entry["recipe_options"]}).json()
    assert again["action"] == "noop" and again["pid"] == first["pid"]


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
