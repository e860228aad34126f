"""Remote models behind our own HTTP server: one stable URL for any client (the ``openai``
package over a real socket), the same contract, for every kind of model. The remote is a real
``lemon-magic serve`` process (``tests/remotes.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from lemon_magic import Router, RouterConfig
from lemon_magic.registry import Registry
from tests.fake_remote import FakeRemote
from tests.remotes import Proc, free_port, health, lemon, lemon_root, unload_remote
from tests.tinygguf import write_tiny_llama

__all__ = ("lemon", "lemon_root")  # fixtures

pytestmark = pytest.mark.usefixtures("forget_registrations")


@pytest.fixture
def rr(make_router: Callable[..., Router]) -> Router:
    return make_router(RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3))


def test_a_remote_model_served_over_http_by_name(lemon: Proc, rr: Router) -> None:
    """Our own server in front of a remote model: one stable URL, the same contract."""
    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    base = rr.serve(port=free_port())
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        first = http.post("/load", json={"model_name": "big", "ctx_size": 256})
        assert first.status_code == 200, first.text
        assert http.post("/load", json={"model_name": "big", "ctx_size": 256}).json()["action"] == "noop"
        loaded = http.get("/health").json()["all_models_loaded"]
        assert [m["model_name"] for m in loaded] == ["big"]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    done = client.completions.create(model="big", prompt="once", max_tokens=3)
    assert done.model == "big" and done.choices[0].text is not None
    chunks = list(client.chat.completions.create(model="big", max_tokens=3, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks and health(lemon).ctx_size == 256


def test_a_remote_embedding_model_keeps_its_kind(lemon: Proc, lemon_root: Path, rr: Router) -> None:
    """``--kind`` keeps its meaning for a remote: embeddings go to the remote's embeddings route;
    an LLM route refuses it before anything loads."""
    emb = write_tiny_llama(lemon_root / "emb.gguf", seed=11, mean_pooling=True)
    Registry(lemon_root / "config" / "models.json").register("emb", emb, kind="embedding")
    rr.register_remote("vectors", lemon.url, "emb", kind="embedding")
    base = rr.serve(port=free_port())
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    out = client.embeddings.create(model="vectors", input=["hello", "world"])
    assert len(out.data) == 2 and len(out.data[0].embedding) > 0
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model="vectors", prompt="x", max_tokens=1)
    assert health(lemon, "emb").loaded


def test_a_remote_that_fails_is_a_bad_gateway_in_one_line(rr: Router) -> None:
    """Over HTTP, a remote model's server failing is 502 (not the client's fault, not ours)."""
    gone = f"http://127.0.0.1:{free_port()}"
    rr.register_remote("gone", gone, "m")
    base = rr.serve(port=free_port())
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        for path, body in (("/load", {"model_name": "gone"}),
                           ("/completions", {"model": "gone", "prompt": "x", "max_tokens": 1})):
            r = http.post(path, json=body)
            assert r.status_code == 502, r.text
            error = r.json()["error"]
            assert error["type"] == "remote_unreachable" and gone in error["message"]
            assert "\n" not in error["message"]
        assert http.get("/health").status_code == 200


def test_remote_models_over_http_after_review(rr: Router) -> None:
    """Routes that meant a local file refuse a remote model in one line; unload-all with a dead
    remote is JSON; delete unloads it there; backend_url is the remote's base; an unload of an
    openai remote says the server keeps it."""
    with FakeRemote() as fake, FakeRemote(keepalive=False) as dead:
        rr.register_remote("big", fake.url, "m")
        rr.register_remote("gone", dead.url, "m")
        base = rr.serve(port=free_port())
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
            loaded = http.post("/load", json={"model_name": "big"}).json()
            assert loaded["backend_url"] == f"{fake.url}/api/v1"
            assert http.post("/load", json={"model_name": "gone"}).status_code == 200
            for method, path, body in (("GET", "/models/big/options", None),
                                       ("POST", "/models/big/options", {"ctx_size": 512}),
                                       ("POST", "/pull", {"model_name": "big"})):
                r = http.request(method, path, json=body)
                assert r.status_code == 400, (path, r.text)
                assert "remote model" in r.text
            dead.__exit__()  # the second remote goes away
            r = http.post("/unload", json={})
            assert r.status_code == 502 and r.json()["error"]["type"] == "remote_unreachable"
            assert not fake.cfg["loaded"]  # the other one went all the same
            http.post("/load", json={"model_name": "big"})
            deleted = http.post("/delete", json={"model_name": "big"})
            assert deleted.status_code == 200 and not fake.cfg["loaded"]


def test_a_non_streamed_client_that_leaves_ends_its_request(rr: Router) -> None:
    """The client gives up: the request is ended here and at the remote (was: the remote went on
    generating for nobody, and unloads waited for it)."""
    with FakeRemote(infer_seconds=8.0) as fake:
        rr.register_remote("slow", fake.url, "m")
        rr.load("slow")
        base = rr.serve(port=free_port())
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/completions", json={"model": "slow", "prompt": "x"}, timeout=0.5,
                       trust_env=False)
        deadline = time.monotonic() + 3
        while any(s.requests_in_flight for s in rr.status()):
            assert time.monotonic() < deadline, "the request outlived its client"
            time.sleep(0.05)


@pytest.mark.parametrize(("remote_status", "ours"), [(500, 502), (503, 502), (404, 502), (400, 400)])
def test_a_remote_failing_an_inference_is_a_bad_gateway(rr: Router, remote_status: int,
                                                        ours: int) -> None:
    """Its 5xx or 404 is a 502 here (its failure, not the client's); a 400 about the request is
    passed on."""
    with FakeRemote(infer_status=remote_status) as fake:
        rr.register_remote("m", fake.url, "m")
        base = rr.serve(port=free_port())
        for stream in (False, True):
            r = httpx.post(f"{base}/completions", json={"model": "m", "prompt": "x",
                                                        "stream": stream}, trust_env=False)
            assert r.status_code == ours, r.text
            assert f"remote {fake.url} answered HTTP {remote_status}: it broke" in r.text


def test_lemonade_device_key_reaches_a_remote_model(lemon: Proc, rr: Router) -> None:
    """``llamacpp_backend`` is the remote's device for a remote model (here: CPU only, so the
    remote itself refuses vulkan, and says so through us); a local model still refuses it here."""
    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    base = rr.serve(port=free_port())
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        ok = http.post("/load", json={"model_name": "big", "llamacpp_backend": "cpu"})
        assert ok.status_code == 200, ok.text
        r = http.post("/load", json={"model_name": "big", "llamacpp_backend": "vulkan"})
        assert r.status_code == 400 and f"remote {lemon.url} answered HTTP 400" in r.text
        assert "vulkan" in r.text
