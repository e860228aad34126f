"""The HTTP API refuses what it must: bad bodies, wrong methods, malformed raw requests,
backend flags that touch files or the network, foreign hosts and origins, missing keys;
and every router error has one HTTP answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

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
    NotEnoughMemory,
    RequestTimeout,
    SlotsFull,
    WaitTimeout,
)
from lemon_magic.server.app import error_response
from tests.serving import CHAT, Served, raw

pytestmark = pytest.mark.real




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
    ("/completions", {"json": {"model": ["tiny"], "prompt": "x"}}, 400, "'model' must be a string"),
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


def test_malformed_raw_requests_get_400_and_the_server_keeps_serving(served: Served) -> None:
    host = urlsplit(served.url).netloc.encode()
    bad_json = b'{"model_name": "tiny"'
    answer = raw(served.url, b"POST /api/v1/load HTTP/1.1\r\nHost: " + host +
                  b"\r\nContent-Type: application/json\r\nContent-Length: " +
                  str(len(bad_json)).encode() + b"\r\n\r\n" + bad_json)
    assert answer.startswith(b"HTTP/1.1 400") and b"Invalid JSON" in answer
    truncated = raw(served.url, b"POST /api/v1/load HTTP/1.1\r\nHost: " + host +
                     b"\r\nContent-Length: 100\r\n\r\n{\"model_name\"", shut_write=True)
    assert truncated == b"" or truncated.startswith(b"HTTP/1.1 400")
    garbage = raw(served.url, b"NOT HTTP AT ALL\r\n\r\n", shut_write=True)
    assert garbage == b"" or garbage.startswith(b"HTTP/1.1 400")
    assert served.http.get("/health").status_code == 200
    assert served.router.spawn_count == 0


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
    r = http.post("/load", json={"model_name": "tiny", "llamacpp_args": "-ctk bogus"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_error"
    assert "Failed to load model 'tiny'" in r.json()["error"]["message"]
    assert http.post("/load", json={"model_name": "tiny", "pinned": True}).status_code == 200
    r = http.post("/load", json={"model_name": "tiny-b"})  # one llm slot, held by a pinned model
    assert r.status_code == 409 and r.json()["error"]["code"] == "slots_pinned_error"
    r = http.post("/chat/completions", json={"model": "tiny-b", "messages": CHAT})
    assert r.status_code == 409
    assert http.post("/unload", json={"model_name": ""}).status_code == 404  # not "unload all"
    assert [e["model_name"] for e in http.get("/health").json()["all_models_loaded"]] == ["tiny"]


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



def test_a_backend_refusal_keeps_its_status() -> None:
    from lemon_magic import InferenceError as Refused

    answer = error_response(Refused("backend of 'm' answered HTTP 400: bad grammar", model="m", status=400))
    assert answer.status_code == 400 and b"bad grammar" in answer.body
    assert error_response(Refused("cut", model="m")).status_code == 500  # no status of its own
