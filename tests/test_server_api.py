"""The HTTP API beyond inference: embeddings, per-model saved options, runtime params."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from lemon_magic import Router
from tests.serving import Served
from tests.tinygguf import write_tiny_llama


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("emb") / "tiny-emb.gguf", seed=5,
                                mean_pooling=True))


@pytest.fixture
def served_emb(served: Served, embedding_model: str) -> Iterator[Served]:
    served.router.register("emb", embedding_model, kind="embedding")
    yield served
    served.router.unregister("emb")


def _loaded(served: Served) -> dict[str, dict[str, object]]:
    return {m["model_name"]: m for m in served.http.get("/health").json()["all_models_loaded"]}


# ------------------------------------------------------------------------------- embeddings

def test_embeddings_through_the_openai_client(served_emb: Served) -> None:
    client = served_emb.openai()
    result = client.embeddings.create(model="emb", input=["once upon", "a time"])
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 32 for d in result.data)  # the tiny model's n_embd
    assert result.data[0].embedding != result.data[1].embedding
    entry = _loaded(served_emb)["emb"]
    assert entry["type"] == "embedding" and "--embeddings" in entry["launch_command"]  # type: ignore[operator]
    again = served_emb.http.post("/embeddings", json={"input": "once upon"})  # no model: the loaded one
    assert again.status_code == 200 and again.json()["model"] == "emb"


def test_models_of_the_wrong_kind_are_refused_before_anything_loads(served_emb: Served) -> None:
    client = served_emb.openai()
    with pytest.raises(openai.BadRequestError, match="'tiny' is an LLM: it does not serve embeddings"):
        client.embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.BadRequestError,
                       match="'emb' is an embedding model: it does not serve chat/completions"):
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "x"}])
    r = served_emb.http.post("/embeddings", json={"model": "emb", "input": "x", "stream": True})
    assert r.status_code == 400 and "cannot be streamed" in r.text
    assert _loaded(served_emb) == {}


# ------------------------------------------------------------------ models/{id}/options

def test_saved_options_round_trip_without_loading(served: Served) -> None:
    http = served.http
    view = http.get("/models/tiny/options").json()
    assert view["saved"] == {} and view["effective"]["model_name"] == "tiny"
    default_ctx = view["resolved_ctx_size"]

    preview = http.post("/models/tiny/options", json={"ctx_size": 1024, "dry_run": True}).json()
    assert preview["dry_run"] is True and preview["saved"] == {}  # what is saved: nothing yet
    assert preview["effective"]["ctx_size"] == preview["resolved_ctx_size"] == 1024
    assert http.get("/models/tiny/options").json()["saved"] == {}  # a preview saves nothing

    saved = http.post("/models/tiny/options", json={"ctx_size": 1024, "model_name": "ignored",
                                                    "llamacpp_args": "-b 64"}).json()
    assert saved["saved"] == {"ctx_size": 1024, "llamacpp_args": "-b 64"}
    assert saved["resolved_ctx_size"] == 1024
    assert http.get("/models/tiny").json()["recipe_options"]["ctx_size"] == 1024
    assert _loaded(served) == {}  # saving never loads

    http.post("/load", json={"model_name": "tiny"}).raise_for_status()
    assert _loaded(served)["tiny"]["recipe_options"]["ctx_size"] == 1024  # type: ignore[index]

    forgot = http.post("/models/tiny/options", json={"ctx_size": None}).json()
    assert forgot["saved"] == {"llamacpp_args": "-b 64"}
    cleared = http.delete("/models/tiny/options").json()
    assert cleared["saved"] == {} and cleared["resolved_ctx_size"] == default_ctx


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/models/tiny/options", {"pinned": True}, 400, "'pinned' is not a saved option"),
    ("/models/tiny/options", {"ctx_sz": 4}, 400, "unknown option 'ctx_sz'"),
    ("/models/tiny/options", {"ctx_size": -5}, 400, "ctx_size must be a positive integer"),
    ("/models/tiny/options", {"ctx_size": 10**9}, 400, "exceeds the training context"),
    ("/models/tiny/options", {"dry_run": "yes"}, 400, "'dry_run' must be a boolean"),
    ("/models/tiny/options", {"llamacpp_args": "--log-file /tmp/x"}, 400, "may not set --log-file"),
    ("/models/gemma3-270m/options", {"ctx_size": 1024}, 400, "is built in"),
    ("/models/nope/options", {"ctx_size": 1024}, 404, "unknown model 'nope'"),
])
def test_bad_saved_options_change_nothing(served: Served, path: str, body: dict[str, object],
                                          status: int, says: str) -> None:
    before = served.http.get("/models/tiny/options").json()
    r = served.http.post(path, json=body)
    assert r.status_code == status and says in r.text
    assert served.http.get("/models/tiny/options").json() == before


# ------------------------------------------------------------------------------- params

def test_params_change_the_defaults_of_later_loads(served: Served) -> None:
    http = served.http
    snapshot = http.get("/params").json()
    assert snapshot["ctx_size"] == -1 and snapshot["port"] == int(served.url.split(":")[2].split("/")[0])
    r = http.post("/params", json={"ctx_size": 2048, "llamacpp": {"args": "-b 64"},
                                   "max_loaded_models": 2, "idle_timeout": 600})
    assert r.json() == {"status": "success", "updated": {"ctx_size": 2048, "llamacpp_args": "-b 64",
                                                         "max_loaded_models": 2, "idle_timeout": 600}}
    config = served.router.config
    assert config.default_options.ctx_size == 2048 and config.idle_timeout == 600
    assert set(config.max_loaded.values()) == {2}
    http.post("/load", json={"model_name": "tiny"}).raise_for_status()
    entry = _loaded(served)["tiny"]
    assert entry["recipe_options"]["ctx_size"] == 2048  # type: ignore[index]
    assert "-b" in entry["launch_command"]  # type: ignore[operator]


@pytest.mark.parametrize(("body", "says"), [
    ({}, "needs at least one setting"),
    ({"bogus": 1}, "unknown setting 'bogus'"),
    ({"port": 80}, "port cannot change while serving"),
    ({"ctx_size": 2048, "max_loaded_models": 0}, "max_loaded_models must be a positive integer"),
    ({"ctx_size": "big"}, "ctx_size must be a positive integer"),
    ({"llamacpp": "-b 64"}, "'llamacpp' must be an object"),
    ({"llamacpp_args": "--slot-save-path /tmp"}, "may not set --slot-save-path"),
    ({"request_timeout": -1}, "request_timeout must be a positive number"),
    ({"llamacpp_backend": "vulkan"}, "not available here"),
])
def test_bad_params_change_nothing(served: Served, body: dict[str, object], says: str) -> None:
    before = served.router.config
    r = served.http.post("/params", json=body)
    assert r.status_code == 400 and says in r.json()["error"]
    assert served.router.config == before


# ------------------------------------------------------------------ streams: pings and bounds

@pytest.fixture
def fake_served(make_router: Callable[..., Router], tiny_model: str) -> Iterator[Served]:
    from tests.fakes import FakeBackend

    router = make_router(backends={"fake": FakeBackend()})
    router.register("fake", tiny_model, backend="fake")
    url = router.serve(port=0)
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        yield Served(router, url, http)
    router.stop_serving()
    router.unregister("fake")


def _in_flight(router: Router) -> int:
    return sum(s.requests_in_flight for s in router.status())


def test_pings_keep_a_stream_alive_until_the_first_token(fake_served: Served,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from lemon_magic.server import _sse

    monkeypatch.setattr(_sse, "PING_EVERY", 0.1)
    monkeypatch.setenv("FAKE_FIRST_DELAY", "0.8")
    fake_served.http.post("/load", json={"model_name": "fake"}).raise_for_status()
    with fake_served.http.stream("POST", "/completions", json={"model": "fake", "prompt": "x",
                                                               "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert lines[:first_data].count(": ping") >= 3
    assert ": ping" not in lines[first_data:] and lines[-1] == "data: [DONE]"
    chunks = fake_served.openai().completions.create(model="fake", prompt="x", stream=True)
    assert "".join(c.choices[0].text for c in chunks) == "fake text from the stand-in"


def test_a_client_gone_before_the_first_token_ends_the_request_at_once(
        fake_served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time
    from urllib.parse import urlsplit

    monkeypatch.setenv("FAKE_FIRST_DELAY", "20")
    fake_served.http.post("/load", json={"model_name": "fake"}).raise_for_status()
    parts = urlsplit(fake_served.url)
    body = b'{"model":"fake","prompt":"x","stream":true}'
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(b"POST /api/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while _in_flight(fake_served.router) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _in_flight(fake_served.router) == 1
    deadline = time.monotonic() + 10  # far less than the 20 s the first token would take
    while _in_flight(fake_served.router) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _in_flight(fake_served.router) == 0
    assert fake_served.http.get("/health").status_code == 200


def test_a_client_that_never_reads_is_let_go(served: Served) -> None:
    import socket
    import time
    from urllib.parse import urlsplit

    served.router.configure(stream_idle_timeout=1.0)
    served.http.post("/load", json={"model_name": "tiny"}).raise_for_status()
    parts = urlsplit(served.url)
    body = (b'{"model":"tiny","prompt":"once","stream":true,"max_tokens":3500,"ignore_eos":true,'
            b'"temperature":1.0,"n_probs":100}')  # ~5 KB an event: the buffers fill
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    with sock:
        sock.sendall(b"POST /api/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline:  # not reading: the server's writes block, then it gives up
            busy = _in_flight(served.router)
            seen = seen or busy > 0
            if seen and not busy:
                break
            time.sleep(0.05)
        assert seen and _in_flight(served.router) == 0
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(65536):  # what was buffered, then the end: the server hung up
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received
    assert served.http.get("/health").status_code == 200
    again = served.http.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert again.status_code == 200



# ------------------------------------------------------------- llama-server's own routes (issue 17)

def test_tokenize_and_friends_keep_the_load_contract(served: Served) -> None:
    """tokenize, detokenize and apply-template auto-load, never reload, hold one lease each,
    answer under every prefix, and use the error table like the other inference routes."""
    http = served.http
    tokens = http.post("/tokenize", json={"model": "tiny", "content": "hello"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    pid = served.pid("tiny")
    assert pid is not None  # auto-loaded
    again = http.post(served.url.replace("/api/v1", "/v0") + "/tokenize",
                      json={"model": "tiny", "content": "hello", "ctx_size": 512})
    assert again.json() == tokens.json() and served.pid("tiny") == pid  # never a reload
    text = http.post("/detokenize", json={"model": "tiny", "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200 and "hello" in text.json()["content"]
    prompt = http.post("/apply-template", json={"model": "tiny", "messages": [
        {"role": "user", "content": "hello"}]})
    assert prompt.status_code == 200 and "hello" in prompt.json()["prompt"]
    assert _loaded(served)["tiny"]["requests_in_flight"] == 0 and served.router.spawn_count == 1
    missing = http.post("/tokenize", json={"model": "nope", "content": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert http.post("/tokenize", json={"model": "tiny", "content": "x", "stream": True}).status_code == 400
    assert http.get("/responses").status_code == 405
